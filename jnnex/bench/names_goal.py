"""The names goal revisited with μP: the learning rate found on a narrow Llama, used on wide ones.

The best names model so far is the Llama ``improved`` preset (n_embd 128, dropout 0.3, 30,000 steps, the lr × 0.1 at
18,000 and 27,000): dev 1.9255 ± 0.0034 over three seeds under Muon, 1.9335 under AdamW (seed 0). The issue's goal
is dev ≤ 1.90. This suite asks whether μP's transfer finds a better rate cheaply and whether width then helps:

1. **The sweep, narrow**: the preset's Llama under μP at its base width (n_embd 32: there μP *is* the standard
   model), AdamW (μP's multipliers are AdamW's; ``jnnex bench --only mup`` and the README say how Muon relates), at
   rates 2⁻¹¹ … 2⁻⁵, each for ``SWEEP_STEPS`` steps with the preset's schedule scaled to them (the drops at 60 % and
   90 %), every other setting the preset's.
2. **The transfer, checked**: the same model at ``CHECK_WIDTH`` (4× the base) for the sweep's length at the best
   rate and the rates a factor of 2 either side: does the best rate stay put, as μP says it should?
3. **The transfer, wide**: the model at widths ``WIDTHS`` (4× and 8× the base) at the sweep's best rate,
   untouched, for the preset's full 30,000 steps: the dev curve every 3,000 steps, dev and test at the end.

Every run is a run directory under ``names-goal/`` (``config.json``, checkpoints every minute and at every
evaluation, ``metrics.jsonl``), so a suite stopped anywhere loses at most a minute of the run in flight; a finished
run's row goes to ``names-goal/sweep.jsonl`` and is not run again. Reads makemore's ``names.txt`` (``$JNNEX_NAMES_TXT``
or ``../shared/data/names.txt``); ``--quick`` uses the embedded census names and a few steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jnnex import rundir
from jnnex import run as runs
from jnnex.bench.harness import RESULTS, progress, table
from jnnex.data import SHARED_DATA
from jnnex.scale import check_sweep_fits, sweep, widths_of

BASE_WIDTH = 32
LRS = tuple(2.0**k for k in range(-11, -4))
SWEEP_STEPS = 10_000
CHECK_WIDTH = 128
WIDTHS = (128, 256)
STEPS = 30_000  # the preset's


def names_txt() -> Path:
    path = Path(os.environ.get("JNNEX_NAMES_TXT", SHARED_DATA / "names.txt"))
    if not path.is_file():
        raise ValueError(f"the names-goal suite reads makemore's names.txt from {path} (set JNNEX_NAMES_TXT)")
    return path


def config(data: str, width: int, lr: float, steps: int, quick: bool) -> runs.RunConfig:
    """The Llama ``improved`` preset under μP (base width 32) with AdamW at ``width`` and ``lr``, its schedule
    scaled to ``steps`` (the preset's own at 30,000); ten evaluations a run (``quick``: two, and one block)."""
    every = max(1, steps // (2 if quick else 10))
    return runs.RunConfig.new("llama", data, preset="improved", gradients="manual", optimizer="adamw",
                              param="mup", base_width=BASE_WIDTH, n_embd=width, lr=lr, steps=steps,
                              lr_boundaries=(steps * 6 // 10, steps * 9 // 10), eval_every=every,
                              chunk=min(500, every), **({"n_layer": 1} if quick else {}))


def trained(rc: runs.RunConfig, where: Path) -> dict:
    """Run ``rc`` in the directory ``where``, continuing it from its checkpoint if one is there; its final metrics
    and its dev curve (``metrics.jsonl``'s evaluations)."""
    if (where / rundir.CHECKPOINT).is_file():
        res = runs.resume(where, progress=False)
    else:
        res = runs.train(rc, where, force=True, progress=False)
    if res.interrupted:
        raise KeyboardInterrupt(f"stopped; `jnnex bench --only names_goal` again continues {where}")
    rows = [json.loads(line) for line in (where / rundir.METRICS).read_text().splitlines() if line.strip()]
    curve = [[r["step"], r["dev_loss"]] for r in rows if "dev_loss" in r]
    return {"dev": float(res.metrics["dev_loss"]), "test": float(res.metrics["test_loss"]),
            "train": float(res.metrics["train_loss"]), "params": int(res.metrics["params"]),
            "seconds": float(res.metrics["seconds"]), "curve": curve}


def run(quick: bool = False, out=RESULTS) -> dict:
    data = "census-first" if quick else str(names_txt())
    lrs = (2.0**-8, 2.0**-6) if quick else LRS
    sweep_steps, steps, widths = (20, 30, (64,)) if quick else (SWEEP_STEPS, STEPS, WIDTHS)
    home = Path(out) / ("names-goal-quick" if quick else "names-goal")

    def one(spec):
        rc = config(data, spec["width"], spec["lr"], spec["steps"], quick)
        return trained(rc, home / f"w{spec['width']}-lr{spec['lr']:.6g}-s{spec['steps']}")

    check_width = 48 if quick else CHECK_WIDTH

    def fits(specs):  # every width's memory, before the first run (the data read once, the models from shapes)
        rc = config(data, BASE_WIDTH, lrs[0], steps, quick)
        build = widths_of(rc, BASE_WIDTH)
        check_sweep_fits([(f"width {w}", build("mup", w), rc.train) for w in dict.fromkeys(s["width"] for s in specs)],
                         runs.prepare(rc).splits)

    narrow = sweep([{"width": BASE_WIDTH, "lr": lr, "steps": sweep_steps} for lr in lrs], one, out=home, log=progress,
                   check=lambda pending: fits(pending + [{"width": w, "lr": lrs[0], "steps": steps}
                                                         for w in (check_width, *widths)]))
    best = min(narrow, key=lambda r: r["dev"])
    lr = best["spec"]["lr"]
    checked = sweep([{"width": check_width, "lr": v, "steps": sweep_steps} for v in (lr / 2, lr, lr * 2)], one,
                    out=home, log=progress)
    wide = sweep([{"width": w, "lr": lr, "steps": steps} for w in widths], one, out=home, log=progress)
    rows = [{"width": r["spec"]["width"], "lr": r["spec"]["lr"], "steps": r["spec"]["steps"], "params": r["params"],
             "train": r["train"], "dev": r["dev"], "test": r["test"], "seconds": r["seconds"]}
            for r in narrow + checked + wide]
    curves = [{"width": r["spec"]["width"], **{f"dev at {s:,}": d for s, d in r["curve"]}} for r in wide]
    check_best = min(checked, key=lambda r: r["dev"])["spec"]["lr"]
    text = (f"The sweep at the base width ({BASE_WIDTH}; {sweep_steps:,} steps), the check at width {check_width} "
            f"(best {check_best:.6g} against the base width's {lr:.6g}) and the transfer to "
            + ", ".join(map(str, widths)) + f" at the base width's best rate ({steps:,} steps)\n\n"
            + table(rows, list(rows[0])) + "\n\nThe wide runs' dev curves\n\n" + table(curves, list(curves[0])))
    return {"name": "names_goal", "rows": rows, "best_lr": lr, "check_best_lr": check_best,
            "curves": [r["curve"] for r in wide], "table": text, "data": data}


def plot(result: dict, path) -> Path:
    from jnnex.plot import panels

    full = max(r["steps"] for r in result["rows"])

    def sweep_panel(ax):
        short = [r for r in result["rows"] if r["steps"] < full]
        for width in dict.fromkeys(r["width"] for r in short):
            pts = [(r["lr"], r["dev"]) for r in short if r["width"] == width]
            ax.semilogx(*zip(*pts), "o-", base=2, label=f"width {width}")
        ax.set(title="dev against learning rate (the sweep's length)", xlabel="learning rate", ylabel="dev")
        ax.legend(fontsize=7)

    def curve_panel(ax):
        wide = result["rows"][-len(result["curves"]):]  # (the full-length runs come last, in the curves' order)
        for r, curve in zip(wide, result["curves"]):
            ax.plot(*zip(*curve), "o-", label=f"width {r['width']} ({r['params']:,} parameters)")
        ax.axhline(1.90, color="k", ls=":", label="the goal, 1.90")
        ax.axhline(1.9255, color="gray", ls="--", label="Llama improved (Muon), 1.9255")
        ax.set(title=f"μP at the sweep's best rate, {result['best_lr']:.4g}: dev", xlabel="step", ylabel="dev")
        ax.legend(fontsize=7)

    return panels(path, [sweep_panel, curve_panel], (11, 3.8))
