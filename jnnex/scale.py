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
import math
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


# ----------------------------------------------------------------------------------------------------------------------
# A scaling law: L(N, D) = E + A / N^α + B / D^β (Hoffmann et al. 2022, "Chinchilla", approach 3)


def fit_law(N, D, L) -> dict:
    """The law fitted to losses ``L`` of models of ``N`` parameters trained on ``D`` tokens, as Chinchilla fits it:
    in log space (``log L`` against the log of the law's sum, ``logsumexp(e, a − α log N, b − β log D)``) with a
    Huber loss (δ = 10⁻³), from a grid of starting points, the best kept. ``{"E", "A", "B", "alpha", "beta",
    "residual"}``."""
    from scipy.optimize import least_squares

    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    if not (len(N) == len(D) == len(L) >= 5):
        raise ValueError(f"fit_law: give at least 5 runs (N, D, L of equal length), got {len(N)}, {len(D)}, {len(L)}")

    def residuals(theta):
        e, a, b, alpha, beta = theta
        terms = np.stack([np.full_like(N, e), a - alpha * np.log(N), b - beta * np.log(D)])
        return np.logaddexp.reduce(terms, axis=0) - np.log(L)

    best = None
    for alpha in (0.2, 0.5, 1.0):
        for beta in (0.2, 0.5, 1.0):
            for e in (-1.0, 0.0, 0.5):
                for a in (0.0, 5.0, 10.0):
                    fit = least_squares(residuals, [e, a, a, alpha, beta], loss="huber", f_scale=1e-3,
                                        bounds=([-5, -10, -10, 0.0, 0.0], [5, 40, 40, 3.0, 3.0]))
                    if best is None or fit.cost < best.cost:
                        best = fit
    e, a, b, alpha, beta = best.x
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": float(alpha),
            "beta": float(beta), "residual": float(np.sqrt(np.mean(residuals(best.x) ** 2)))}


def law(fit: dict, N, D):
    """The fitted law's loss at ``N`` parameters and ``D`` tokens."""
    return fit["E"] + fit["A"] / np.asarray(N, float) ** fit["alpha"] + fit["B"] / np.asarray(D, float) ** fit["beta"]


def compute_optimal(fit: dict) -> dict:
    """Under ``C = 6 N D``, the ``N`` minimising the law for each budget: ``N_opt ∝ C^a`` with ``a = β / (α + β)``
    (and ``D_opt ∝ C^b``, ``b = α / (α + β)``); Chinchilla's fit gives ``a ≈ b ≈ 0.5``."""
    a = fit["beta"] / (fit["alpha"] + fit["beta"])
    return {"a": a, "b": 1 - a}


def isoflop(rows: list[dict], budgets: Sequence[float]) -> list[dict]:
    """Chinchilla's approach 2 on measured runs: for each compute budget ``C`` (FLOPs, ``6 N D``), the runs whose
    ``6 N D`` is within a factor √2 of it, a parabola in ``log N`` through their losses, and its minimum: the
    compute-optimal ``N`` at that budget (``None`` where fewer than 3 runs fall near it, the parabola opens down, or
    its minimum lies outside the runs' ``N``: an extrapolation, not a measurement)."""
    out = []
    for C in budgets:
        near = [r for r in rows if abs(math.log(6 * r["N"] * r["D"] / C)) <= math.log(2) / 2]
        if len({r["N"] for r in near}) < 3:
            out.append({"C": C, "N_opt": None, "runs": len(near)})
            continue
        x = np.log([r["N"] for r in near])
        c2, c1, c0 = np.polyfit(x, [r["loss"] for r in near], 2)
        n_opt = float(np.exp(-c1 / (2 * c2))) if c2 > 0 else None
        if n_opt is not None and not min(r["N"] for r in near) <= n_opt <= max(r["N"] for r in near):
            n_opt = None
        out.append({"C": C, "N_opt": n_opt, "runs": len(near), "loss_at_opt": (c0 - c1**2 / (4 * c2)) if c2 > 0
                    else None})
    return out


def sweep(specs: Sequence[dict], run: Callable[[dict], dict], *, out=None, name: str = "sweep",
          log: Callable[[str], None] | None = None) -> list[dict]:
    """``run(spec)`` for every spec, each finished run's row (the spec and what ``run`` returned) appended to
    ``out/name.jsonl`` as it ends; a sweep started again reads the rows back and runs only the specs missing — an
    interruption anywhere loses at most the run in flight. Returns the rows in the specs' order."""
    import json
    from pathlib import Path

    path = None if out is None else Path(out) / f"{name}.jsonl"
    done: dict = {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # (a line torn by a kill: that run runs again)
                    continue
                done[json.dumps(row["spec"], sort_keys=True)] = row
    rows = []
    for i, spec in enumerate(specs, 1):
        key = json.dumps(spec, sort_keys=True)
        if key not in done:
            done[key] = {"spec": spec, **run(spec)}
            if path is not None:
                with path.open("a") as f:
                    f.write(json.dumps(done[key]) + "\n")
            if log is not None:
                log(f"[{i}/{len(specs)}] {spec}: " + ", ".join(f"{k} {v:.4g}" for k, v in done[key].items()
                                                               if isinstance(v, float)))
        rows.append(done[key])
    return rows
