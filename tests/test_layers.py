"""The kernels models share (:mod:`jnnex.layers`): every pair against jax.vjp (float64, random upstream gradients,
drawn by the exported strategies through the public checker), against finite differences, and at its edges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import pairs
from jnnex import layers, strategies
from jnnex.layers import BatchNormParams, BatchNormState, batchnorm, batchnorm_init
from jnnex.check import assert_backward, check_backward, custom_vjp
from pairs import f64

FIXED = {  # a small example of each pair jnnex.layers declares (the pairs two or more models share)
    "linear": (f64(4, 3), f64(3, 2), f64(2)),
    "tanh": (f64(4, 3),),
    "embedding": (f64(5, 2), jnp.array([[1, 4]], jnp.int32)),
    "cross_entropy": (f64(2, 3, 5), jnp.array([[0, 2, -1], [1, -1, -1]], jnp.int32)),
    "batchnorm": (f64(4, 3), f64(3), f64(3)),
}

test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared = \
    pairs.tests(layers, FIXED)


def test_the_kernels_are_in_curriculum_order():
    """layers.py reads as the course does: linear, tanh, embedding, the cross-entropy, BatchNorm, dropout."""
    import inspect

    source = inspect.getsource(layers)
    order = [source.index(f"def {name}_forward") for name in ("linear", "tanh", "embedding", "cross_entropy",
                                                              "batchnorm", "dropout")]
    assert order == sorted(order)


def test_check_backward_finds_and_shows_a_wrong_backward():
    def forgot_gamma(dy, cache):  # a classic: dxhat = dy instead of γ·dy
        x, rstd, gamma, mean, var = cache
        return layers.batchnorm_backward(dy, (x, rstd, jnp.ones_like(gamma), mean, var))

    quick = settings(max_examples=5, phases=[Phase.generate], database=None)  # the failure, without shrinking it
    with pytest.raises(AssertionError, match=r"x +\| exact: False \| approximate: False"):
        check_backward(layers.batchnorm_forward, forgot_gamma, strategies.batchnorm_args(),
                       names=["x", "gamma", "beta"], settings=quick)


@pytest.mark.parametrize("shape", [(2, 3), (16, 4), (4, 3, 2)])
def test_finite_differences_batchnorm(shape):
    k = jax.random.split(jax.random.key(sum(shape)), 3)
    x = 0.5 + 2.0 * jax.random.normal(k[0], shape, jnp.float64)
    gamma = 1.0 + 0.3 * jax.random.normal(k[1], shape[-1:], jnp.float64)
    beta = 0.3 * jax.random.normal(k[2], shape[-1:], jnp.float64)
    bn = custom_vjp(layers.batchnorm_forward, layers.batchnorm_backward)  # reverse mode = the hand-written backward
    check_grads(bn, (x, gamma, beta), order=1, modes=("rev",))


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_finite_differences_cross_entropy(scale):
    logits = scale * jax.random.normal(jax.random.key(3), (8, 5), jnp.float64)
    y = jnp.array([0, 1, 4, 4, 2, 3, 0, 1], jnp.int32)
    ce = custom_vjp(layers.cross_entropy_forward, layers.cross_entropy_backward, nondiff=(1,))
    check_grads(lambda logits: ce(logits, y), (logits,), order=1, modes=("rev",))


def test_a_wrong_backward_fails_finite_differences():
    wrong = custom_vjp(layers.tanh_forward, lambda dy, y: (1.0 - y) * dy)  # forgot the square
    x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    with pytest.raises(AssertionError):
        check_grads(wrong, (x,), order=1, modes=("rev",))


def test_tanh_backward_keeps_its_digits_near_saturation():
    y = jnp.array([0.9999, -0.99999, 0.5], jnp.float32)
    exact = (1.0 - np.asarray(y, np.float64)) * (1.0 + np.asarray(y, np.float64))
    np.testing.assert_allclose(layers.tanh_backward(jnp.ones(3, jnp.float32), y), exact, rtol=1e-6)


def test_batchnorm_constant_feature_column():
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64).at[:, 1].set(7.0)  # zero variance in column 1
    gamma, beta = jnp.array([1.3, 0.7, 0.9], jnp.float64), jnp.array([0.1, -0.2, 0.3], jnp.float64)
    y, cache = layers.batchnorm_forward(x, gamma, beta)
    np.testing.assert_allclose(y[:, 1], beta[1], rtol=1e-12)  # the column normalises to 0, leaving β
    dx, dgamma, dbeta = layers.batchnorm_backward(jax.random.normal(jax.random.key(2), (6, 3), jnp.float64), cache)
    assert np.isfinite(np.asarray(dx)).all()
    assert_backward(layers.batchnorm_forward, layers.batchnorm_backward, x, gamma, beta)


def test_cross_entropy_with_logits_of_plus_minus_1e4():
    logits = jnp.where(jax.random.bernoulli(jax.random.key(0), 0.5, (6, 7)), 1e4, -1e4).astype(jnp.float64)
    logits = logits.at[:, 0].set(1e4)  # every row has a maximum; targets below it have probability e^-20000 = 0
    y = jnp.array([0, 1, 2, 3, 4, 5], jnp.int32)
    loss, cache = layers.cross_entropy_forward(logits, y)
    assert np.isfinite(float(loss)) and float(loss) > 1e3
    dlogits, _ = layers.cross_entropy_backward(jnp.float64(1.0), cache)
    p = np.asarray(logits == logits.max(1, keepdims=True), np.float64)
    expected = (p / p.sum(1, keepdims=True) - np.eye(7)[np.asarray(y)]) / 6  # softmax is uniform over the maxima
    np.testing.assert_allclose(dlogits, expected, rtol=1e-12, atol=1e-15)
    assert_backward(layers.cross_entropy_forward, layers.cross_entropy_backward, logits, y)


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.9])
def test_dropout_backward_equals_vjp_and_keeps_the_mean(rate):
    x = f64(64, 50) + 1.0
    forward = lambda x, key: layers.dropout_forward(x, key, rate)  # noqa: E731
    assert_backward(forward, lambda dy, c: layers.dropout_backward(dy, c)[:2], x, jax.random.key(3))
    y, scale = forward(x, jax.random.key(4))
    kept = np.asarray(scale) > 0
    assert abs(kept.mean() - (1 - rate)) < 0.05  # about 1 - rate of the elements survive, scaled up to keep E[y]
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-15)


# BatchNorm as a stateful layer


def test_batchnorm_3x2_by_hand():
    x = jnp.array([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]], jnp.float64)
    params = BatchNormParams(jnp.array([2.0, 0.5], jnp.float64), jnp.array([0.1, -1.0], jnp.float64))
    state = BatchNormState(jnp.array([0.0, 1.0], jnp.float64), jnp.array([1.0, 4.0], jnp.float64))
    eps = 1e-5
    y, new = batchnorm(params, state, x, train=True, momentum=0.1, eps=eps)
    # column 0: mean 3, biased var (4 + 0 + 4)/3 = 8/3; column 1: mean 4, biased var (4 + 4 + 16)/3 = 8
    x0 = np.array([-2.0, 0.0, 2.0]) / np.sqrt(8 / 3 + eps)
    x1 = np.array([-2.0, -2.0, 4.0]) / np.sqrt(8 + eps)
    np.testing.assert_allclose(y, np.stack([2.0 * x0 + 0.1, 0.5 * x1 - 1.0], 1), rtol=1e-12)
    # running: 0.9·old + 0.1·batch, with the unbiased variances 4 and 12
    np.testing.assert_allclose(new.mean, [0.9 * 0 + 0.1 * 3, 0.9 * 1 + 0.1 * 4], rtol=1e-12)
    np.testing.assert_allclose(new.var, [0.9 * 1 + 0.1 * 4, 0.9 * 4 + 0.1 * 12], rtol=1e-12)
    # eval mode: the running statistics, state unchanged, deterministic
    y_eval, same = batchnorm(params, new, x, train=False, eps=eps)
    expected = (np.asarray(x) - np.asarray(new.mean)) / np.sqrt(np.asarray(new.var) + eps) * [2.0, 0.5] + [0.1, -1.0]
    np.testing.assert_allclose(y_eval, expected, rtol=1e-12)
    assert same is new
    np.testing.assert_array_equal(batchnorm(params, new, x, train=False)[0], batchnorm(params, new, x, train=False)[0])


def test_running_statistics_converge_to_the_true_ones():
    params, state = batchnorm_init(3, jnp.float64)
    key = jax.random.key(0)
    true_mean, true_std = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 2.0, 3.0])

    @jax.jit
    def step(state, k):
        x = true_mean[None] + true_std[None] * jax.random.normal(k, (256, 3), jnp.float64)
        return batchnorm(params, state, x, train=True, momentum=0.05)[1], None

    state, _ = jax.lax.scan(step, state, jax.random.split(key, 2000))
    np.testing.assert_allclose(state.mean, true_mean, atol=0.05)
    np.testing.assert_allclose(jnp.sqrt(state.var), true_std, rtol=0.05)


@given(st.integers(0, 10_000), st.sampled_from([(8, 3), (4, 5, 3), (2, 3), (16, 2, 4)]), st.floats(0.01, 1.0))
def test_train_mode_output_has_mean_beta_and_std_gamma(seed, shape, momentum):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    C = shape[-1]
    x = 3.0 + 2.0 * jax.random.normal(k1, shape, jnp.float64)
    params = BatchNormParams(jax.random.uniform(k2, (C,), jnp.float64, 0.5, 2.0), jax.random.normal(k3, (C,), jnp.float64))
    state = BatchNormState(jax.random.normal(k4, (C,), jnp.float64), jnp.ones((C,), jnp.float64))
    y, new = batchnorm(params, state, x, train=True, momentum=momentum, eps=1e-12)
    axes = tuple(range(len(shape) - 1))
    np.testing.assert_allclose(y.mean(axes), params.beta, atol=1e-9)
    np.testing.assert_allclose(y.std(axes), params.gamma, rtol=1e-6)
    np.testing.assert_allclose(new.mean, (1 - momentum) * state.mean + momentum * x.mean(axes), rtol=1e-10)


@given(st.sampled_from([(4, 3), (2, 3, 3)]))
def test_constant_column_gives_finite_output_and_gradient(shape):
    x = jax.random.normal(jax.random.key(1), shape, jnp.float64).at[..., 1].set(7.0)
    params, state = batchnorm_init(3, jnp.float64)
    y, _ = batchnorm(params, state, x, train=True)
    assert jnp.isfinite(y).all() and jnp.allclose(y[..., 1], 0.0)
    g = jax.grad(lambda x: jnp.sum(batchnorm(params, state, x, train=True)[0] ** 3))(x)
    assert jnp.isfinite(g).all()


def test_bad_batchnorm_inputs():
    params, state = batchnorm_init(3)
    with pytest.raises(ValueError, match="at least 2 rows"):
        batchnorm(params, state, jnp.ones((1, 3), jnp.float32), train=True)
    with pytest.raises(ValueError, match="channels"):
        batchnorm(params, state, jnp.ones((4, 5), jnp.float32), train=True)
    with pytest.raises(ValueError, match="channels"):
        batchnorm(params, state, jnp.ones((4, 5), jnp.float32), train=False)
    with pytest.raises(TypeError, match="train must be a Python bool"):
        batchnorm(params, state, jnp.ones((4, 3), jnp.float32), train=jnp.array(True))


@pytest.mark.parametrize("product, a_shape, b_shape", [
    ("nt", (12, 64, 40), (24, 40)),  # a weight shared by every row: the linear layer's dx
    ("nt", (3, 4, 10, 6), (3, 4, 10, 6)),  # batched: attention's scores
    ("tn", (3, 4, 10, 6), (3, 4, 10, 6)),  # batched: attention's dv, dk
    ("tn", (7, 5), (7, 3)),  # the linear layer's dW
])
def test_the_transposed_products_in_bfloat16_equal_float32s(product, a_shape, b_shape):
    """``matmul_nt`` (``a bᵀ``) and ``matmul_tn`` (``aᵀ b``) in bfloat16 take a path of their own (one dot stated as
    such; ``aᵀ`` copied into its layout, see :func:`jnnex.layers.transpose`): jitted, they equal float32's products of
    the same bfloat16 values up to the float32 sums' order."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, a_shape).astype(jnp.bfloat16)
    b = jax.random.normal(kb, b_shape).astype(jnp.bfloat16)
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    if product == "nt":
        got, want = jax.jit(layers.matmul_nt)(a, b), jnp.matmul(a32, jnp.swapaxes(b32, -1, -2))
    else:
        got, want = jax.jit(layers.matmul_tn)(a, b), jnp.matmul(jnp.swapaxes(a32, -1, -2), b32)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
