"""micrograd's MLP as whole tensors (:mod:`jnnex.micrograd.tensor_mlp`): its hand-written backward (and its own relu
pair) against jax.grad, the moons demo on it and on autodiff, and the same net as scalars (:mod:`jnnex.micrograd.nn`)
step for step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pairs
from jnnex.micrograd import tensor_mlp as mlp
from pairs import f64
from jnnex.data import make_moons
from jnnex.micrograd.nn import MLP, moons_loss, train_moons


def random_params(key, sizes, dtype):
    """Non-trivial parameters: random weights *and* random non-zero biases (zeros hide wrong backwards)."""
    params = mlp.init(key, sizes, dtype)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(params))
    return tuple(mlp.Linear(p.W, jax.random.normal(k, p.b.shape, dtype)) for p, k in zip(params, keys))


@functools.partial(jax.jit, static_argnums=(3, 4))
def manual_and_autodiff(params, x, y, loss, activation):
    """One compilation per shape for both sides."""
    kwargs = dict(loss=loss, alpha=1e-3, activation=activation)
    return mlp.value_and_grad_manual(params, x, y, **kwargs), jax.value_and_grad(mlp.loss_fn)(params, x, y, **kwargs)


@given(
    seed=st.integers(0, 10_000),
    sizes=st.sampled_from([[2, 1], [2, 16, 1], [3, 8, 8, 1], [5, 4, 6, 3, 1]]),
    batch=st.sampled_from([1, 3, 32]),
    activation=st.sampled_from(["relu", "tanh"]),
    loss=st.sampled_from(["hinge", "mse"]),
)
def test_manual_backward_equals_jax_grad_float64(seed, sizes, batch, activation, loss):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = random_params(k1, sizes, jnp.float64)
    x = jax.random.normal(k2, (batch, sizes[0]), jnp.float64)
    y = jnp.sign(jax.random.normal(k3, (batch,), jnp.float64)) if loss == "hinge" else \
        jax.random.normal(k3, (batch, 1), jnp.float64)
    (total, _, grads), (ref_total, ref) = manual_and_autodiff(params, x, y, loss, activation)
    assert float(total) == pytest.approx(float(ref_total), rel=1e-12)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)


@given(seed=st.integers(0, 10_000), batch=st.sampled_from([2, 17]))
def test_network_backward_with_random_upstream_gradient(seed, batch):
    """backward(dout) is the VJP of the network output for an arbitrary (not all-ones) upstream gradient."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = random_params(k1, [4, 8, 3], jnp.float64)
    x = jax.random.normal(k2, (batch, 4), jnp.float64)
    dout = jax.random.normal(k3, (batch, 3), jnp.float64)
    out, caches = mlp.forward(params, x, "tanh")
    grads = mlp.backward(dout, caches, "tanh")
    _, vjp = jax.vjp(lambda p: mlp.apply(p, x, "tanh"), params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(vjp(dout)[0])):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)


def test_cross_entropy_head():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = random_params(k1, [3, 5, 4], jnp.float64)
    x = jax.random.normal(k2, (6, 3), jnp.float64)
    y = jax.random.randint(k3, (6,), 0, 4, dtype=jnp.int32)
    _, _, grads = mlp.value_and_grad_manual(params, x, y, loss="cross_entropy", alpha=0.0)
    ref = jax.grad(mlp.loss_fn)(params, x, y, loss="cross_entropy", alpha=0.0)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)


@pytest.mark.slow
def test_float32_smoke():
    """float32 agrees with float64 autodiff to float32 precision (stated: rtol 1e-4, atol 1e-5)."""
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    p64 = random_params(k1, [2, 16, 16, 1], jnp.float64)
    x = jax.random.normal(k2, (64, 2), jnp.float64)
    y = jnp.sign(jax.random.normal(k3, (64,), jnp.float64))
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p64)
    _, _, g32 = mlp.value_and_grad_manual(p32, x.astype(jnp.float32), y.astype(jnp.float32))
    g64 = jax.grad(mlp.loss_fn)(p64, x, y)
    for g, r in zip(jax.tree.leaves(g32), jax.tree.leaves(g64)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_three_way_scalar_tensor_autodiff():
    """Same weights: scalar engine grads == tensor manual grads == jax.grad (float64)."""
    X, y01 = make_moons(12, 0.1, jax.random.key(3))
    y = 2.0 * y01 - 1.0
    params = random_params(jax.random.key(4), [2, 5, 4, 1], jnp.float64)
    scalar = MLP(2, [5, 4, 1], params=params)
    assert len(scalar.parameters()) == sum(p.size for p in jax.tree.leaves(params))
    loss, _ = moons_loss(scalar, X, y, alpha=1e-4)
    loss.backward()
    xj, yj = jnp.asarray(X, jnp.float64), jnp.asarray(y, jnp.float64)
    total, _, manual = mlp.value_and_grad_manual(params, xj, yj, alpha=1e-4)
    auto = jax.grad(mlp.loss_fn)(params, xj, yj, alpha=1e-4)
    assert loss.data == pytest.approx(float(total), rel=1e-12)
    for s, m, a in zip(jax.tree.leaves(scalar.grads_as_params()), jax.tree.leaves(manual), jax.tree.leaves(auto)):
        np.testing.assert_allclose(s, m, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(m, a, rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_moons_training_manual_and_autodiff_agree_and_reach_100_percent():
    X, y01 = make_moons(100, 0.1, jax.random.key(0))
    x, y = jnp.asarray(X, jnp.float32), jnp.asarray(2.0 * y01 - 1.0, jnp.float32)
    params = mlp.init(jax.random.key(1), [2, 16, 16, 1])
    assert sum(p.size for p in jax.tree.leaves(params)) == 337
    pm, lm, am = mlp.train_moons(params, x, y, engine="manual")
    pa, la, aa = mlp.train_moons(params, x, y, engine="autodiff")
    np.testing.assert_allclose(lm, la, rtol=1e-4, atol=1e-6)  # step by step, float32
    assert float(mlp.accuracy(pm, x, y)) == 1.0 and float(mlp.accuracy(pa, x, y)) == 1.0
    assert lm[-1] < 0.1 * lm[0]


@pytest.mark.slow
def test_scalar_engine_trains_moons_like_the_tensor_code():
    X, y01 = make_moons(30, 0.1, jax.random.key(0))
    y = 2.0 * y01 - 1.0
    params = mlp.init(jax.random.key(1), [2, 8, 1], jnp.float64)
    losses, accs = train_moons(MLP(2, [8, 1], params=params), X, y, steps=15)
    _, ref_losses, _ = mlp.train_moons(params, jnp.asarray(X), jnp.asarray(y), steps=15, engine="autodiff")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-9)


def test_bad_sizes_and_names():
    with pytest.raises(ValueError, match="sizes"):
        mlp.init(jax.random.key(0), [2])
    with pytest.raises(ValueError, match="activation"):
        mlp.apply(mlp.init(jax.random.key(0), [2, 1]), jnp.zeros((1, 2), jnp.float32), "gelu")
    with pytest.raises(ValueError, match="W expects 3"):
        mlp.apply(mlp.init(jax.random.key(0), [3, 1]), jnp.zeros((1, 2), jnp.float32))
    with pytest.raises(TypeError, match="key="):
        MLP(2, [1])


# This stage's own pair (relu lives beside the MLP that uses it; the losses are proven through the net above)
FIXED = {"relu": (f64(4, 3),)}

test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared = \
    pairs.tests(mlp, FIXED)
