import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnex import layers
from jnnex.check import assert_backward, compare, custom_vjp, format_table


def f64(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float64)


def test_checker_catches_a_wrong_backward():
    def wrong_tanh_backward(dy, y):
        return (1.0 - y) * dy  # forgot the square

    x = f64(jax.random.key(1), (4, 3))
    rows = compare(layers.tanh_forward, wrong_tanh_backward, x)
    assert not rows[0].approx and rows[0].maxdiff > 1e-3
    assert format_table(rows).startswith("arg0 | exact: False | approximate: False | maxdiff: ")
    with pytest.raises(AssertionError, match="approximate: False"):
        assert_backward(layers.tanh_forward, wrong_tanh_backward, x)


def test_custom_vjp_adapter_uses_the_hand_written_backward():
    k = jax.random.split(jax.random.key(2), 4)
    x, gamma, beta = f64(k[0], (8, 3)), 1.0 + 0.2 * f64(k[1], (3,)), f64(k[2], (3,))
    bn = custom_vjp(layers.batchnorm_forward, layers.batchnorm_backward)
    loss = lambda f: lambda x, g, b: jnp.sum(f(x, g, b) ** 3)  # noqa: E731
    through_adapter = jax.grad(loss(bn), argnums=(0, 1, 2))(x, gamma, beta)
    plain = jax.grad(loss(lambda *a: layers.batchnorm_forward(*a)[0]), argnums=(0, 1, 2))(x, gamma, beta)
    y, cache = layers.batchnorm_forward(x, gamma, beta)
    manual = layers.batchnorm_backward(3 * y ** 2, cache)
    for a, p, m in zip(through_adapter, plain, manual):
        np.testing.assert_allclose(a, m, rtol=1e-12)
        np.testing.assert_allclose(a, p, rtol=1e-10, atol=1e-12)
    # The adapter really calls the hand-written backward: a deliberately wrong one shows up in jax.grad.
    wrong = custom_vjp(layers.tanh_forward, lambda dy, y: 2.0 * layers.tanh_backward(dy, y))
    np.testing.assert_allclose(jax.grad(lambda x: wrong(x).sum())(x), 2 * jax.grad(lambda x: jnp.tanh(x).sum())(x))
    # Integer inputs: the embedding lookup with its index argument marked non-differentiable.
    emb = custom_vjp(layers.embedding_forward, layers.embedding_backward, nondiff=(1,))
    C, ix = f64(k[3], (5, 2)), jnp.array([1, 1, 4], jnp.int32)
    np.testing.assert_allclose(jax.grad(lambda C: emb(C, ix).sum())(C), jax.grad(lambda C: C[ix].sum())(C))
