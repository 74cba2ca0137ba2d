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

        @jax.jit  # (the probe one compiled program, not an eager op at a time)
        def probe(params, state):
            out = model.forward(params, state, x, train=False)
            layers = {f"block {i}": a for i, a in enumerate(out.acts)}
            layers["logits"] = out.logits
            return {name: jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32)))) for name, a in layers.items()}

        for t in range(1, steps + 1):
            ts, _ = step(ts, (x, y), jax.random.key(t))
            rows += [{"width": width, "step": t, "layer": name, "rms": float(v)}
                     for name, v in probe(ts.params, ts.state).items()]
    last = [r for r in rows if r["step"] == steps]
    slopes = {}
    for layer in dict.fromkeys(r["layer"] for r in last):
        w = np.log([r["width"] for r in last if r["layer"] == layer])
        v = np.log([r["rms"] for r in last if r["layer"] == layer])
        slopes[layer] = float(np.polyfit(w, v, 1)[0])
    return {"rows": rows, "slopes": slopes, "widths": list(widths), "steps": steps, "lr": lr}


# ----------------------------------------------------------------------------------------------------------------------
# Learning-rate transfer: the best rate against width, under each parametrisation


def check_sweep_fits(runs: Sequence[tuple[str, object, TrainConfig]], splits, *, available: int | None = None) -> list:
    """Every run of a sweep, ``(label, model, tcfg)``, estimated (:func:`jnnex.memory.training_estimate`: shapes
    only, nothing computed) against ``available`` bytes (default: this machine's) before the sweep starts; a
    ``ValueError`` naming the first that would not fit, with its figure — so that a sweep does not fail hours in, at
    its widest model. The estimates, in order."""
    from jnnex import memory, text

    available = memory.available_bytes() if available is None else available
    n_train = len(splits.train[0])
    out = []
    for label, model, tcfg in runs:
        data_bytes = n_train * text.token_dtype(model.vocab_size).itemsize if isinstance(splits, text.TextSplits) \
            else None
        need = memory.training_estimate(model, make_optimizer(tcfg, model), tcfg.batch_size or n_train, n_train,
                                        data_bytes=data_bytes)
        if need.total > available:
            raise ValueError(f"sweep: the run {label} needs about {need.describe()} to train at batch "
                             f"{tcfg.batch_size or n_train:,}, but {memory.gib(available)} are available (estimated "
                             f"before the sweep started: nothing has run); leave out the widths that do not fit, or "
                             f"lower the batch size")
        out.append(need)
    return out


def transfer_runs(widths: Sequence[int], lrs: Sequence[float], params: Sequence[str] = ("standard", "mup")) -> list:
    """Every (parametrisation, width, learning rate) of a sweep, in the order it runs: narrow widths first."""
    return [(p, w, lr) for w in widths for p in params for lr in lrs]


def _fit(model, splits, tcfg: TrainConfig):
    """:func:`jnnex.train.fit`, and a ``KeyboardInterrupt`` when it was stopped (Ctrl-C, SIGTERM): a sweep's row is
    written only for a run that finished, so the stopped one runs again when the sweep is started again."""
    from jnnex.train import fit

    result = fit(model, splits, tcfg)
    if result.interrupted:
        raise KeyboardInterrupt("the sweep was stopped; start it again to continue (the finished runs are kept)")
    return result


def _key(param: str, width: int, lr: float) -> str:
    return f"{param}/{width}/{lr:.6g}"


def lr_transfer(build: Callable, splits, tcfg: TrainConfig, widths: Sequence[int], lrs: Sequence[float], *,
                out=None, log: Callable[[str], None] | None = None, params: Sequence[str] = ("standard", "mup"),
                available: int | None = None) -> dict:
    """Train ``build(param, width)`` for every parametrisation, width and learning rate with ``tcfg`` (its ``lr``
    replaced) on ``splits``, and read each run's validation loss at its end. ``out`` (a directory): each finished
    run's row is appended to ``out/transfer.jsonl`` as it ends (atomically, a line at a time), and a sweep started
    again reads them back and runs only what is missing — a sweep interrupted anywhere loses at most the run in
    flight. Before any run starts, every width's memory is estimated against ``available`` bytes (default: this
    machine's; :func:`check_sweep_fits`). Returns ``{"rows", "best"}``: ``best[param][width]`` the learning rate of the
    lowest validation loss."""
    import json
    from pathlib import Path

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
    pending = dict.fromkeys((p, w) for p, w, lr in runs if _key(p, w, lr) not in done)
    check_sweep_fits([(f"{p} width {w}", build(p, w), tcfg) for p, w in pending], splits, available=available)
    for i, (param, width, lr) in enumerate(runs, 1):
        key = _key(param, width, lr)
        if key in done:
            rows.append(done[key])
            continue
        model = build(param, width)
        result = _fit(model, splits, dataclasses.replace(tcfg, lr=float(lr)))
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

    def terms(theta):
        e, a, b, alpha, beta = theta
        return np.stack([np.full_like(N, e), a - alpha * np.log(N), b - beta * np.log(D)])

    def residuals(theta):
        return np.logaddexp.reduce(terms(theta), axis=0) - np.log(L)

    def jacobian(theta):  # d logsumexp(t) = softmax(t) · dt: by hand, in place of 5 residuals more an iteration
        t = terms(theta)
        w = np.exp(t - np.logaddexp.reduce(t, axis=0))
        return np.stack([w[0], w[1], w[2], -w[1] * np.log(N), -w[2] * np.log(D)], axis=1)

    best = None
    for alpha in (0.2, 0.5, 1.0):
        for beta in (0.2, 0.5, 1.0):
            for e in (-1.0, 0.0, 0.5):
                for a in (0.0, 5.0, 10.0):
                    fit = least_squares(residuals, [e, a, a, alpha, beta], jac=jacobian, loss="huber", f_scale=1e-3,
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


def optimal_size(fit: dict, C) -> tuple:
    """The law's compute-optimal ``(N, D)`` at ``C`` FLOPs (``C = 6 N D``): ``N_opt = G (C/6)^a``, ``G = (α A /
    (β B))^(1/(α+β))`` (Hoffmann et al. 2022, eq. 4)."""
    a = compute_optimal(fit)["a"]
    G = (fit["alpha"] * fit["A"] / (fit["beta"] * fit["B"])) ** (1 / (fit["alpha"] + fit["beta"]))
    N = G * (np.asarray(C, float) / 6) ** a
    return N, np.asarray(C, float) / (6 * N)


def near_budget(rows: list[dict], C: float) -> list[dict]:
    """The runs (``{"N", "D", ...}``) whose ``6 N D`` is within a factor √2 of the budget ``C``: its IsoFLOP
    profile."""
    return [r for r in rows if abs(math.log(6 * r["N"] * r["D"] / C)) <= math.log(2) / 2]


def isoflop(rows: list[dict], budgets: Sequence[float]) -> list[dict]:
    """Chinchilla's approach 2 on measured runs: for each compute budget ``C`` (FLOPs, ``6 N D``), the runs whose
    ``6 N D`` is within a factor √2 of it, a parabola in ``log N`` through their losses, and its minimum: the
    compute-optimal ``N`` at that budget (``None`` where fewer than 3 runs fall near it, the parabola opens down, or
    its minimum lies outside the runs' ``N``: an extrapolation, not a measurement)."""
    out = []
    for C in budgets:
        near = near_budget(rows, C)
        if len({r["N"] for r in near}) < 3:
            out.append({"C": C, "N_opt": None, "runs": len(near)})
            continue
        x = np.log([r["N"] for r in near])
        c2, c1, c0 = np.polyfit(x, [r["loss"] for r in near], 2)
        n_opt = float(np.exp(-c1 / (2 * c2))) if c2 > 0 else None
        if n_opt is not None and not min(r["N"] for r in near) <= n_opt <= max(r["N"] for r in near):
            n_opt = None
        out.append({"C": C, "N_opt": n_opt, "runs": len(near), "loss_at_opt": (c0 - c1**2 / (4 * c2)) if c2 > 0
                    else None, "parabola": [float(c2), float(c1), float(c0)],
                    "N_range": [min(r["N"] for r in near), max(r["N"] for r in near)]})
    return out


def sweep(specs: Sequence[dict], run: Callable[[dict], dict], *, out=None, name: str = "sweep",
          log: Callable[[str], None] | None = None, check: Callable[[list[dict]], object] | None = None) -> list[dict]:
    """``run(spec)`` for every spec, each finished run's row (the spec and what ``run`` returned) appended to
    ``out/name.jsonl`` as it ends; a sweep started again reads the rows back and runs only the specs missing — an
    interruption anywhere loses at most the run in flight. ``check(specs)``, if given, sees the specs still to run
    before the first starts (the memory estimate: :func:`check_sweep_fits`), and may refuse them by raising. Returns
    the rows in the specs' order."""
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
    if check is not None:
        check([spec for spec in specs if json.dumps(spec, sort_keys=True) not in done])
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


# ----------------------------------------------------------------------------------------------------------------------
# The law's sweep, and every sweep from a run's settings (``jnnex scale``)


def tokens_per_step(model, splits, batch_size: int | None) -> float:
    """The tokens one training step predicts: ``batch × block`` on a text; on words, the batch's rows times the
    mean predicted characters a row of the train split (the whole split when ``batch_size`` is ``None``)."""
    from jnnex import text

    if isinstance(splits, text.TextSplits):
        return float(batch_size * model.block_size)
    X, Y = splits.train
    per_row = float(np.sum(np.asarray(Y) >= 0)) / len(Y)
    return (len(Y) if batch_size is None else batch_size) * per_row


def step_flops(model, tcfg: TrainConfig, batch: int) -> float:
    """XLA's FLOP count of one compiled training step (forward, backward, the optimiser) at ``batch`` rows."""
    opt = make_optimizer(tcfg, model)
    ts = jax.eval_shape(lambda k: init_train_state(model, opt, k), jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch, model.block_size), jnp.int32)
    return float(jax.jit(make_step(model, opt)).lower(ts, (x, x), jax.random.key(0)).compile()
                 .cost_analysis()["flops"])


def law_sweep(build: Callable[[int], object], splits, tcfg: TrainConfig, widths: Sequence[int],
              step_counts: Sequence[int] = (), *, budgets: Sequence[float] = (), predict: dict | None = None,
              out=None, name: str = "sweep", log: Callable[[str], None] | None = None,
              available: int | None = None) -> dict:
    """Train ``build(width)`` for ``steps`` steps of ``tcfg`` (its schedule fitted to each run's own end, warmup at
    most a quarter of it) for every width and step count — and, for each compute budget ``C`` of ``budgets``
    (FLOPs), every width for the steps that spend it (``C / (6 N · tokens a step)``, rounded): an IsoFLOP profile,
    whose parabola's minimum is that budget's compute-optimal size; fit the law to the final validation losses
    (:func:`fit_law`), read IsoFLOP minima (:func:`isoflop`), and — when ``predict`` (``{"width", "steps"}``) is
    given — predict that run's loss from the fit, then run it. Each run's row goes to ``out/name.jsonl`` as it ends
    (:func:`sweep`; ``held_out.jsonl`` for the predicted run), so a sweep started again runs only what is missing;
    every width's memory is estimated before the first run (:func:`check_sweep_fits`).

    A row: ``N`` (every parameter), ``D`` (``steps`` × :func:`tokens_per_step`), ``loss``, ``flops_6ND`` and
    ``flops_xla`` (XLA's count of the step, times the steps)."""
    import functools

    from jnnex.lm import count_params

    per_step = tokens_per_step(build(widths[0]), splits, tcfg.batch_size)
    flops_of = functools.cache(lambda width: step_flops(build(width), tcfg, tcfg.batch_size or len(splits.train[0])))

    def train_one(spec):
        model = build(spec["width"])
        run_cfg = dataclasses.replace(tcfg.with_steps(spec["steps"]), eval_every=spec["steps"],
                                      chunk=min(500, spec["steps"]), warmup=min(tcfg.warmup, spec["steps"] // 4))
        result = _fit(model, splits, run_cfg)
        params = count_params(result.ts.params)
        last = result.evals[-1]
        D = spec["steps"] * per_step
        return {"N": float(params), "D": float(D), "loss": float(last.get("val_loss", last.get("dev_loss"))),
                "flops_6ND": 6.0 * params * D, "flops_xla": flops_of(spec["width"]) * spec["steps"]}

    def fits(specs):
        check_sweep_fits([(f"width {w}", build(w), tcfg) for w in dict.fromkeys(s["width"] for s in specs)], splits,
                         available=available)

    @functools.cache
    def n_params(width):
        return float(count_params(jax.eval_shape(lambda k: build(width).init(k)[0], jax.random.key(0))))

    specs = [{"width": w, "steps": s} for w in widths for s in step_counts]
    for C in budgets:
        for w in widths:
            spec = {"width": w, "steps": max(1, round(C / (6 * n_params(w) * per_step)))}
            if spec not in specs:
                specs.append(spec)
    rows = [{**r["spec"], **{k: v for k, v in r.items() if k != "spec"}}
            for r in sweep(specs, train_one, out=out, name=name, log=log,
                           check=lambda pending: fits(pending + ([predict] if predict else [])))]
    fitted = fit_law([r["N"] for r in rows], [r["D"] for r in rows], [r["loss"] for r in rows])
    result = {"rows": rows, "fit": fitted, "compute_optimal": compute_optimal(fitted)}
    budgets = list(budgets) or [10**b for b in sorted({round(math.log10(r["flops_6ND"]) * 4) / 4 for r in rows})]
    result["isoflop"] = iso = isoflop(rows, budgets)
    for r in iso:  # where the law puts each budget's optimum: inside the runs' sizes, or not
        r["N_opt_law"], r["D_opt_law"] = (float(v) for v in optimal_size(fitted, r["C"]))
    found = [r for r in iso if r["N_opt"]]
    result["isoflop_a"] = float(np.polyfit(np.log([r["C"] for r in found]), np.log([r["N_opt"] for r in found]), 1)[0]) \
        if len(found) >= 3 else None  # (fewer than 3 budgets with a minimum inside the runs: not determined)
    if predict:
        N, D = n_params(predict["width"]), float(predict["steps"] * per_step)
        predicted = float(law(fitted, N, D))  # before the run
        if log is not None:
            log(f"predicted before the run: width {predict['width']}, {predict['steps']:,} steps (N {N:,.0f}, "
                f"D {D:,.0f}): loss {predicted:.4f}")
        measured = sweep([predict], train_one, out=out, name="held_out", log=log)[0]["loss"]
        result["held_out"] = {**predict, "N": N, "D": D, "predicted": predicted, "measured": measured,
                              "error": predicted / measured - 1}
    return result


SWEEPS = ("coord", "transfer", "law")


def widths_of(rc, base_width: int | None) -> Callable[[str, int], object]:
    """``build(param, width)``: the run ``rc``'s model (a GPT or a Llama) at ``width`` (n_embd) under ``param``
    (μP's base width ``base_width``), on the run's gradients."""
    from jnnex.models.registry import get_spec

    spec = get_spec(rc.model)
    if not hasattr(rc.model_config, "param"):
        raise ValueError(f"scale: model {rc.model!r} has no μP parametrisation (gpt and llama have one)")

    def build(param: str, width: int):
        model = spec.build(dataclasses.replace(rc.model_config, n_embd=width, param=param,
                                               base_width=base_width if param == "mup" else None))
        return model if model.gradients == rc.gradients else model.with_gradients(rc.gradients)

    return build


def _first_batch(splits, rows: int, block: int):
    """The train split's first ``rows`` examples (a text's first windows), as arrays."""
    from jnnex import text

    if isinstance(splits, text.TextSplits):  # the first whole windows, end to end: every target scored
        x, y = text.exact_windows(np.asarray(splits.train.tokens[: rows * block + 1]), block, stride=block)
        return jnp.asarray(x), jnp.asarray(y)
    X, Y = splits.train
    return jnp.asarray(X[:rows]), jnp.asarray(Y[:rows])


def _differences(a, b, where: str = "") -> list[str]:
    """The places (``run.model_config.n_layer``) where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b))
                for d in _differences(a.get(key), b.get(key), f"{where}.{key}" if where else key)]
    return [] if a == b else [where]


def _at(value, where: str):
    for part in where.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _recorded(out, settings: dict) -> None:
    """``out/scale.json``: a sweep's settings, written when it first starts; a sweep started again in ``out`` must
    agree with them (its grid may grow: the runs already made are keyed by their grid point)."""
    import json
    from pathlib import Path

    from jnnex import rundir

    path = Path(out) / "scale.json"
    settings = json.loads(json.dumps(settings))  # (as it is written: tuples as lists)
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not JSON ({e}); it records the sweep made in that directory") from None
        grid = ("widths", "lrs", "step_counts", "budgets", "params", "predict")
        kept = {k: v for k, v in before.items() if k not in grid}
        differ = [d for d in _differences(kept, {k: v for k, v in settings.items() if k not in grid})
                  if d not in ("run.data", "run.data_path")]  # (where the data is may differ: its sha256 may not)
        if differ:
            said = "; ".join(f"{where} {json.dumps(_at(before, where))[:80]} there, "
                             f"{json.dumps(_at(settings, where))[:80]} here" for where in differ[:4])
            raise ValueError(f"--out {str(out)!r} holds a sweep made with other settings ({path.name}: {said}"
                             f"{'; …' if len(differ) > 4 else ''}); give another --out, or the same settings (a sweep "
                             f"continued may add widths, rates and step counts)")
    rundir.write_json(path, settings)


def run_sweep(kind: str, rc, *, widths: Sequence[int], params: Sequence[str] = ("standard", "mup"),
              base_width: int | None = None, lrs: Sequence[float] | None = None,
              step_counts: Sequence[int] | None = None, budgets: Sequence[float] | None = None,
              predict: dict | None = None, coord_steps: int = 5,
              coord_lr: float = 3e-3, out, log: Callable[[str], None] | None = None,
              available: int | None = None) -> dict:
    """The sweep ``kind`` (``coord``, ``transfer`` or ``law``) of the run ``rc``'s model at ``widths``, kept in the
    directory ``out`` (its settings in ``scale.json``, the runs in ``<kind>.jsonl``; what ``jnnex scale`` calls).
    ``base_width``: μP's (default: the narrowest width). ``law`` trains under ``rc``'s own parametrisation."""
    from jnnex.bench.harness import table
    from jnnex.run import prepare

    if kind not in SWEEPS:
        raise ValueError(f"scale: unknown sweep {kind!r}; expected one of {', '.join(SWEEPS)}")
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"--widths: give at least two widths, got {widths}")
    base_width = min(widths) if base_width is None else base_width
    if kind == "transfer" and not lrs:
        raise ValueError("--lrs: a transfer sweep needs the learning rates (e.g. 2^-12:-4)")
    if kind == "law" and len(widths) * (len(step_counts or ()) + len(budgets or ())) < 5:
        raise ValueError(f"--step-counts: a law needs at least 5 runs (widths × (step counts + budgets)), got "
                         f"{len(widths)} × ({len(step_counts or ())} + {len(budgets or ())})")
    if kind == "law":
        params, base_width = (rc.model_config.param,), rc.model_config.base_width
    settings = {"sweep": kind, "run": rc.to_json(), "base_width": base_width, "widths": widths,
                "params": list(params), "lrs": None if lrs is None else [float(v) for v in lrs],
                "step_counts": None if step_counts is None else list(step_counts),
                "budgets": None if budgets is None else [float(v) for v in budgets], "predict": predict,
                **({"coord_steps": coord_steps, "coord_lr": coord_lr} if kind == "coord" else {})}
    build = widths_of(rc, base_width)
    for param in params:  # every width's config is checked (a width the heads do not divide) before anything runs
        for width in widths + ([predict["width"]] if predict else []):
            try:
                build(param, width)
            except ValueError as e:
                flag = "--widths" if width in widths else "--predict"
                raise ValueError(f"{flag}: width {width} ({param}): {e}") from None
    _recorded(out, settings)
    model, splits = prepare(rc)
    if kind == "coord":
        x, y = _first_batch(splits, 32, model.block_size)
        result = {p: coord_check(lambda w, p=p: build(p, w), widths, x, y, steps=coord_steps, lr=coord_lr)
                  for p in params}
        rows = [{"layer": layer, **{f"{p} slope": result[p]["slopes"][layer] for p in params}}
                for layer in result[params[0]]["slopes"]]
        return {"result": result, "rows": rows, "table": table(rows, list(rows[0]))}
    if kind == "transfer":
        result = lr_transfer(build, splits, rc.train, widths, lrs, out=out, log=log, params=params,
                             available=available)
        rows = []
        for param in params:
            best = result["best"][param]
            for width, lr in best.items():
                grid = {r["lr"]: r["val_loss"] for r in result["rows"] if r["param"] == param and r["width"] == width}
                narrow = best.get(min(widths))
                rows.append({"param": param, "width": width, "best lr": lr, "best val": grid[lr],
                             "steps of 2 from the narrowest's best": None if narrow is None
                             else round(math.log2(lr / narrow))})
        return {"result": result, "rows": rows, "table": table(rows, list(rows[0]))}
    result = law_sweep(lambda w: build(params[0], w), splits, rc.train, widths, step_counts or (),
                       budgets=budgets or (), predict=predict, out=out, name="law", log=log, available=available)
    fitted = result["fit"]
    rows = [{"E": fitted["E"], "A": fitted["A"], "alpha": fitted["alpha"], "B": fitted["B"], "beta": fitted["beta"],
             "fit error (log rms)": fitted["residual"], "N_opt ∝ C^a: a": result["compute_optimal"]["a"],
             "a from IsoFLOP minima": result["isoflop_a"]}]
    text_ = table(result["rows"], ["width", "steps", "N", "D", "loss"]) + "\n\n" + table(rows, list(rows[0]))
    if budgets:
        iso = [{"C": r["C"], "runs": r["runs"], "N_opt (IsoFLOP minimum)": r["N_opt"],
                "N_opt (the law)": r["N_opt_law"]} for r in result["isoflop"]]
        text_ += "\n\n" + table(iso, list(iso[0])) + f"\n\nN_opt ∝ C^a from the minima: a = {result['isoflop_a']}"
    if predict:
        held = result["held_out"]
        text_ += "\n\n" + table([held], ["width", "steps", "N", "D", "predicted", "measured", "error"])
    return {"result": result, "rows": rows, "table": text_}
