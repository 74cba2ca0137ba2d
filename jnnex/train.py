"""The shared training machinery: one jitted step, many steps per compiled call, evaluation, checkpoints, resume.

Every language model in jnnex trains through this module, whether its gradients come from ``jax.grad`` or from a
hand-written backward (``LanguageModel.value_and_grad_manual``, on ``gradients="manual"``). The pieces, from the
inside out:

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

from jnnex import parallel, rundir, tensor_parallel
from jnnex.diagnostics import step_diagnostics
from jnnex.lm import LanguageModel, check_batch, evaluate, manual_gradients
from jnnex.optim import TrainConfig, check_optimizer, lr_schedule, make_optimizer  # noqa: F401 (re-exported)
from jnnex.text import Stream, check_stream, estimate_loss, exact_windows, rows_at


class TrainState(NamedTuple):
    params: Any
    state: Any  # model state that is not learned by gradient (BatchNorm running stats); () if none
    opt_state: Any
    step: jax.Array  # () int32, the number of steps taken


# ----------------------------------------------------------------------------------------------------------------------
# The compiled core


def make_step(model: LanguageModel, optimizer: optax.GradientTransformation, *, diagnostics: bool = False,
              shardings=None) -> Callable:
    """``step(ts, batch, key) -> (ts, metrics)``: one optax update from ``model.value_and_grad`` (the hand-written
    backward or ``jax.grad``, as the model says). Pure; jit it or scan it. ``key`` feeds a stochastic model's random
    layers (dropout): each step gets its own, from ``fold_in(key, step)``.

    ``diagnostics=True`` adds :func:`jnnex.diagnostics.step_diagnostics` to the metrics. Those figures are read off
    the model's hand-written backward (activations from its forward, their gradients from its backward, one pass),
    so the step then trains on the hand-written gradients — proven equal to ``jax.grad``'s.

    ``shardings=(gathered, split)`` (FSDP, :func:`jnnex.parallel.fsdp_shardings`; trees matching the parameters): the
    parameters arrive split over the devices; the step gathers them whole for the forward and backward (an
    all-gather) and splits the gradients back (a reduce-scatter), so the optimiser updates each device's own slice.
    """
    if diagnostics and model.backward_fn is None:
        raise ValueError(f"model {model.name!r} has no hand-written backward, which diagnostics read")

    def step(ts: TrainState, batch, key):
        x, y = batch
        params = ts.params if shardings is None else jax.lax.with_sharding_constraint(ts.params, shardings[0])
        if diagnostics:
            out = manual_gradients(model, params, ts.state, x, y, key)
            loss, grads, new_state = out.loss, out.grads, out.state
        else:
            loss, grads, new_state = model.value_and_grad(params, ts.state, x, y, key)
        if shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, shardings[1])
        # optax mixes integer step counts with float constants internally; our code stays under the caller's
        # (possibly strict) promotion rules, the optimiser's under the standard ones.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        metrics = {"loss": loss}
        if diagnostics:
            metrics.update(step_diagnostics(out.acts, out.act_grads, ts.params, grads, params))
        return TrainState(params, new_state, opt_state, ts.step + 1), metrics

    return step


def make_run(step: Callable, batch_size: int | None, *, unroll: int = 1, mesh=None,
             window: int | None = None, state_shardings=None) -> Callable:
    """``run(ts, X, Y, key, n_steps) -> (ts, metrics)``, jitted: ``n_steps`` steps of ``step`` in one ``lax.scan``.

    Step ``s`` draws ``batch_size`` example indices uniformly (with replacement, as the lecture's ``randint``) from
    ``fold_in(key, s)``. The draws of all ``n_steps`` steps are made up front by one vectorised call (``vmap`` over the
    step numbers gives the same bits as drawing inside each step, three times faster on a CPU). ``metrics`` holds each
    step's metrics stacked along a leading (n_steps,) axis. Compiles once per (shapes, n_steps). ``unroll``: steps per
    iteration of the scan's loop; 1 by default — measured on this machine (2,000 steps of mlp/bn-mlp/neural-bigram,
    300 of wavenet/rnn/gpt/llama), unrolling 4 ran no faster and took 1.2–3× as long to compile (the GPT: 2.8 s →
    8.8 s), with the same bits. ``ts`` is not
    donated: after a Ctrl-C mid-call the caller still holds a live state to save.

    ``mesh`` (:func:`jnnex.parallel.data_mesh`): data parallel, the global view — pass ``ts``, ``X``, ``Y`` replicated
    over it (:func:`jnnex.parallel.replicate`; ``key`` may come as raw key data); each step's index draw and minibatch
    are sharded along its ``"data"`` axis, everything else stays replicated, and ``step`` itself is unchanged.
    ``state_shardings`` (a tree of shardings matching ``ts``; FSDP): ``ts`` is laid out so, in and out, instead.

    ``window=T``: ``X`` is a text's token stream ``(N,)`` (:class:`jnnex.text.Stream`; ``Y`` is unused) and a row
    is ``T + 1`` contiguous tokens at a uniform offset in ``[0, N - T)``: ``x = X[o : o + T]``, ``y = X[o + 1 : o + T
    + 1]`` (nanoGPT's ``get_batch``), gathered inside the step.
    """

    def shard(a, leading=0):
        if mesh is None:
            return a
        return jax.lax.with_sharding_constraint(a, parallel.batch_sharded(mesh, leading))

    def run(ts: TrainState, X, Y, key, n_steps: int):
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)

        def step_keys(s):
            k_batch, k_step = jax.random.split(jax.random.fold_in(key, s))
            if batch_size is None:
                return jnp.zeros((0,), jnp.int32), k_step
            rows = X.shape[0] if window is None else X.shape[0] - window  # (a window's offset: [0, N - T))
            return jax.random.randint(k_batch, (batch_size,), 0, rows, dtype=jnp.int32), k_step  # (B,)

        IX, keys = jax.vmap(step_keys)(ts.step + jnp.arange(n_steps, dtype=jnp.int32))  # (n, B), (n,)
        IX = IX if batch_size is None else shard(IX, leading=1)  # each device draws its own rows' indices

        def body(ts, ix_key):
            ix, k_step = ix_key
            if batch_size is None:
                batch = (X, Y)
            elif window is not None:
                tokens = rows_at(X, ix, window)  # (B, T + 1)
                batch = (tokens[:, :-1], tokens[:, 1:])  # (B, T), (B, T)
            else:
                batch = (X[ix], Y[ix])  # (B, T), (B,)
            ts, metrics = step(ts, tuple(shard(a) for a in batch), k_step)
            if state_shardings is not None:  # the carry stays split as it came in
                ts = jax.lax.with_sharding_constraint(ts, state_shardings)
            return ts, metrics

        return jax.lax.scan(body, ts, (IX, keys), unroll=min(unroll, n_steps))

    if mesh is None:
        return jax.jit(run, static_argnames="n_steps")
    rep = parallel.replicated(mesh)
    return jax.jit(run, static_argnames="n_steps", out_shardings=rep if state_shardings is None else
                   (state_shardings, rep))


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


def initial_params(model: LanguageModel, seed: int):
    """The parameters (and model state) a run of :func:`fit` with ``seed`` starts from, as one compiled program."""
    return jax.jit(model.init)(_keys(seed)[0])


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
    signal: int | None = None  # what interrupted it: signal.SIGINT (Ctrl-C) or signal.SIGTERM
    start: int = 0  # the step this call started from (the checkpoint's, on resume)


@parallel.tells_the_others
def fit(
    model: LanguageModel,
    train: tuple[np.ndarray, np.ndarray] | Stream,
    tcfg: TrainConfig,
    *,
    dev: tuple[np.ndarray, np.ndarray] | Stream | None = None,
    dev_name: str = "dev",
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    eval_train: bool = True,
    diagnostics: bool = False,
    on_chunk: Callable[[int, dict], None] | None = None,
    devices=None,
    shard_params: bool = False,
    model_parallel: int | None = None,
) -> FitResult:
    """Train ``model`` on ``train = (X, Y)``, or on a text's token :class:`jnnex.text.Stream`, for ``tcfg.steps``
    steps.

    Every chunk's mean minibatch loss is logged; every ``eval_every`` steps (and at the end) the full train and dev
    losses join it. With ``out`` (a directory) each row is appended to ``metrics.jsonl`` and at every evaluation a
    checkpoint is written, all atomically: what must be written inside the loop. The rest of a run directory
    (``config.json``, ``model.npz``, ``metrics.json``, the lock, new / resume / force) is :func:`jnnex.run.train`'s.
    With ``resume=True`` training continues from ``out``'s checkpoint and ends with exactly the parameters an
    uninterrupted run would have. Ctrl-C or SIGTERM — at any moment, compilation included — stops after the chunk in
    flight, saves it and returns with ``interrupted=True`` (``FitResult.signal`` says which). ``diagnostics=True``
    adds the per-layer figures of :mod:`jnnex.diagnostics` to every step's metrics (``FitResult.metrics``). ``on_chunk(step, metrics)`` is called
    after each completed chunk (a hook for logging; its ``metrics`` are that chunk's, stacked per step).

    ``devices`` (a number, a device list or a mesh; :func:`jnnex.parallel.data_mesh`): data parallel over them, the
    global view — each step's batch split over the devices, everything else replicated, the same steps and the same
    result as one device up to the order of float additions. After :func:`jnnex.parallel.initialize` the devices may
    span processes: every process calls ``fit`` alike, and only process 0 writes ``out``. Checkpoints are plain
    arrays, so a run saved on N devices resumes on M.

    ``shard_params=True`` (with ``devices``; ZeRO-3 / FSDP in the global view): every parameter and its optimiser
    state is split over the devices along its largest axis that divides by their number (:func:`jnnex.parallel.
    fsdp_spec`; a tensor none of whose axes divides stays replicated), gathered whole for each step's forward and
    backward and its gradient split back, so each device keeps and updates ``1/N`` of them. The step and the result
    are the same as unsplit; the checkpoint is the same plain arrays, whatever the layout it was saved from.

    ``model_parallel=M`` (with ``devices=N``, a multiple of ``M``; Megatron-LM's tensor parallelism): a ``data × model``
    mesh of ``N/M × M`` devices (:func:`jnnex.tensor_parallel.mesh_2d`); each step's batch split along ``"data"``,
    every block's attention heads and MLP split along ``"model"`` as the model's split rules say (``model.split_fn``:
    the GPT's and the Llama's), the model's own forward and hand-written backward on each device
    (:func:`jnnex.tensor_parallel.split_step`) with the optimiser in the global view; dropout, bfloat16 and
    ``diagnostics`` as on one device.
    Checkpoints are in the parameters' own layout: a run resumes on any mesh, or on one device.

    A text stream (a per-position model's): each row is ``block_size + 1`` contiguous tokens at a random offset
    (:func:`make_run`'s ``window``). Its train loss is nanoGPT's estimate (``train_loss_estimate``: ``eval_iters``
    random batches); a ``dev`` stream is scored both exactly (``{dev_name}_loss``, every token once:
    :func:`jnnex.text.exact_windows`) and as the estimate (``{dev_name}_loss_estimate``).

    Raises:
        NonFiniteLossError: a step produced a NaN/inf loss (the last checkpoint is left as it was).
    """
    check_optimizer(tcfg, model)
    stream = isinstance(train, Stream)
    check_train_data(model, train, tcfg.batch_size)
    dev_stream = dev if isinstance(dev, Stream) else None
    if dev_stream is not None:
        check_stream(dev_stream, model.block_size, model.vocab_size, f"the {dev_name} split")
        dev = exact_windows(np.asarray(dev_stream.tokens), model.block_size)
        dev_tokens = jnp.asarray(np.asarray(dev_stream.tokens))
    elif dev is not None:
        check_batch(model, *dev, "dev data")
    split = model_parallel is not None
    if split:
        tensor_parallel.rules_of(model)  # (a model without a split: named first)
        if shard_params:
            raise ValueError("shard_params and model_parallel together (FSDP × tensor parallel) are not a training "
                             "mode yet: choose one (jnnex plan shows both on paper)")
        if not (isinstance(devices, int) and isinstance(model_parallel, int) and model_parallel >= 1
                and devices % model_parallel == 0):
            raise ValueError(f"model_parallel {model_parallel!r}: give devices as a number that divides by it (the "
                             f"mesh is devices / model_parallel × model_parallel), got devices {devices!r}")
        mesh = tensor_parallel.mesh_2d(devices // model_parallel, model_parallel)
    else:
        mesh = parallel.data_mesh(devices) if devices is not None else None
    if mesh is not None:
        parallel.check_batch_size(tcfg.batch_size, mesh.shape[parallel.DATA], len(train[0]))
    if shard_params and mesh is None:
        raise ValueError("shard_params: split the parameters over what? give devices too (--devices N --shard-params)")
    if stream:  # the tokens as they are stored (uint16 for a vocabulary up to 65,536): widened row by row in the step
        X, Y = jnp.asarray(np.asarray(train.tokens)), jnp.zeros((0,), jnp.int32)
    else:
        X, Y = (jnp.asarray(a, jnp.int32) for a in train)
    out = rundir.check_run_dir(out) if out is not None else None
    write = out is not None and parallel.is_writer()  # one writer of the run directory, whatever the processes
    if write:
        rundir.remove_temporaries(out)  # what a killed writer left; the files it was replacing are intact
    if resume and (out is None or not (out / rundir.CHECKPOINT).is_file()):
        raise ValueError(f"resume: no checkpoint in {str(out)!r}")
    if not resume and write and any((out / f).exists() for f in (rundir.CHECKPOINT, rundir.METRICS)):
        raise ValueError(f"{str(out)!r} already holds a run's checkpoint or metrics; resume it, or clear it first "
                         "(jnnex.rundir.clear, or --force on the command line)")
    chunks, evals, interrupted = [], [], False
    with ctrl_c_guard() as ctrl_c:  # in place before the first compile: the first Ctrl-C never raises
        optimizer = make_optimizer(tcfg)
        k_init, k_train = _keys(tcfg.seed)
        k_eval = jax.random.fold_in(k_train, 0x7FFFFFFF)  # the loss estimates' batches: fixed per step, resumable
        ts = init_train_state(model, optimizer, k_init)
        layout = step_shardings = None
        to_devices = to_host = None
        if split:  # the model's own forward and backward on each device's slices, its parameters laid out for them
            to_devices, to_host, layout = tensor_parallel.train_layout(model, optimizer, mesh, ts)
            step_fn = tensor_parallel.split_step(model, optimizer, mesh, ts.params, diagnostics=diagnostics)
        else:
            if shard_params:  # the parameters and optimiser state split, the rest replicated
                layout, step_shardings = parallel.fsdp_layout(ts, mesh)
            step_fn = make_step(model, optimizer, diagnostics=diagnostics, shardings=step_shardings)
        run = make_run(step_fn, tcfg.batch_size, mesh=mesh, window=model.block_size if stream else None,
                       state_shardings=layout)
        if resume:
            ts = rundir.load_pytree(out / rundir.CHECKPOINT, ts)
            if int(ts.step) > tcfg.steps:
                raise ValueError(f"the checkpoint in {str(out)!r} is at step {int(ts.step):,}, past the run's "
                                 f"{tcfg.steps:,} steps")
            if write:
                rundir.truncate_metrics(out, int(ts.step))
        if mesh is not None:  # a state too large for these devices: the figure and what would work, not an OOM
            parallel.check_state_fits(ts, layout, mesh, what=f"{'resuming' if resume else 'training'} on "
                                                             f"{mesh.size} device(s)")
        if layout is not None:  # split over the mesh (FSDP, TP), from host arrays: any layout resumes into any other
            host = parallel.local(ts)
            ts = parallel.place(host if to_devices is None else to_devices(host), layout)
        if mesh is not None:  # the step's inputs, replicated over the mesh (the batch is sharded inside the step)
            ts = ts if layout is not None else parallel.replicate(parallel.local(ts), mesh)
            X_run, Y_run, k_run = parallel.replicate((np.asarray(X), np.asarray(Y),
                                                     np.asarray(jax.random.key_data(k_train))), mesh)
        else:
            X_run, Y_run, k_run = X, Y, k_train
        parallel.start_together()  # several processes: all set up, or all told which one stopped and why
        step = start = saved = int(ts.step)
        stop = 0
        bar = _progress(tcfg.steps, start, progress)
        lr_at = lr_schedule(tcfg)
        t0 = time.perf_counter()
        try:
            while step < tcfg.steps and not (stop := _stop_requested(ctrl_c)):
                # Chunks end on multiples of `chunk` and `eval_every`, so a resumed run makes the same calls.
                n = min(tcfg.chunk - step % tcfg.chunk, tcfg.eval_every - step % tcfg.eval_every, tcfg.steps - step)
                new_ts, metrics = run(ts, X_run, Y_run, k_run, n_steps=n)
                metrics = {k: np.asarray(v) for k, v in parallel.local(metrics).items()}
                bad = np.flatnonzero(~np.isfinite(metrics["loss"]))
                if bad.size:
                    raise NonFiniteLossError(step + int(bad[0]), float(metrics["loss"][bad[0]]),
                                             saved if out is not None and saved > 0 else None)
                ts, step = new_ts, step + n  # `ts` only ever holds a completed chunk: safe to save at any interrupt
                chunks.append(metrics)
                row = {"step": step, "lr": float(lr_at(step - 1)), "loss": float(metrics["loss"].mean())}
                if step % tcfg.eval_every == 0 or step == tcfg.steps:
                    row["time"] = time.perf_counter() - t0
                    here = _here(ts, mesh, to_host)  # this process's copy: evaluated, and checkpointed below
                    k_step = jax.random.fold_in(k_eval, step)
                    if eval_train and stream:
                        row["train_loss_estimate"] = estimate_loss(model, here.params, here.state, X, k_step,
                                                                   tcfg.eval_iters, tcfg.batch_size)
                    elif eval_train:
                        row["train_loss"] = evaluate(model, here.params, here.state, X, Y)
                    if dev is not None:
                        row[f"{dev_name}_loss"] = evaluate(model, here.params, here.state, *dev)
                    if dev_stream is not None:
                        row[f"{dev_name}_loss_estimate"] = estimate_loss(
                            model, here.params, here.state, dev_tokens, jax.random.fold_in(k_step, 1),
                            tcfg.eval_iters, tcfg.batch_size)
                    evals.append(row)
                if write:  # every chunk's row (a curve even for short runs), then at evaluations the state
                    rundir.append_metrics(out, row)
                    if "time" in row:
                        rundir.save_pytree(out / rundir.CHECKPOINT, here)
                        saved = step
                _show(bar, n, row)
                if on_chunk is not None:
                    on_chunk(step, metrics)
        except KeyboardInterrupt:  # a second Ctrl-C, or fit() outside the main thread: keep the last completed chunk
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
        stop = stop or ctrl_c.pressed
        interrupted = interrupted or bool(stop and step < tcfg.steps)
        ts = _here(ts, mesh, to_host)
        if write and step > saved:  # interrupted between evaluations: keep the chunks done since
            rundir.save_pytree(out / rundir.CHECKPOINT, ts)
    stacked = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
    losses = stacked.get("loss", np.zeros((0,), np.float32))
    return FitResult(ts, losses, evals, metrics=stacked, interrupted=interrupted,
                     signal=(stop or signal.SIGINT) if interrupted else None, start=start)


def _here(ts: TrainState, mesh, to_host: Callable | None = None) -> TrainState:
    """The training state as this process holds it: as is on one device; off a mesh, this process's copy (on its
    default device; ``to_host``: from a split model's layout back to the parameters' own), which files and
    evaluation can read."""
    if mesh is None:
        return ts
    host = parallel.local(ts)
    return jax.tree.map(jnp.asarray, host if to_host is None else to_host(host))


def _show(bar, n: int, row: dict) -> None:
    if bar is not None:
        bar.update(n)
        bar.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", "dev_loss") if k in row})


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


def _stop_requested(flag: _CtrlC) -> int:
    """The signal that stops training after this chunk (0: none). With several processes they agree — any process's
    signal stops all of them at the same chunk (a process that stopped alone would leave the others waiting in the
    next step's collectives) — at the cost of one tiny all-gather per chunk."""
    if jax.process_count() == 1:
        return flag.pressed
    from jax.experimental import multihost_utils

    every = multihost_utils.process_allgather(np.asarray(flag.pressed, np.int32))  # (processes,)
    return int(every.max())


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", unit_scale=True, dynamic_ncols=True, leave=False)


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
    k_init, k_train = _keys(seed)
    if stream:
        X, Y = jnp.asarray(np.asarray(train.tokens)), jnp.zeros((0,), jnp.int32)
    else:
        X, Y = (jnp.asarray(a, jnp.int32) for a in train)
    _, metrics = run(init_train_state(model, optimizer, k_init), X, Y, k_train, n_steps=steps)
    return np.asarray(lrs), np.asarray(metrics["loss"])
