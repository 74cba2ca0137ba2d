"""From toy to large, measured: μP's coordinate check (Yang et al. 2022, "Tensor Programs V", §C).

A parametrisation is *width-stable* if training moves each layer's activations by an amount that does not grow with
the width. The coordinate check measures it: models of several widths, each trained the same few Adam steps at the
same learning rate on the same batch, and after them the size (root mean square) of every block's output and of the
logits, against the width on log–log axes. Under the standard parametrisation the slopes grow with the steps (a
hidden matrix's update moves its output ``∝ fan-in``); under μP they stay near 0.

:func:`coord_check` runs it for any model family given as ``build(width) -> LanguageModel`` (the GPT with ``param``
``"standard"`` or ``"mup"`` and a fixed ``base_width``), through the one training step (:func:`jnnex.step.make_step`)
and the one optimiser (:func:`jnnex.optim.make_optimizer`, which applies μP's learning-rate multipliers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.optim import TrainConfig, make_optimizer
from jnnex.step import init_train_state, make_step


def rms(a) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32)))))


def coord_check(build: Callable, widths: Sequence[int], x, y, *, steps: int = 3, lr: float = 1e-2,
                optimizer: str = "adam", seed: int = 0) -> dict:
    """``{"rows": [{"width", "step", "layer", "rms"}], "slopes": {layer: slope}}``: for each width, the RMS of each
    block's output (``block i``) and of the logits after each of ``steps`` steps of ``optimizer`` at ``lr`` on the
    batch ``(x, y)``; ``slopes``: each layer's log–log slope of RMS against width after the last step."""
    if len(widths) < 2:
        raise ValueError(f"coord_check: give at least two widths, got {list(widths)}")
    rows = []
    for width in widths:
        model = build(width)
        opt = make_optimizer(TrainConfig(optimizer=optimizer, lr=lr, lr_boundaries=()), model)
        ts = init_train_state(model, opt, jax.random.key(seed))
        step = jax.jit(make_step(model, opt))
        for t in range(1, steps + 1):
            ts, _ = step(ts, (x, y), jax.random.key(t))
            out = model.forward(ts.params, ts.state, x, train=False)
            layers = {f"block {i}": a for i, a in enumerate(out.acts)}
            layers["logits"] = out.logits
            rows += [{"width": width, "step": t, "layer": name, "rms": rms(a)} for name, a in layers.items()]
    last = [r for r in rows if r["step"] == steps]
    slopes = {}
    for layer in dict.fromkeys(r["layer"] for r in last):
        w = np.log([r["width"] for r in last if r["layer"] == layer])
        v = np.log([r["rms"] for r in last if r["layer"] == layer])
        slopes[layer] = float(np.polyfit(w, v, 1)[0])
    return {"rows": rows, "slopes": slopes, "widths": list(widths), "steps": steps, "lr": lr}


# ----------------------------------------------------------------------------------------------------------------------
# Learning-rate transfer: the best rate against width, under each parametrisation


def transfer_runs(widths: Sequence[int], lrs: Sequence[float], params: Sequence[str] = ("standard", "mup")) -> list:
    """Every (parametrisation, width, learning rate) of a sweep, in the order it runs: narrow widths first."""
    return [(p, w, lr) for w in widths for p in params for lr in lrs]


def _key(param: str, width: int, lr: float) -> str:
    return f"{param}/{width}/{lr:.6g}"


def lr_transfer(build: Callable, splits, tcfg: TrainConfig, widths: Sequence[int], lrs: Sequence[float], *,
                out=None, log: Callable[[str], None] | None = None, params: Sequence[str] = ("standard", "mup")) -> dict:
    """Train ``build(param, width)`` for every parametrisation, width and learning rate with ``tcfg`` (its ``lr``
    replaced) on ``splits``, and read each run's validation loss at its end. ``out`` (a directory): each finished
    run's row is appended to ``out/transfer.jsonl`` as it ends (atomically, a line at a time), and a sweep started
    again reads them back and runs only what is missing — a sweep interrupted anywhere loses at most the run in
    flight. Returns ``{"rows", "best"}``: ``best[param][width]`` the learning rate of the lowest validation loss."""
    import json
    from pathlib import Path

    from jnnex.train import fit

    done: dict = {}
    path = None if out is None else Path(out) / "transfer.jsonl"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # (a line torn by a kill: that run runs again)
                    continue
                done[_key(row["param"], row["width"], row["lr"])] = row
    rows = []
    runs = transfer_runs(widths, lrs, params)
    for i, (param, width, lr) in enumerate(runs, 1):
        key = _key(param, width, lr)
        if key in done:
            rows.append(done[key])
            continue
        model = build(param, width)
        result = fit(model, splits, dataclasses.replace(tcfg, lr=float(lr)))
        last = result.evals[-1] if result.evals else {}
        val = last.get("val_loss", last.get("dev_loss", float("nan")))
        row = {"param": param, "width": width, "lr": float(lr), "val_loss": float(val),
               "train_loss": float(np.mean(result.losses[-20:])) if len(result.losses) else float("nan"),
               "steps": tcfg.steps}
        rows.append(row)
        if path is not None:
            with path.open("a") as f:  # one line per finished run: a torn last line is skipped on reading
                f.write(json.dumps(row) + "\n")
        if log is not None:
            log(f"[{i}/{len(runs)}] {param:8s} width {width:4d} lr {lr:.4g}: val {row['val_loss']:.4f}")
    best: dict = {}
    for param in params:
        best[param] = {}
        for width in widths:
            cands = [r for r in rows if r["param"] == param and r["width"] == width and np.isfinite(r["val_loss"])]
            if cands:
                best[param][width] = min(cands, key=lambda r: r["val_loss"])["lr"]
    return {"rows": rows, "best": best, "widths": list(widths), "lrs": [float(v) for v in lrs]}
