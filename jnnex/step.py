"""The compiled core of training: one jitted step, and many steps in one compiled call.

* :class:`TrainState` — params, model state (BatchNorm's running statistics), optimiser state, step counter.
* :func:`make_step` — ``step(ts, batch, key) -> (ts, metrics)``: one optax update from the model's gradients (its
  hand-written backward or ``jax.grad``), pure; every parallel scheme's step has this signature
  (:mod:`jnnex.layout`).
* :func:`make_run` — ``run(ts, X, Y, key, n_steps)``: ``n_steps`` steps inside one compiled ``lax.scan``. Each step
  draws its minibatch *inside* the compiled code from ``fold_in(key, step)``, so which examples a step sees depends
  only on the key and the step number — not on how the run was cut into calls. That is what makes resume exact.
* :func:`init_train_state` — a fresh state, compiled as one program.

:mod:`jnnex.train` is the loop around them (``fit``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jnnex import parallel
from jnnex.diagnostics import step_diagnostics
from jnnex.lm import LanguageModel, manual_gradients
from jnnex.text import rows_at


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


def seed_keys(seed: int):
    k_init, k_train = jax.random.split(jax.random.key(seed))
    return k_init, k_train


def initial_params(model: LanguageModel, seed: int):
    """The parameters (and model state) a run of :func:`fit` with ``seed`` starts from, as one compiled program."""
    return jax.jit(model.init)(seed_keys(seed)[0])
