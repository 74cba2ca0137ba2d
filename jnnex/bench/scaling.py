"""A scaling law on this machine: tiny Shakespeare, GPTs of 5 widths each trained for 4 token budgets, fitted to
``L(N, D) = E + A/N^α + B/D^β`` (Chinchilla's approach 3) and read as IsoFLOP profiles (approach 2); a larger run's
loss predicted from the fit before it is run, then measured.

The models: nanoGPT's Shakespeare layout (no biases, the head tied, block 64), 2 blocks, 4 heads, widths 32 … 128,
under μP (base width 32) at one learning rate for all (``LR``, the best of ``jnnex bench --only mup``'s sweep at the
base width: the transfer this suite relies on). Each run: AdamW, a cosine schedule to its own end (warmup 100),
batch 12 × 64 characters, ``D = steps · 768`` tokens; its loss is the validation split's, every window. ``N``: every
parameter (the tied table once). FLOPs: ``6 N D``, and XLA's count of the compiled step times the steps.

Why tiny Shakespeare, not a generated source of known entropy: the fit's ``E`` is then not checkable against a
known floor, but the law is fitted where the lectures' models live; the data's own character entropy bounds nothing
here (a model conditions on context). Runs append to ``scaling/sweep.jsonl`` beside the JSON; a suite started again
resumes.
"""

from __future__ import annotations

from pathlib import Path

from jnnex import run as runs
from jnnex.bench.harness import RESULTS, progress, quick_splits, table
from jnnex.bench.text import shakespeare
from jnnex.models.gpt import GPTConfig, gpt
from jnnex.scale import law_sweep

LR = 2.0**-6  # μP's best at the base width in `jnnex bench --only mup` (400 steps); one rate for every run here
WIDTHS, STEPS = (32, 48, 64, 96, 128), (250, 500, 1000, 2000)
HELD_OUT = {"width": 192, "steps": 3000}


def run(quick: bool = False, out=RESULTS) -> dict:
    path = shakespeare()
    widths, steps_list = ((32, 48, 64), (20, 40)) if quick else (WIDTHS, STEPS)
    held = {"width": 192, "steps": 60} if quick else HELD_OUT
    base = {"n_layer": 1 if quick else 2, "n_head": 4, "block_size": 16 if quick else 64}
    rc = runs.RunConfig.new("gpt", str(path), preset="shakespeare-cpu", gradients="manual", batch_size=12, lr=LR,
                            **base)
    _, splits = runs.prepare(rc)
    splits = quick_splits(splits) if quick else splits

    def build(width):
        cfg = rc.model_config
        return gpt(GPTConfig(**{**{f: getattr(cfg, f) for f in ("vocab_size", "block_size", "n_layer", "n_head",
                                                                 "bias", "tie", "dropout")},
                                "n_embd": width, "param": "mup", "base_width": 32})).with_gradients("manual")

    swept = law_sweep(build, splits, rc.train, widths, steps_list, predict=held,
                      out=Path(out) / ("scaling-quick" if quick else "scaling"), log=progress)
    rows, fitted, iso = swept["rows"], swept["fit"], swept["isoflop"]
    summary = [{"E": fitted["E"], "A": fitted["A"], "alpha": fitted["alpha"], "B": fitted["B"],
                "beta": fitted["beta"], "fit residual (log)": fitted["residual"],
                "N_opt ∝ C^a: a from the fit": swept["compute_optimal"]["a"], "a from IsoFLOP minima": swept["isoflop_a"]}]
    held_row = [swept["held_out"]]
    iso_rows = [{"C (6ND)": r["C"], "runs near it": r["runs"], "N_opt from minima": r["N_opt"],
                 "N_opt from the law": r["N_opt_law"], "D_opt from the law": r["D_opt_law"],
                 "smallest N run": min(x["N"] for x in rows)} for r in iso]
    flops = [{"width": r["width"], "steps": r["steps"], "N": r["N"], "6ND / XLA": r["flops_6ND"] / r["flops_xla"]}
             for r in rows if r["steps"] == steps_list[-1]]
    text = ("Runs (val loss, every window)\n\n" + table(rows, ["width", "steps", "N", "D", "loss"])
            + "\n\nThe fit L(N, D) = E + A/N^α + B/D^β\n\n" + table(summary, list(summary[0]))
            + "\n\nIsoFLOP: each budget's compute-optimal size, from the runs' minima and from the law\n\n"
            + table(iso_rows, list(iso_rows[0]))
            + "\n\nThe held-out run, predicted before it ran\n\n"
            + table(held_row, ["width", "steps", "N", "D", "predicted", "measured", "error"])
            + "\n\n6ND against XLA's FLOP count of the step (forward, backward and AdamW)\n\n"
            + table(flops, list(flops[0])))
    return {"name": "scaling", "rows": rows, "fit": fitted, "isoflop": iso, "isoflop_rows": iso_rows,
            "held_out": held_row[0],
            "summary": summary[0], "flops": flops, "table": text, "lr": LR}


def plot(result: dict, path) -> Path:
    """Validation loss against compute (6ND), a line per width, the fitted law's curves beside; the held-out run's
    prediction and measurement."""
    from jnnex.plot import plot_sweep

    return plot_sweep("law", result, path)
