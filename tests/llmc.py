"""llm.c's two checks of a hand-written model, for any per-position model: ``ten_steps`` (10 AdamW steps on one
batch, hand-written against ``jax.grad``, float64) and ``save_reload_rerun`` (5 steps, save, 5 more; reload and
rerun: bit for bit). The model files' tests call them."""

import jax
import jax.numpy as jnp
import numpy as np

from jnnex import rundir
from jnnex.lm import generate
from jnnex.optim import TrainConfig, make_optimizer
from jnnex.train import init_train_state, make_step


def steps_on_one_batch(model, tcfg, x, y, n: int = 10, dtype=None):
    """``n`` optimiser steps of ``model`` on the one batch ``x, y`` from the same init: ``(losses (n,), final training
    state)``; ``dtype`` (float64 for the proofs) casts the training state's floats first."""
    opt = make_optimizer(tcfg)
    ts = init_train_state(model, opt, jax.random.key(0))
    if dtype is not None:
        ts = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, ts)
    step = jax.jit(make_step(model, opt))
    trajectory = []
    for _ in range(n):
        ts, metrics = step(ts, (x, y), jax.random.key(1))
        trajectory.append(float(metrics["loss"]))
    return np.array(trajectory), ts


def ten_steps(model, x, y):
    """The 10 losses of each backward, ``{"manual": …, "autodiff": …}``, in float64 from the same init; the caller
    asserts. AdamW lr 1e-2, betas (0.9, 0.99), weight decay 0.01."""
    tcfg = TrainConfig(optimizer="adamw", lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    return {g: steps_on_one_batch(model.with_gradients(g), tcfg, x, y, dtype=jnp.float64)[0]
            for g in ("manual", "autodiff")}


def save_reload_rerun(model, X, Y, tcfg, path):
    """5 steps (batches of 16 drawn from ``X, Y``), save the training state at ``path``, 5 more; reload the save and
    rerun the 5. Returns ``(losses_a, losses_b, samples_a, samples_b)``: the caller asserts they are equal."""
    opt = make_optimizer(tcfg)
    step = jax.jit(make_step(model, opt))
    ts = init_train_state(model, opt, jax.random.key(0))

    def five(ts, start):
        losses = []
        for s in range(start, start + 5):
            ix = jax.random.randint(jax.random.key(s), (16,), 0, X.shape[0])
            ts, metrics = step(ts, (X[ix], Y[ix]), jax.random.key(100 + s))
            losses.append(np.asarray(metrics["loss"]))
        return ts, np.array(losses)

    ts, _ = five(ts, 0)
    rundir.save_pytree(path, ts)
    ts_a, losses_a = five(ts, 5)
    ts_b, losses_b = five(rundir.load_pytree(path, ts), 5)
    samples = [generate(model, t.params, t.state, jax.random.key(3), 8, max_len=20) for t in (ts_a, ts_b)]
    return losses_a, losses_b, *samples
