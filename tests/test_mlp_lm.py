"""The MLP language model of makemore part 2 (:mod:`jnnex.models.mlp_lm`): logits and loss by hand, the initial loss
near ln V, the lecture's sizes and the init ladder, and the sampler's temperature and top-k."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jnnex.data import Vocab, build_windows
from jnnex.lm import count_params, generate
from jnnex.models.mlp_lm import INITS, MLPConfig, MLPParams, mlp_lm


def test_logits_and_loss_by_hand():
    """Two words, V = 3, T = 2, n_embd = 1, H = 2: every number written out."""
    v = Vocab.from_words(["ab", "b"])  # . a b
    X, Y = build_windows(["ab", "b"], v, 2)  # contexts [..], [.a], [ab], [..], [.b]; targets a b . b .
    params = MLPParams(
        C=jnp.array([[0.5], [-1.0], [2.0]], jnp.float64),  # embedding of ., a, b
        W1=jnp.array([[1.0, -0.5], [0.25, 2.0]], jnp.float64),  # (T·n_embd = 2, H = 2)
        b1=jnp.array([0.1, -0.2], jnp.float64),
        W2=jnp.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], jnp.float64),  # (H, V)
        b2=jnp.array([0.0, 0.3, -0.3], jnp.float64),
    )
    model = mlp_lm(MLPConfig(vocab_size=3, block_size=2, n_embd=1, n_hidden=2))
    logits, _ = model.apply(params, (), jnp.asarray(X), train=False)
    emb = {0: 0.5, 1: -1.0, 2: 2.0}
    expected_logits, nll = [], []
    for ctx, target in zip(X.tolist(), Y.tolist()):
        e0, e1 = emb[ctx[0]], emb[ctx[1]]
        h0 = math.tanh(e0 * 1.0 + e1 * 0.25 + 0.1)
        h1 = math.tanh(e0 * -0.5 + e1 * 2.0 - 0.2)
        row = [h0 * 1.0 + h1 * 0.5 + 0.0, h0 * 0.0 + h1 * 2.0 + 0.3, h0 * -1.0 + h1 * 0.0 - 0.3]
        expected_logits.append(row)
        nll.append(-(row[target] - math.log(sum(math.exp(r) for r in row))))
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-12)
    loss, _ = model.loss(params, (), jnp.asarray(X), jnp.asarray(Y))
    assert float(loss) == pytest.approx(sum(nll) / len(nll), rel=1e-12)


@given(st.integers(0, 10_000), st.sampled_from([27, 50]), st.sampled_from([1, 3, 8]))
def test_initial_loss_is_about_ln_V(seed, V, T):
    model = mlp_lm(MLPConfig(vocab_size=V, block_size=T))  # default init: kaiming, output layer × 0.1
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params, state = model.init(k1)
    x = jax.random.randint(k2, (512, T), 0, V, dtype=jnp.int32)
    y = jax.random.randint(k3, (512,), 0, V, dtype=jnp.int32)
    loss, _ = model.loss(params, state, x, y)
    assert abs(float(loss) - math.log(V)) < 0.05


def test_lecture_sizes_and_init_ladder():
    model = mlp_lm(MLPConfig())
    assert count_params(model.init(jax.random.key(0))[0]) == 11897
    stds = {}
    for init in INITS:
        params, _ = mlp_lm(MLPConfig(init=init)).init(jax.random.key(0))
        stds[init] = float(jnp.std(params.W2))
    assert stds["lecture"] > 0.9 and stds["softmax-fixed"] < 0.02 and stds["kaiming"] < 0.01
    with pytest.raises(ValueError, match="init must be"):
        MLPConfig(init="xavier")


def test_sampler_temperature_and_top_k():
    model = mlp_lm(MLPConfig(vocab_size=27))
    params, state = model.init(jax.random.key(0))
    params = params._replace(W2=params.W2 * 100.0)  # a confident model
    greedy = generate(model, params, state, jax.random.key(1), 8, max_len=10, top_k=1)
    assert (greedy == greedy[0]).all()  # top-1 is argmax: every row identical whatever the key
    cold = generate(model, params, state, jax.random.key(1), 64, max_len=10, temperature=1e-4)
    np.testing.assert_array_equal(cold, np.broadcast_to(greedy[0], cold.shape))
    hot = generate(model, params, state, jax.random.key(1), 64, max_len=10, temperature=100.0)
    assert len({tuple(r) for r in hot}) > 32  # near-uniform sampling gives many different strings
    top3 = generate(model, params, state, jax.random.key(2), 64, max_len=1, top_k=3)
    assert len(set(top3[:, 0].tolist())) <= 3
    for bad in [dict(temperature=0.0), dict(top_k=0), dict(top_k=28), dict(n=0)]:
        with pytest.raises(ValueError):
            generate(model, params, state, jax.random.key(0), **{"n": 2, **bad})
