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

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jnnex import run as runs
from jnnex.bench.harness import RESULTS, table
from jnnex.bench.text import shakespeare
from jnnex.lm import count_params
from jnnex.models.gpt import GPTConfig, gpt
from jnnex.optim import make_optimizer
from jnnex.scale import compute_optimal, fit_law, isoflop, law, sweep
from jnnex.step import init_train_state, make_step
from jnnex.train import fit

LR = 2.0**-6  # μP's best at the base width in `jnnex bench --only mup` (400 steps); one rate for every run here
WIDTHS, STEPS = (32, 48, 64, 96, 128), (250, 500, 1000, 2000)
HELD_OUT = {"width": 192, "steps": 3000}


def run(quick: bool = False, out=RESULTS) -> dict:
    path = shakespeare()
    widths, steps_list = ((32, 48, 64), (20, 40)) if quick else (WIDTHS, STEPS)
    held = {"width": 192, "steps": 60} if quick else HELD_OUT
    base = {"n_layer": 1 if quick else 2, "n_head": 4, "block_size": 16 if quick else 64}
    rc = runs.RunConfig.new("gpt", str(path), preset="shakespeare-cpu", gradients="manual", batch_size=12, **base)
    _, splits = runs.prepare(rc)
    tokens_per_step = 12 * base["block_size"]

    def build(width):
        cfg = rc.model_config
        return gpt(GPTConfig(**{**{f: getattr(cfg, f) for f in ("vocab_size", "block_size", "n_layer", "n_head",
                                                                 "bias", "tie", "dropout")},
                                "n_embd": width, "param": "mup", "base_width": 32})).with_gradients("manual")

    def one(spec):
        model = build(spec["width"])
        tcfg = dataclasses.replace(rc.train.with_steps(spec["steps"]), lr=LR, eval_every=spec["steps"],
                                   chunk=min(500, spec["steps"]), warmup=min(100, spec["steps"] // 4))
        result = fit(model, splits, tcfg)
        params = count_params(result.ts.params)
        D = spec["steps"] * tokens_per_step
        return {"N": float(params), "D": float(D), "loss": float(result.evals[-1]["val_loss"]),
                "flops_6ND": 6.0 * params * D, "flops_xla": step_flops(spec["width"]) * spec["steps"]}

    @functools.cache
    def step_flops(width):
        """XLA's FLOP count of one compiled training step (forward, backward, AdamW) at ``width``."""
        model = build(width)
        opt = make_optimizer(rc.train, model)
        ts = jax.eval_shape(lambda k: init_train_state(model, opt, k), jax.random.key(0))
        x = jax.ShapeDtypeStruct((12, model.block_size), jnp.int32)
        return float(jax.jit(make_step(model, opt)).lower(ts, (x, x), jax.random.key(0)).compile()
                     .cost_analysis()["flops"])

    specs = [{"width": w, "steps": s} for w in widths for s in steps_list]
    rows = [{**r["spec"], **{k: v for k, v in r.items() if k != "spec"}}
            for r in sweep(specs, one, out=Path(out) / ("scaling-quick" if quick else "scaling"), log=print)]
    fitted = fit_law([r["N"] for r in rows], [r["D"] for r in rows], [r["loss"] for r in rows])
    held_N = float(count_params(jax.eval_shape(lambda k: build(held["width"]).init(k)[0], jax.random.key(0))))
    held_D = float(held["steps"] * tokens_per_step)
    predicted = float(law(fitted, held_N, held_D))  # before the run
    measured = sweep([held], one, out=Path(out) / ("scaling-quick" if quick else "scaling"), name="held_out",
                     log=print)[0]
    budgets = sorted({round(math.log10(r["flops_6ND"]) * 4) / 4 for r in rows})
    iso = isoflop(rows, [10**b for b in budgets])
    optimal = compute_optimal(fitted)
    found = [r for r in iso if r["N_opt"]]
    iso_slope = float(np.polyfit(np.log([r["C"] for r in found]), np.log([r["N_opt"] for r in found]), 1)[0]) \
        if len(found) >= 3 else None  # (fewer than 3 budgets with a minimum inside the runs: not determined)
    summary = [{"E": fitted["E"], "A": fitted["A"], "alpha": fitted["alpha"], "B": fitted["B"],
                "beta": fitted["beta"], "fit residual (log)": fitted["residual"],
                "N_opt ∝ C^a: a from the fit": optimal["a"], "a from IsoFLOP minima": iso_slope}]
    held_row = [{"width": held["width"], "steps": held["steps"], "N": held_N, "D": held_D, "predicted": predicted,
                 "measured": measured["loss"], "error": predicted / measured["loss"] - 1}]
    flops = [{"width": r["width"], "steps": r["steps"], "N": r["N"], "6ND / XLA": r["flops_6ND"] / r["flops_xla"]}
             for r in rows if r["steps"] == steps_list[-1]]
    text = ("Runs (val loss, every window)\n\n" + table(rows, ["width", "steps", "N", "D", "loss"])
            + "\n\nThe fit L(N, D) = E + A/N^α + B/D^β\n\n" + table(summary, list(summary[0]))
            + "\n\nThe held-out run, predicted before it ran\n\n" + table(held_row, list(held_row[0]))
            + "\n\n6ND against XLA's FLOP count of the step (forward, backward and AdamW)\n\n"
            + table(flops, list(flops[0])))
    return {"name": "scaling", "rows": rows, "fit": fitted, "isoflop": iso, "held_out": held_row[0],
            "summary": summary[0], "flops": flops, "table": text, "lr": LR}


def plot(result: dict, path) -> Path:
    """Validation loss against compute (6ND), a line per width, the fitted law's curves beside; the held-out run's
    prediction and measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows, fitted = result["rows"], result["fit"]
    for i, width in enumerate(sorted({r["width"] for r in rows})):
        pts = sorted((r["flops_6ND"], r["loss"], r["N"], r["D"]) for r in rows if r["width"] == width)
        C, L, N, D = (np.array(v) for v in zip(*pts))
        color = plt.cm.viridis(i / 5)
        ax.loglog(C, L, "o", color=color, label=f"width {width}")
        Ds = np.geomspace(D.min() / 2, D.max() * 2, 50)
        ax.loglog(6 * N[0] * Ds, law(fitted, N[0], Ds), "-", color=color, lw=0.8)
    h = result["held_out"]
    ax.loglog([6 * h["N"] * h["D"]], [h["measured"]], "k*", ms=12, label="held out: measured")
    ax.loglog([6 * h["N"] * h["D"]], [h["predicted"]], "rx", ms=10, label="held out: predicted")
    ax.set(title=f"tiny Shakespeare: L = {fitted['E']:.2f} + {fitted['A']:.3g}/N^{fitted['alpha']:.2f} + "
                 f"{fitted['B']:.3g}/D^{fitted['beta']:.2f}", xlabel="compute, 6ND (FLOPs)", ylabel="val loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
