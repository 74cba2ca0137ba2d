"""The training loop: ``fit``, around the compiled core of :mod:`jnnex.step`, over the layout of
:mod:`jnnex.layout`.

Every language model in jnnex trains through :func:`fit`, whether its gradients come from ``jax.grad`` or from a
hand-written backward (``LanguageModel.value_and_grad_manual``, on ``gradients="manual"``), on one device or on
many (one :class:`jnnex.layout.Parallel` value). The loop runs chunks of steps in one compiled call each, evaluates
every ``eval_every`` steps, stops cleanly on a non-finite loss or a Ctrl-C, and hands each chunk to its hooks: the
run driver's (:mod:`jnnex.run`) write ``metrics.jsonl`` and the checkpoints, a progress bar shows progress. The loop
itself touches no file.

The compiled core is re-exported here: :class:`TrainState`, :func:`make_step`, :func:`make_run`,
:func:`init_train_state` (:mod:`jnnex.step`), and so are :class:`TrainConfig` and :func:`make_optimizer`
(:mod:`jnnex.optim`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jnnex.layout import Parallel, make_layout
from jnnex.lm import LanguageModel, check_batch, evaluate
from jnnex.parallel import local, start_together, tells_the_others
from jnnex.optim import TrainConfig, check_optimizer, lr_schedule, make_optimizer  # noqa: F401 (re-exported)
from jnnex.step import TrainState, init_train_state, initial_params, make_run, make_step, seed_keys  # noqa: F401
from jnnex.text import Stream, check_stream, estimate_loss, exact_windows


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; ``step`` is the first bad step (0-based)."""

    def __init__(self, step: int, loss: float, checkpoint_step: int | None = None):
        self.step, self.loss = step, loss
        where = f"; the last good checkpoint (step {checkpoint_step}) is kept" if checkpoint_step is not None else ""
        super().__init__(
            f"loss became {loss} at step {step}{where}. Lower the learning rate or check the data/initialisation."
        )


@dataclasses.dataclass
class FitResult:
    ts: TrainState
    losses: np.ndarray  # (steps_run,) per-step training loss of this call (after a resume: from the resume point)
    evals: list[dict]  # the evaluation rows (what a run directory's metrics.jsonl holds)
    metrics: dict = dataclasses.field(default_factory=dict)  # every per-step metric, stacked: (steps_run, ...)
    interrupted: bool = False
    signal: int | None = None  # what interrupted it: signal.SIGINT (Ctrl-C) or signal.SIGTERM
    start: int = 0  # the step this call started from (the checkpoint's, on resume)


class FitData(NamedTuple):
    """The training data as the compiled run reads it, and what an evaluation scores."""

    X: jax.Array  # (N, T) rows, or a text's tokens (N,) as stored
    Y: jax.Array  # (N,) or (N, T) targets; (0,) for a text
    window: int | None  # a text's rows: block_size (make_run's window), else None
    rows: int  # the rows (or token offsets) a minibatch draws from
    evaluate: Callable  # (params, state, key, tcfg) -> {metric: value}


def fit_data(model: LanguageModel, train, evals: dict, batch_size: int | None) -> FitData:
    """``train`` (rows ``(X, Y)``, or a text's :class:`jnnex.text.Stream`) checked and put on the device, and the
    evaluation of ``evals`` (``{name: rows or stream}``): a part's ``{name}_loss`` over every row (a stream's every
    token, :func:`jnnex.text.exact_windows`), and for a stream nanoGPT's ``{name}_loss_estimate`` (``eval_iters``
    random batches; the training stream's estimate alone: ``train_loss_estimate``)."""
    check_train_data(model, train, batch_size)
    stream = isinstance(train, Stream)
    if stream:  # the tokens as they are stored (uint16 for a vocabulary up to 65,536): widened row by row in the step
        X, Y = jnp.asarray(np.asarray(train.tokens)), jnp.zeros((0,), jnp.int32)
        window, rows = model.block_size, len(train.tokens) - model.block_size
    else:
        X, Y = (jnp.asarray(a, jnp.int32) for a in train)
        window, rows = None, len(train[0])
    scored = []
    for i, (name, part) in enumerate(evals.items()):
        if part is train:  # checked above, and on the device already
            scored.append((name, None, X, 1) if stream else (name, (X, Y), None, i))
        elif isinstance(part, Stream):
            check_stream(part, model.block_size, model.vocab_size, f"the {name} split")
            tokens = jnp.asarray(np.asarray(part.tokens))
            scored.append((name, exact_windows(np.asarray(part.tokens), model.block_size), tokens, i or 1))
        else:
            check_batch(model, *part, f"{name} data")
            scored.append((name, part, None, i))

    def evaluate_all(params, state, key, tcfg: TrainConfig) -> dict:
        row = {}
        for name, windows, tokens, i in scored:
            if windows is not None:
                row[f"{name}_loss"] = evaluate(model, params, state, *windows)
            if tokens is not None:
                k = key if name == "train" else jax.random.fold_in(key, i)
                row[f"{name}_loss_estimate"] = estimate_loss(model, params, state, tokens, k, tcfg.eval_iters,
                                                             tcfg.batch_size)
        return row

    return FitData(X, Y, window, rows, evaluate_all)


def _parts(data) -> tuple:
    """``(train, evals)`` of what :func:`fit` is given: a :class:`jnnex.data.Splits` or
    :class:`jnnex.text.TextSplits` (its first part trains, its first two are evaluated), or the training part alone
    (evaluated as ``train``)."""
    if hasattr(data, "parts") and hasattr(data, "names"):
        return data.parts[0], dict(list(zip(data.names, data.parts))[:2])
    return data, {"train": data}


@tells_the_others
def fit(
    model: LanguageModel,
    data,
    tcfg: TrainConfig,
    *,
    evals: dict | None = None,
    parallel: Parallel | None = None,
    resume_from: TrainState | None = None,
    hooks: Sequence = (),
    diagnostics: bool = False,
) -> FitResult:
    """Train ``model`` on ``data`` for ``tcfg.steps`` steps: rows ``(X, Y)``, a text's token
    :class:`jnnex.text.Stream`, or a whole :class:`jnnex.data.Splits` / :class:`jnnex.text.TextSplits` (its first
    part trains).

    Every chunk's mean minibatch loss is a row; every ``eval_every`` steps (and at the end) the losses of ``evals``
    join it (``{name: rows or stream}``; default: the training part as ``train``, and a split's second part by its
    name; ``{}``: none) — see :func:`fit_data`. A text stream trains on rows of ``block_size + 1`` contiguous tokens
    at random offsets (:func:`jnnex.step.make_run`'s ``window``).

    ``parallel`` (:class:`jnnex.layout.Parallel`; default one device): the scheme and its devices — data parallel,
    FSDP, tensor parallel, or any row of :data:`jnnex.layout.SCHEMES`; every scheme takes the same steps to the same
    result up to the order of float additions. After :func:`jnnex.parallel.initialize` the devices may span
    processes: every process calls ``fit`` alike. ``resume_from``: a training state (a checkpoint, in the parameters'
    own layout: saved on any layout, it resumes on any other) to continue from — the steps taken then are exactly an
    uninterrupted run's. ``diagnostics=True`` adds the per-layer figures of :mod:`jnnex.diagnostics` to every step's
    metrics (``FitResult.metrics``).

    ``hooks``: objects called as the loop goes — ``hook.chunk(step, row, metrics, here)`` after each chunk (``row``
    the chunk's metrics row, ``metrics`` its per-step arrays, ``here()`` this process's training state in the
    parameters' own layout) and ``hook.end(step, here)`` once it stops; a method a hook lacks is skipped, and a plain
    function is called as ``fn(step, metrics)`` after each chunk. A hook's ``due()``, if it has one, is asked first
    each chunk whether it will read the state (a checkpoint due by time): if any process's is, every process makes
    its copy of the state (``here``), which a state split across processes needs.
    :class:`ProgressBar` is one; the run driver's writers of ``metrics.jsonl`` and checkpoints are others. Ctrl-C or
    SIGTERM — at any moment, compilation included — stops after the chunk in flight and returns with
    ``interrupted=True`` (``FitResult.signal`` says which), after ``end``.

    Raises:
        NonFiniteLossError: a step produced a NaN/inf loss (``end`` is not called: nothing after it is kept).
    """
    check_optimizer(tcfg, model)
    train, default_evals = _parts(data)
    fd = fit_data(model, train, default_evals if evals is None else evals, tcfg.batch_size)
    hooks = [h for h in hooks if h is not None]
    chunks, rows, interrupted = [], [], False
    with ctrl_c_guard() as ctrl_c:  # in place before the first compile: the first Ctrl-C never raises
        k_init, k_train = seed_keys(tcfg.seed)
        k_eval = jax.random.fold_in(k_train, 0x7FFFFFFF)  # the loss estimates' batches: fixed per step, resumable
        optimizer = make_optimizer(tcfg, model)
        ts = init_train_state(model, optimizer, k_init) if resume_from is None else resume_from
        if int(ts.step) > tcfg.steps:
            raise ValueError(f"resume: the training state is at step {int(ts.step):,}, past the run's "
                             f"{tcfg.steps:,} steps")
        layout = make_layout(parallel or Parallel(), model, optimizer, ts, diagnostics=diagnostics)
        layout.check(ts, tcfg.batch_size, fd.rows, f"{'resuming' if resume_from is not None else 'training'} on "
                                                   f"{layout.mesh.size if layout.mesh else 1} device(s)")
        run = layout.run(tcfg.batch_size, fd.window)
        ts = layout.place(ts)  # split over the mesh from host arrays: any layout resumes into any other
        X, Y, k_run = layout.inputs(fd.X, fd.Y, jax.random.key_data(k_train))
        start_together()  # several processes: all set up, or all told which one stopped and why
        step = start = int(ts.step)
        stop, lr_at, t0 = 0, lr_schedule(tcfg), time.perf_counter()
        try:
            while step < tcfg.steps and not (stop := _stop_requested(ctrl_c)):
                # Chunks end on multiples of `chunk` and `eval_every`, so a resumed run makes the same calls.
                n = min(tcfg.chunk - step % tcfg.chunk, tcfg.eval_every - step % tcfg.eval_every, tcfg.steps - step)
                new_ts, metrics = run(ts, X, Y, k_run, n_steps=n)
                metrics = {k: np.asarray(v) for k, v in local(metrics).items()}
                bad = np.flatnonzero(~np.isfinite(metrics["loss"]))
                if bad.size:
                    raise NonFiniteLossError(step + int(bad[0]), float(metrics["loss"][bad[0]]))
                ts, step = new_ts, step + n  # `ts` only ever holds a completed chunk: safe to save at any interrupt
                chunks.append(metrics)
                here = _once(lambda ts=ts: layout.here(ts))
                row = {"step": step, "lr": float(lr_at(step - 1)), "loss": float(metrics["loss"].mean())}
                if step % tcfg.eval_every == 0 or step == tcfg.steps:
                    row["time"] = time.perf_counter() - t0
                    row.update(fd.evaluate(here().params, here().state, jax.random.fold_in(k_eval, step), tcfg))
                    rows.append(row)
                if _agreed(int(any([h.due() for h in hooks if hasattr(h, "due")]))):  # a checkpoint due by time
                    here()  # (every process takes part in gathering a split state; the writer reads it)
                for hook in hooks:
                    _call(hook, "chunk", step, row, metrics, here)
        except KeyboardInterrupt:  # a second Ctrl-C, or fit() outside the main thread: keep the last completed chunk
            interrupted = True
        stop = stop or ctrl_c.pressed
        interrupted = interrupted or bool(stop and step < tcfg.steps)
        ts = layout.here(ts)
        for hook in hooks:
            _call(hook, "end", step, lambda: ts)
    stacked = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
    losses = stacked.get("loss", np.zeros((0,), np.float32))
    return FitResult(ts, losses, rows, metrics=stacked, interrupted=interrupted,
                     signal=(stop or signal.SIGINT) if interrupted else None, start=start)



def _once(fn: Callable) -> Callable:
    """``fn`` called at most once, its value kept (this process's copy of the state: made only if asked for)."""
    kept = []
    return lambda: kept[0] if kept else (kept.append(fn()) or kept[0])


def _call(hook, name: str, *args) -> None:
    """``hook.name(*args)`` if the hook has it; a plain function is a chunk hook ``fn(step, metrics)``."""
    if not hasattr(hook, "chunk") and not hasattr(hook, "end"):
        if name == "chunk":
            hook(args[0], args[2])
        return
    method = getattr(hook, name, None)
    if method is not None:
        method(*args)


class ProgressBar:
    """A :func:`fit` hook: a tqdm bar of the steps, with the chunk's loss and the last dev loss."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", unit_scale=True, dynamic_ncols=True, leave=False)
        self.step = initial

    def chunk(self, step: int, row: dict, metrics, here) -> None:
        self.bar.update(step - self.step)
        self.step = step
        self.bar.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", "dev_loss") if k in row})

    def end(self, step: int, here) -> None:
        self.bar.close()


class _CtrlC:
    pressed = 0  # the signal received (signal.SIGINT or signal.SIGTERM), 0 while none


_GUARDS: list[_CtrlC] = []  # the flags of the guards in force, innermost last
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what Slurm, Kubernetes and `timeout` send first


@contextlib.contextmanager
def ctrl_c_guard():
    """The first Ctrl-C (or SIGTERM) only sets a flag that :func:`fit` checks between chunks, so no
    ``KeyboardInterrupt`` lands in the middle of JAX's, numpy's or the checkpoint writer's code; the chunk in flight
    (a fraction of a second) finishes and is saved. A second one raises at once. A process that ignores a signal
    (``nohup``, a background job of a non-interactive shell) keeps ignoring it, and outside the main thread (signal
    handlers belong to it) Ctrl-C raises as usual. Guards nest: an inner one (``fit``'s, inside the CLI's) shares the
    outer one's flag, so a signal received before training starts ends it before its first chunk."""
    if _GUARDS:
        yield _GUARDS[-1]
        return
    flag = _CtrlC()
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS} if main else {}
    handled = [s for s, h in previous.items() if h not in (None, signal.SIG_IGN)]
    if not handled:
        yield flag
        return

    def handler(signum, frame):
        if flag.pressed:
            raise KeyboardInterrupt
        flag.pressed = signum

    for s in handled:
        signal.signal(s, handler)
    _GUARDS.append(flag)
    try:
        yield flag
    finally:
        _GUARDS.pop()
        for s in handled:
            signal.signal(s, previous[s])


def _agreed(value: int) -> int:
    """The largest of ``value`` over the processes, on every process (one process: ``value``): a decision every
    process must take alike, at the cost of one tiny all-gather."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.process_allgather(np.asarray(value, np.int32)).max())  # (processes,) -> ()


def _stop_requested(flag: _CtrlC) -> int:
    """The signal that stops training after this chunk (0: none). With several processes they agree — any process's
    signal stops all of them at the same chunk (a process that stopped alone would leave the others waiting in the
    next step's collectives)."""
    return _agreed(flag.pressed)


# ----------------------------------------------------------------------------------------------------------------------
# Learning-rate finder


def check_train_data(model: LanguageModel, train, batch_size: int | None) -> None:
    """A ``ValueError`` unless ``train`` is ``model``'s training data: rows ``(X, Y)``, or a text's token
    :class:`jnnex.text.Stream` for a per-position model, drawn in minibatches."""
    if isinstance(train, Stream):
        if not model.per_position:
            raise ValueError(f"model {model.name!r} reads a window and predicts one token; a text stream trains a "
                             "per-position model (gpt, rnn, gru, bow, wavenet-conv)")
        if batch_size is None:
            raise ValueError("a text stream is trained on minibatches: batch_size cannot be None")
        check_stream(train, model.block_size, model.vocab_size, "the train split")
    else:
        check_batch(model, *train, "train data")


def lr_find(
    model: LanguageModel,
    train: tuple[np.ndarray, np.ndarray] | Stream,
    *,
    lo: float = 1e-3,
    hi: float = 1.0,
    steps: int = 1000,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The lecture's exponential learning-rate sweep: step ``i`` of one run uses ``lo·(hi/lo)^(i/(steps-1))``.
    ``train``: rows ``(X, Y)``, or a text's token stream (rows of ``block_size + 1`` tokens drawn as :func:`fit` does).

    Returns:
        ``(lrs (steps,), losses (steps,))``: the rate each step used and that step's minibatch loss. A good rate is a
        little below where the (smoothed) loss is lowest, before it blows up.
    """
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo!r}, hi={hi!r}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps!r}")
    check_train_data(model, train, batch_size)
    stream = isinstance(train, Stream)
    lrs = jnp.asarray(np.geomspace(lo, hi, steps), jnp.float32)
    optimizer = optax.sgd(lambda count: lrs[jnp.minimum(count, steps - 1)])
    run = make_run(make_step(model, optimizer), batch_size, window=model.block_size if stream else None)
    k_init, k_train = seed_keys(seed)
    if stream:
        X, Y = jnp.asarray(np.asarray(train.tokens)), jnp.zeros((0,), jnp.int32)
    else:
        X, Y = (jnp.asarray(a, jnp.int32) for a in train)
    _, metrics = run(init_train_state(model, optimizer, k_init), X, Y, k_train, n_steps=steps)
    return np.asarray(lrs), np.asarray(metrics["loss"])
