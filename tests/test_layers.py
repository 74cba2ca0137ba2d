"""Every compact forward/backward pair of jnnex.layers against jax.vjp (float64, random upstream gradients, drawn by
the exported strategies through the public checker), against finite differences, and at its edges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, settings
from jax.test_util import check_grads

from jnnex import layers, strategies
from jnnex.check import assert_backward, check_backward, custom_vjp

PAIRS = {
    "linear": (layers.linear_forward, layers.linear_backward, strategies.linear_args(), ["x", "W", "b"]),
    "tanh": (layers.tanh_forward, layers.tanh_backward, strategies.tanh_args(), ["x"]),
    "relu": (layers.relu_forward, layers.relu_backward, strategies.tanh_args(), ["x"]),
    "batchnorm": (layers.batchnorm_forward, layers.batchnorm_backward, strategies.batchnorm_args(),
                  ["x", "gamma", "beta"]),
    "embedding": (layers.embedding_forward, layers.embedding_backward, strategies.embedding_args(), ["C", "ix"]),
    "cross_entropy": (layers.cross_entropy_forward, layers.cross_entropy_backward, strategies.cross_entropy_args(),
                      ["logits", "y"]),
    "rnn_cell": (layers.rnn_cell_forward, layers.rnn_cell_backward, strategies.rnn_cell_args(), ["x", "h", "W", "b"]),
    "gru_cell": (layers.gru_cell_forward, layers.gru_cell_backward, strategies.gru_cell_args(),
                 ["x", "h", "Wz", "bz", "Wr", "br", "Wh", "bh"]),
    "causal_average": (layers.causal_average_forward, layers.causal_average_backward,
                       strategies.causal_average_args(), ["x"]),
    "gated_tanh": (layers.gated_tanh_forward, layers.gated_tanh_backward, strategies.gated_tanh_args(), ["x"]),
    "flatten_consecutive": (layers.flatten_consecutive_forward, layers.flatten_consecutive_backward,
                            strategies.flatten_consecutive_args(), ["x", "n"]),
    "causal_conv": (layers.causal_conv_forward, layers.causal_conv_backward, strategies.causal_conv_args(),
                    ["x", "W", "dilation"]),
    "token_position_embedding": (layers.token_position_embedding_forward, layers.token_position_embedding_backward,
                                 strategies.token_position_embedding_args(), ["wte", "wpe", "ix"]),
    "layernorm": (layers.layernorm_forward, layers.layernorm_backward, strategies.layernorm_args(), ["x", "w", "b"]),
    "gelu": (layers.gelu_forward, layers.gelu_backward, strategies.gelu_args(), ["x"]),
    "attention": (layers.attention_forward, layers.attention_backward, strategies.attention_args(),
                  ["qkv", "n_head"]),
    "self_attention": (layers.self_attention_forward, layers.self_attention_backward,
                       strategies.self_attention_args(), ["x", "W_qkv", "b_qkv", "W_proj", "b_proj", "n_head"]),
    "residual": (layers.residual_forward, layers.residual_backward, strategies.residual_args(), ["a", "b"]),
    "sequence_cross_entropy": (layers.cross_entropy_forward, layers.cross_entropy_backward,
                               strategies.sequence_cross_entropy_args(), ["logits", "y"]),
}


@pytest.mark.parametrize("name", PAIRS)
def test_backward_equals_vjp_float64(name):
    forward, backward, args, names = PAIRS[name]
    check_backward(forward, backward, args, names=names, rtol=1e-10, atol=1e-12)


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


def _f64(*shape):
    return jax.random.normal(jax.random.key(len(shape)), shape, jnp.float64)


FIXED_ARGS = {"linear": (_f64(4, 3), _f64(3, 2), _f64(2)), "tanh": (_f64(4, 3),), "relu": (_f64(4, 3),),
              "batchnorm": (_f64(4, 3), _f64(3), _f64(3)), "embedding": (_f64(5, 2), jnp.array([[1, 4]], jnp.int32)),
              "cross_entropy": (_f64(4, 3), jnp.array([0, 2, 1, 1], jnp.int32)),
              "gated_tanh": (_f64(4, 6),), "causal_average": (_f64(2, 4, 3),),
              "gru_cell": (_f64(4, 3), _f64(4, 2), _f64(5, 2), _f64(2), _f64(5, 2), _f64(2), _f64(5, 2), _f64(2)), "rnn_cell": (_f64(4, 3), _f64(4, 2), _f64(5, 2), _f64(2)), "flatten_consecutive": (_f64(2, 4, 3), 2), "causal_conv": (_f64(2, 5, 3), _f64(6, 4), 2),
              "token_position_embedding": (_f64(5, 2), _f64(4, 2), jnp.array([[1, 4, 1]], jnp.int32)),
              "layernorm": (_f64(2, 3, 4), _f64(4), _f64(4)), "gelu": (_f64(2, 3, 4),), "attention": (_f64(2, 3, 12), 2),
              "self_attention": (_f64(2, 3, 4), _f64(4, 12), _f64(12), _f64(4, 4), _f64(4), 2),
              "residual": (_f64(2, 3, 4), _f64(2, 3, 4)),
              "sequence_cross_entropy": (_f64(2, 3, 5), jnp.array([[0, 2, -1], [1, -1, -1]], jnp.int32))}


@pytest.mark.parametrize("name", PAIRS)
def test_wrongly_shaped_upstream_gradient_is_a_clear_error(name):
    forward, backward, _, _ = PAIRS[name]
    out, cache = forward(*FIXED_ARGS[name])
    bad = jnp.ones(jnp.shape(out) + (2,), jnp.result_type(out))
    with pytest.raises(ValueError, match="must have shape"):
        backward(bad, cache)


def test_causal_conv_is_the_tree_at_every_position():
    """Stacked kernel-2 convolutions with dilations 1, 2, 4 give at output t the tree's pairing of inputs t .. t+7
    (flatten pairs, the same weight), for every t: the tree is the convolution sampled every 2^l-th position."""
    x, Ws = _f64(3, 12, 2), [_f64(4, 5), _f64(10, 5) * 0.5, _f64(10, 5) * 0.3]
    h = x
    for level, W in enumerate(Ws):
        h = jnp.tanh(layers.causal_conv_forward(h, W, 2**level)[0])  # (3, 12 - (2^(l+1) - 1), 5)
    assert h.shape == (3, 5, 5)
    for t in range(5):
        tree = x[:, t : t + 8]
        for W in Ws:
            tree = jnp.tanh(layers.flatten_consecutive_forward(tree, 2)[0] @ W)
        np.testing.assert_allclose(h[:, t], tree[:, 0], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape, n", [((2, 3, 4), 2), ((2, 8), 2)])
def test_flatten_consecutive_needs_a_divisible_length(shape, n):
    with pytest.raises(ValueError, match="divisible"):
        layers.flatten_consecutive_forward(jnp.zeros(shape), n)


@pytest.mark.parametrize("dilation", [0, 5, 2.0])
def test_causal_conv_dilation_must_fit(dilation):
    with pytest.raises(ValueError, match="dilation"):
        layers.causal_conv_forward(_f64(2, 5, 3), _f64(6, 4), dilation)


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.9])
def test_dropout_backward_equals_vjp_and_keeps_the_mean(rate):
    x = _f64(64, 50) + 1.0
    forward = lambda x, key: layers.dropout_forward(x, key, rate)  # noqa: E731
    assert_backward(forward, lambda dy, c: layers.dropout_backward(dy, c)[:2], x, jax.random.key(3))
    y, scale = forward(x, jax.random.key(4))
    kept = np.asarray(scale) > 0
    assert abs(kept.mean() - (1 - rate)) < 0.05  # about 1 - rate of the elements survive, scaled up to keep E[y]
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-15)


def test_causal_average_is_makemores_masked_softmax():
    """Uniform causal weights, as makemore.py builds them: softmax over a zero matrix with -inf above the diagonal."""
    x = _f64(2, 5, 3)
    mask = jnp.tril(jnp.ones((5, 5), bool))
    att = jax.nn.softmax(jnp.where(mask, 0.0, -jnp.inf), axis=-1)  # (T, T)
    np.testing.assert_allclose(layers.causal_average_forward(x)[0], jnp.einsum("ts,bsc->btc", att, x), rtol=1e-14)
