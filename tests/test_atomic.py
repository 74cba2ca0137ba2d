"""makemore part 4's exercise (:mod:`jnnex.atomic`): every intermediate gradient of the BatchNorm net, one elementary
op per line, against jax.grad in float64; at its edges; and exercise mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from jnnex import atomic, strategies
from jnnex.models.bn_mlp import bn_mlp
from jnnex.layers import Linear


def value_and_grad(cfg, params, state, x, y):
    """The BatchNorm net's hand-written loss and gradients (bn_mlp.forward, cross-entropy, bn_mlp.backward)."""
    return bn_mlp(cfg).value_and_grad_manual(params, state, x, y)


@functools.partial(jax.jit, static_argnums=0)
def atomic_compact_and_reference(cfg, params, state, x, y, dloss):
    """One compilation per shape: the atomic backward, the compact backward and the ``jax.grad`` oracle."""
    loss, f = atomic.forward(cfg, params, x, y)
    ref = atomic.reference(cfg, params, x, y)
    return loss, atomic.backward(f, dloss), jax.tree.map(lambda r: dloss * r, ref), value_and_grad(cfg, params, state, x, y)


@functools.partial(jax.jit, static_argnums=0)
def atomic_and_reference(cfg, params, x, y):
    loss, f = atomic.forward(cfg, params, x, y)
    return loss, atomic.backward(f), atomic.reference(cfg, params, x, y)


bn_mlp_problems = strategies.lm_problems(configs=strategies.lm_configs(shapes=("bn-mlp",)))


def state64(cfg):
    """Fresh BatchNorm running statistics in float64 (the compact path takes and returns them)."""
    return jax.tree.map(lambda s: s.astype(jnp.float64), bn_mlp(cfg).init(jax.random.key(0))[1])


def _batch_of_two():
    cfg, params, x, y = atomic.example_problem(batch=2)
    return cfg, params, state64(cfg), x, y


@given(problem=bn_mlp_problems, dloss=st.sampled_from([1.0, -0.37, 2.5]))
@example(problem=_batch_of_two(), dloss=-0.37)  # the smallest batch, always checked
def test_every_atomic_gradient_equals_jax_grad_float64(problem, dloss):
    cfg, params, state, x, y = problem
    loss, mine, ref, (compact_loss, compact, _) = atomic_compact_and_reference(cfg, params, state, x, y,
                                                                                jnp.float64(dloss))
    assert set(mine) == set(atomic.GRADIENTS)
    for name in atomic.GRADIENTS:  # every named intermediate, and the parameters
        np.testing.assert_allclose(mine[name], ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
    # The atomic path and the compact path are the same function with the same gradients.
    np.testing.assert_allclose(loss, compact_loss, rtol=1e-12)
    for d, p in zip(["dC", "dW1", "db1", "dW2", "db2", "dbngain", "dbnbias"],
                    [compact.C, *compact.dense[0], *compact.dense[1], *compact.bn[0]]):
        np.testing.assert_allclose(mine[d], dloss * p, rtol=1e-10, atol=1e-12, err_msg=d)
    unseen = np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(x))
    assert (np.asarray(mine["dC"])[unseen] == 0).all()


@pytest.mark.slow
def test_float32_atomic_gradients_within_stated_tolerance():
    cfg, p64, x, y = atomic.example_problem(batch=32)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p64)
    _, g32, _ = atomic_and_reference(cfg, p32, x, y)
    _, g64, _ = atomic_and_reference(cfg, p64, x, y)
    for name in atomic.GRADIENTS:  # float32 vs the float64 result: rtol 1e-3, atol 1e-6 (stated in the docs)
        assert g32[name].dtype == jnp.float32
        np.testing.assert_allclose(g32[name], g64[name], rtol=1e-3, atol=1e-6, err_msg=name)


def test_batch_of_two_and_a_constant_feature_column():
    cfg, params, x, y = atomic.example_problem(batch=2)
    (W1, b1), out = params.dense
    params = params._replace(dense=(Linear(W1.at[:, 5].set(0.0), b1), out))  # hprebn[:, 5] = b1[5] for every row
    f = atomic.forward(cfg, params, x, y)[1]
    assert float(jnp.ptp(f["hprebn"][:, 5])) == 0.0 and float(f["bnvar"][0, 5]) == 0.0
    _, mine, ref = atomic_and_reference(cfg, params, x, y)
    for name in atomic.GRADIENTS:
        np.testing.assert_allclose(mine[name], ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
        assert np.isfinite(np.asarray(mine[name])).all(), name
    state = state64(cfg)
    _, compact, _ = value_and_grad(cfg, params, state, x, y)  # the compact path at the same edge
    for d, p in zip(["dW1", "db1", "dbngain", "dbnbias"], [*compact.dense[0], *compact.bn[0]]):
        np.testing.assert_allclose(p, ref[d], rtol=1e-10, atol=1e-12, err_msg=d)


def test_logits_of_plus_minus_1e4():
    cfg, params, x, y = atomic.example_problem(batch=8)
    (W1, b1), (W2, b2) = params.dense
    V = cfg.vocab_size
    b2 = jnp.where(jnp.arange(V) % 2 == 0, 1e4, -1e4)  # logits ≈ ±1e4, 13 near-tied maxima per row
    params = params._replace(dense=(Linear(W1, b1), Linear(1e-3 * W2, b2)))
    # Targets among the maxima: every probability the loss picks is ~1/#ties, and the atomic chain stays exact.
    y_max = (2 * jnp.arange(8, dtype=jnp.int32)) % V
    loss, mine, ref = atomic_and_reference(cfg, params, x, y_max)
    assert np.isfinite(float(loss))
    for name in atomic.GRADIENTS:
        np.testing.assert_allclose(mine[name], ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
    # A target 2e4 below the maximum: its probability underflows to 0 and log gives -inf — the documented limit of
    # the lecture's decomposition. The compact path (logsumexp) gives the finite loss and gradient.
    y_low = y_max + 1
    assert float(atomic_and_reference(cfg, params, x, y_low)[0]) == np.inf
    state = state64(cfg)
    loss, grads, _ = value_and_grad(cfg, params, state, x, y_low)
    assert 1e4 < float(loss) < 3e4
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_exercise_mode_shows_each_attempt_and_what_follows_from_it():
    right = atomic.exercise({"dprobs": lambda f, g: g.dlogprobs / f.probs,
                             "dbnraw": lambda f, g: f.bngain.reshape(1, -1) * g.dhpreact})
    assert right.count("approximate: True") == len(atomic.GRADIENTS)
    assert "dprobs (yours)" in right and "dbnraw (yours)" in right
    wrong = atomic.exercise({"dbndiff2": lambda f, g: jnp.broadcast_to(g.dbnvar, f.bndiff2.shape)})  # forgot 1/n
    rows = {line.split("|")[0].strip(): line for line in wrong.splitlines()}
    assert "approximate: False" in rows["dbndiff2 (yours)"]
    assert "approximate: False" in rows["dhprebn"] and "approximate: False" in rows["dC"]  # downstream of it
    assert "approximate: True" in rows["dbnraw"] and "approximate: True" in rows["dW2"]  # upstream of it


def test_bad_input_gets_clear_errors():
    cfg, params, x, y = atomic.example_problem(batch=4)
    with pytest.raises(ValueError, match="dprobs must have shape"):
        atomic.exercise({"dprobs": lambda f, g: g.dlogprobs.sum(1)})
    with pytest.raises(ValueError, match="unknown gradient names"):
        atomic.exercise({"dprob": lambda f, g: g.dlogprobs})
    with pytest.raises(ValueError, match="dloss must have shape"):
        atomic.backward(atomic.forward(cfg, params, x, y)[1], dloss=jnp.ones(4))
    with pytest.raises(ValueError, match="single-hidden-layer"):
        deep = strategies.BNMLPConfig(n_layers=2)
        atomic.forward(deep, bn_mlp(deep).init(jax.random.key(0))[0], x, y)
