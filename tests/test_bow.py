"""makemore.py's causal bag of words: its size, the causal average's meaning, and its backward by hand against
jax.grad in float64 over drawn shapes (T from 1 to the block size, padded words)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import pairs
import jnnex.models.bow as bow_module
from jnnex import strategies
from pairs import f64
from jnnex.check import assert_model_gradients, randomise
from jnnex.lm import count_params
from jnnex.models.bow import BoWConfig, bow


def test_makemore_parameter_count():
    assert count_params(bow().init(jax.random.key(0))[0]) == 12_827  # 27·64 + 16·64 + 2·(64·64 + 64) + 64·27 + 27


def test_a_position_sees_only_its_past():
    """Changing the character at position s changes no logits before s."""
    model = bow(BoWConfig(vocab_size=5, block_size=6, n_embd=4, n_embd2=3))
    params, state = model.init(jax.random.key(0))
    x = jnp.array([[0, 1, 2, 3, 4, 1]], jnp.int32)
    a = model.apply(params, state, x, train=False)[0]
    b = model.apply(params, state, x.at[0, 3].set(0), train=False)[0]
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert not np.allclose(a[:, 3:], b[:, 3:])


@st.composite
def problems(draw):
    block = draw(st.sampled_from([1, 4, 16]))
    T = draw(st.sampled_from(sorted({1, block})))
    B = draw(strategies.batch_sizes(min_size=1, max_size=8))
    cfg = BoWConfig(vocab_size=draw(st.sampled_from([5, 27])), block_size=block,
                    n_embd=draw(st.sampled_from([2, 5])), n_embd2=draw(st.sampled_from([3, 8])))
    seed = draw(strategies.seeds())
    model = bow(cfg)
    params = randomise(model.init(jax.random.key(seed))[0], jax.random.key(seed + 1), jnp.float64)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    y[np.arange(T)[None, :] >= rng.integers(1, T + 1, B)[:, None]] = -1
    return model, params, jnp.asarray(x), jnp.asarray(y)


@given(problems())
def test_backward_equals_jax_grad_float64(problem):
    model, params, x, y = problem
    assert_model_gradients(model, params, (), x, y)


# The bag of words' own pair (jnnex/models/bow.py, above its forward)
FIXED = {"causal_average": (f64(2, 4, 3),)}

test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared = \
    pairs.tests(bow_module, FIXED)


def test_causal_average_is_makemores_masked_softmax():
    """Uniform causal weights, as makemore.py builds them: softmax over a zero matrix with -inf above the diagonal."""
    x = f64(2, 5, 3)
    mask = jnp.tril(jnp.ones((5, 5), bool))
    att = jax.nn.softmax(jnp.where(mask, 0.0, -jnp.inf), axis=-1)  # (T, T)
    np.testing.assert_allclose(bow_module.causal_average_forward(x)[0], jnp.einsum("ts,bsc->btc", att, x), rtol=1e-14)
