"""The shared training machinery: one jitted step, many steps per compiled call, evaluation, checkpoints, resume.

Every language model in jnnex trains through this module, whether its gradients come from ``jax.grad`` or from a
hand-written backward (``LanguageModel.grad_fn``). The pieces, from the inside out:

* :func:`make_step` — ``step(ts, batch, key) -> (ts, metrics)``: one optax update. ``ts`` is a :class:`TrainState`
  (params, model state such as BatchNorm's running statistics, optimiser state, step counter).
* :func:`make_run` — ``run(ts, X, Y, key, n_steps)``: ``n_steps`` steps inside one compiled ``lax.scan``. Each step
  draws its minibatch *inside* the compiled code from ``fold_in(key, step)``, so which examples a step sees depends
  only on the key and the step number — not on how the run was cut into calls. That is what makes resume exact.
* :func:`fit` — the Python loop around ``run``: progress bar, periodic evaluation, JSON-lines metrics, atomic
  checkpoints, resume, a clear error on a non-finite loss, and Ctrl-C that saves before it exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jnnex import checkpoint
from jnnex.lm import LanguageModel, evaluate


class TrainState(NamedTuple):
    params: Any
    state: Any  # model state that is not learned by gradient (BatchNorm running stats); () if none
    opt_state: Any
    step: jax.Array  # () int32, the number of steps taken


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults are the makemore MLP lecture's."""

    steps: int = 200_000  # total optimisation steps
    batch_size: int | None = 32  # minibatch size; None = the whole training set every step
    lr: float = 0.1  # initial learning rate
    lr_boundaries: tuple[int, ...] = (100_000,)  # steps at which the learning rate is multiplied by lr_factor
    lr_factor: float = 0.1
    optimizer: str = "sgd"  # sgd | momentum | adam | adamw
    weight_decay: float = 0.0  # adamw's decoupled weight decay
    eval_every: int = 20_000  # evaluate train/dev loss (and checkpoint) every this many steps, and at the end
    chunk: int = 1_000  # steps per compiled call; checkpoints fall on multiples of it
    seed: int = 0

    def __post_init__(self):
        def positive_int(name, v):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")

        positive_int("steps", self.steps)
        positive_int("eval_every", self.eval_every)
        positive_int("chunk", self.chunk)
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if sorted(self.lr_boundaries) != list(self.lr_boundaries):
            raise ValueError(f"lr_boundaries must be increasing, got {self.lr_boundaries}")


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda lr, wd: optax.sgd(lr),
    "momentum": lambda lr, wd: optax.sgd(lr, momentum=0.9),
    "adam": lambda lr, wd: optax.adam(lr),
    "adamw": lambda lr, wd: optax.adamw(lr, weight_decay=wd),
}


def lr_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """Piecewise-constant: ``lr`` until the first boundary, × ``lr_factor`` from each (the lecture's 0.1 → 0.01).

    Same values as ``optax.piecewise_constant_schedule``, written without its int/float mixing so it also runs under
    strict dtype promotion; the result is weakly typed and follows the parameters' dtype.
    """

    def schedule(count):
        lr = tcfg.lr
        for boundary in tcfg.lr_boundaries:
            lr = lr * jnp.where(count >= boundary, tcfg.lr_factor, 1.0)
        return lr

    return schedule


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    return OPTIMIZERS[tcfg.optimizer](lr_schedule(tcfg), tcfg.weight_decay)


# ----------------------------------------------------------------------------------------------------------------------
# The compiled core


def make_step(model: LanguageModel, optimizer: optax.GradientTransformation) -> Callable:
    """``step(ts, batch, key) -> (ts, metrics)``: one update from ``model.value_and_grad`` (hand-written if the model
    has a ``grad_fn``, else ``jax.grad``). Pure; jit it or scan it. ``key`` is reserved for stochastic layers."""

    def step(ts: TrainState, batch, key):
        del key  # no stochastic layers yet (dropout would use it)
        x, y = batch
        loss, grads, new_state = model.value_and_grad(ts.params, ts.state, x, y)
        # optax mixes integer step counts with float constants internally; our code stays under the caller's
        # (possibly strict) promotion rules, the optimiser's under the standard ones.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        return TrainState(params, new_state, opt_state, ts.step + 1), {"loss": loss}

    return step


def make_run(step: Callable, batch_size: int | None, *, unroll: int = 4) -> Callable:
    """``run(ts, X, Y, key, n_steps) -> (ts, metrics)``, jitted: ``n_steps`` steps of ``step`` in one ``lax.scan``.

    Step ``s`` draws ``batch_size`` example indices uniformly (with replacement, as the lecture's ``randint``) from
    ``fold_in(key, s)``. The draws of all ``n_steps`` steps are made up front by one vectorised call (``vmap`` over the
    step numbers gives the same bits as drawing inside each step, three times faster on a CPU). ``metrics`` holds each
    step's metrics stacked along a leading (n_steps,) axis. Compiles once per (shapes, n_steps). ``ts`` is not
    donated: after a Ctrl-C mid-call the caller still holds a live state to save.
    """

    def run(ts: TrainState, X, Y, key, n_steps: int):
        def step_keys(s):
            k_batch, k_step = jax.random.split(jax.random.fold_in(key, s))
            if batch_size is None:
                return jnp.zeros((0,), jnp.int32), k_step
            return jax.random.randint(k_batch, (batch_size,), 0, X.shape[0], dtype=jnp.int32), k_step  # (B,)

        IX, keys = jax.vmap(step_keys)(ts.step + jnp.arange(n_steps, dtype=jnp.int32))  # (n, B), (n,)

        def body(ts, ix_key):
            ix, k_step = ix_key
            batch = (X, Y) if batch_size is None else (X[ix], Y[ix])  # (B, T), (B,)
            return step(ts, batch, k_step)

        return jax.lax.scan(body, ts, (IX, keys), unroll=min(unroll, n_steps))

    return jax.jit(run, static_argnames="n_steps")


def init_train_state(model: LanguageModel, optimizer: optax.GradientTransformation, key) -> TrainState:
    """Fresh parameters, model state and optimiser state; compiled as one program (eager init compiles every op)."""

    @jax.jit
    def init(key):
        params, state = model.init(key)
        with jax.numpy_dtype_promotion("standard"):  # see make_step
            opt_state = optimizer.init(params)
        return TrainState(params, state, opt_state, jnp.zeros((), jnp.int32))

    return init(key)


def _keys(seed: int):
    k_init, k_train = jax.random.split(jax.random.key(seed))
    return k_init, k_train


# ----------------------------------------------------------------------------------------------------------------------
# The loop


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; ``step`` is the first bad step (0-based)."""

    def __init__(self, step: int, loss: float, checkpoint_step: int | None):
        self.step = step
        where = f"; the last good checkpoint (step {checkpoint_step}) is kept" if checkpoint_step is not None else ""
        super().__init__(
            f"loss became {loss} at step {step}{where}. Lower the learning rate or check the data/initialisation."
        )


@dataclasses.dataclass
class FitResult:
    ts: TrainState
    losses: np.ndarray  # (steps_run,) per-step training loss of this call (after a resume: from the resume point)
    evals: list[dict]  # the evaluation rows (also written to metrics.jsonl)
    metrics: dict = dataclasses.field(default_factory=dict)  # every per-step metric, stacked: (steps_run, ...)
    interrupted: bool = False
    seconds: float = 0.0


def fit(
    model: LanguageModel,
    train: tuple[np.ndarray, np.ndarray],
    tcfg: TrainConfig,
    *,
    dev: tuple[np.ndarray, np.ndarray] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    meta: dict | None = None,
    eval_train: bool = True,
    diagnostics: bool = False,
) -> FitResult:
    """Train ``model`` on ``train = (X, Y)`` for ``tcfg.steps`` steps.

    Every ``eval_every`` steps (and at the end) the full train and dev losses are computed, appended to
    ``out/metrics.jsonl`` and a checkpoint (``out/checkpoint.npz`` + ``out/config.json``) is written atomically.
    With ``resume=True`` training continues from ``out``'s checkpoint and ends with exactly the parameters an
    uninterrupted run would have. Ctrl-C stops at the last completed chunk, saves it and returns with
    ``interrupted=True``. ``diagnostics=True`` adds the per-layer figures of :mod:`jnnex.diagnostics` to every step's
    metrics (``FitResult.metrics``), computed inside the step.

    Raises:
        NonFiniteLossError: a step produced a NaN/inf loss (the last checkpoint is left as it was).
    """
    X, Y = (jnp.asarray(a, jnp.int32) for a in train)
    if X.ndim != 2 or X.shape[1] != model.block_size or Y.shape != X.shape[:1]:
        raise ValueError(f"train data: expected X (N, {model.block_size}) and Y (N,), got {X.shape} and {Y.shape}")
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(tcfg)
    if diagnostics:
        from jnnex.diagnostics import make_diagnostic_step

        step_fn = make_diagnostic_step(model, optimizer)
    else:
        step_fn = make_step(model, optimizer)
    run = make_run(step_fn, tcfg.batch_size)
    k_init, k_train = _keys(tcfg.seed)
    ts = init_train_state(model, optimizer, k_init)
    ckpt_step = None
    if resume:
        if out is None or not (out / "checkpoint.npz").is_file():
            raise ValueError(f"resume: no checkpoint in {str(out)!r}")
        ts = checkpoint.load_pytree(out / "checkpoint.npz", ts)
        ckpt_step = int(ts.step)
        _truncate_metrics(out / "metrics.jsonl", ckpt_step)
    schedule = lr_schedule(tcfg)

    def save(ts):
        nonlocal ckpt_step
        if out is None:
            return
        checkpoint.save_pytree(out / "checkpoint.npz", ts)
        checkpoint.write_json(
            out / "config.json",
            {**(meta or {}), "model": model.name, "model_config": dataclasses.asdict(model.cfg),
             "train_config": dataclasses.asdict(tcfg), "step": int(ts.step)},
        )
        ckpt_step = int(ts.step)

    def log_eval(ts, chunk_loss):
        row = {"step": int(ts.step), "lr": float(schedule(int(ts.step) - 1)), "loss": chunk_loss,
               "time": time.perf_counter() - t0}
        if eval_train:
            row["train_loss"] = evaluate(model, ts.params, ts.state, X, Y)
        if dev is not None:
            row["dev_loss"] = evaluate(model, ts.params, ts.state, *dev)
        evals.append(row)
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    start = int(ts.step)
    chunks, evals, interrupted = [], [], False
    bar = _progress(tcfg.steps, start, progress)
    t0 = time.perf_counter()
    step = start
    with _ctrl_c_ends_the_chunk() as ctrl_c:  # the first Ctrl-C lets the running chunk finish
        try:
            while step < tcfg.steps and not ctrl_c.pressed:
                # Chunks end on multiples of `chunk` and `eval_every`, so a resumed run makes the same calls.
                n = min(tcfg.chunk - step % tcfg.chunk, tcfg.eval_every - step % tcfg.eval_every, tcfg.steps - step)
                new_ts, metrics = run(ts, X, Y, k_train, n_steps=n)
                metrics = {k: np.asarray(v) for k, v in metrics.items()}
                chunk_losses = metrics["loss"]
                bad = np.flatnonzero(~np.isfinite(chunk_losses))
                if bad.size:
                    raise NonFiniteLossError(step + int(bad[0]), float(chunk_losses[bad[0]]), ckpt_step)
                ts, step = new_ts, step + n  # `ts` only ever holds a completed chunk: safe to save at any interrupt
                chunks.append(metrics)
                chunk_loss = float(chunk_losses.mean())
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix(loss=f"{chunk_loss:.4f}")
                if step % tcfg.eval_every == 0 or step == tcfg.steps:
                    row = log_eval(ts, chunk_loss)
                    save(ts)
                    if bar is not None and "dev_loss" in row:
                        bar.set_postfix(loss=f"{chunk_loss:.4f}", dev=f"{row['dev_loss']:.4f}")
        except KeyboardInterrupt:  # a second Ctrl-C, or fit() outside the main thread: keep the last completed chunk
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
        interrupted = interrupted or (ctrl_c.pressed and step < tcfg.steps)
    if interrupted:
        save(ts)
    stacked = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
    losses = stacked.get("loss", np.zeros((0,), np.float32))
    return FitResult(ts, losses, evals, metrics=stacked, interrupted=interrupted, seconds=time.perf_counter() - t0)


class _CtrlC:
    pressed = False


@contextlib.contextmanager
def _ctrl_c_ends_the_chunk():
    """The first Ctrl-C only sets a flag that :func:`fit` checks between chunks, so no ``KeyboardInterrupt`` lands in
    the middle of JAX's, numpy's or the checkpoint writer's code; the chunk in flight (a fraction of a second)
    finishes and is saved. A second Ctrl-C raises at once. A process that ignores SIGINT (``nohup``, a background job
    of a non-interactive shell) keeps ignoring it, and outside the main thread (signal handlers belong to it) Ctrl-C
    raises as usual."""
    flag = _CtrlC()
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous in (None, signal.SIG_IGN):
        yield flag
        return

    def handler(signum, frame):
        if flag.pressed:
            raise KeyboardInterrupt
        flag.pressed = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows written after the checkpoint (they will be written again)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", unit_scale=True, dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------------------------------------------------
# Learning-rate finder


def lr_find(
    model: LanguageModel,
    train: tuple[np.ndarray, np.ndarray],
    *,
    lo: float = 1e-3,
    hi: float = 1.0,
    steps: int = 1000,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The lecture's exponential learning-rate sweep: step ``i`` of one run uses ``lo·(hi/lo)^(i/(steps-1))``.

    Returns:
        ``(lrs (steps,), losses (steps,))``: the rate each step used and that step's minibatch loss. A good rate is a
        little below where the (smoothed) loss is lowest, before it blows up.
    """
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo!r}, hi={hi!r}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps!r}")
    lrs = jnp.asarray(np.geomspace(lo, hi, steps), jnp.float32)
    optimizer = optax.sgd(lambda count: lrs[jnp.minimum(count, steps - 1)])
    run = make_run(make_step(model, optimizer), batch_size)
    k_init, k_train = _keys(seed)
    X, Y = (jnp.asarray(a, jnp.int32) for a in train)
    _, metrics = run(init_train_state(model, optimizer, k_init), X, Y, k_train, n_steps=steps)
    return np.asarray(lrs), np.asarray(metrics["loss"])
