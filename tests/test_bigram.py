"""The bigram models of makemore part 1 (:mod:`jnnex.models.bigram`): counts and NLL by hand, the row lookup as the
one-hot product, the neural bigram's closed-form gradient and its convergence to the counting model, sampling."""

import functools

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jnnex.models.bigram import (
    BigramConfig, BigramParams, count_matrix, counting_bigram, fit_counts, neural_bigram,
    neural_bigram_grad_closed_form, nll_from_counts, probs_from_counts,
)
from jnnex.data import Vocab, bigram_pairs, build_windows, read_words
from jnnex.lm import evaluate, generate
from jnnex.optim import TrainConfig
from jnnex.train import fit


def test_counts_probs_nll_by_hand():
    # Corpus ["ab", "b"], vocab ". a b": bigrams .a ab b. .b b.
    v = Vocab.from_words(["ab", "b"])
    xs, ys = bigram_pairs(["ab", "b"], v)
    N = np.asarray(count_matrix(xs, ys, 3))
    assert N.tolist() == [[0, 1, 1], [0, 0, 1], [2, 0, 0]]
    P = np.asarray(probs_from_counts(N, 1.0))
    # Row "." : counts (0, 1, 1) + 1 -> (1, 2, 2) / 5; row "a": (1, 1, 2) / 4; row "b": (3, 1, 1) / 5.
    np.testing.assert_allclose(P, [[1 / 5, 2 / 5, 2 / 5], [1 / 4, 1 / 4, 2 / 4], [3 / 5, 1 / 5, 1 / 5]], rtol=1e-6)
    # NLL = -(log P[.,a] + log P[a,b] + log P[b,.] + log P[.,b] + log P[b,.]) / 5
    expected = -(math.log(2 / 5) + math.log(2 / 4) + math.log(3 / 5) + math.log(2 / 5) + math.log(3 / 5)) / 5
    assert nll_from_counts(np.log(P), N) == pytest.approx(expected, rel=1e-6)
    # The generic evaluation over every example agrees with the count shortcut.
    model = counting_bigram(BigramConfig(vocab_size=3))
    params = fit_counts(xs, ys, 3)
    X, Y = build_windows(["ab", "b"], v, 1)
    assert evaluate(model, params, (), X, Y) == pytest.approx(expected, rel=1e-6)
    # Unsmoothed: row "b" -> "." has probability 1.
    assert np.asarray(probs_from_counts(N, 0.0))[2].tolist() == [1.0, 0.0, 0.0]


@given(st.integers(0, 1000), st.integers(2, 12), st.floats(0.0, 3.0))
def test_probability_rows_sum_to_one(seed, V, smoothing):
    rng = np.random.default_rng(seed)
    xs, ys = rng.integers(0, V, 200), rng.integers(0, V, 200)
    counts = np.asarray(count_matrix(xs, ys, V))
    assert counts.sum() == 200
    if smoothing == 0 and (counts.sum(1) == 0).any():
        with pytest.raises(ValueError, match="all zero"):
            probs_from_counts(counts, smoothing)
        return
    P = np.asarray(probs_from_counts(counts, smoothing))
    np.testing.assert_allclose(P.sum(1), 1.0, rtol=1e-6)
    assert (P >= 0).all()


def test_row_lookup_equals_one_hot_product():
    W = jax.random.normal(jax.random.key(0), (7, 7), jnp.float32)
    x = jnp.array([[0], [3], [3], [6]], jnp.int32)
    logits, _ = neural_bigram(BigramConfig(vocab_size=7)).apply(BigramParams(W), (), x, train=True)
    np.testing.assert_allclose(logits, jax.nn.one_hot(x[:, 0], 7, dtype=jnp.float32) @ W, rtol=1e-6)


@given(st.integers(0, 10_000), st.sampled_from([3, 8, 27]), st.sampled_from([1, 5, 40]))
def test_neural_bigram_gradient_closed_form(seed, V, N):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    W = jax.random.normal(k1, (V, V), jnp.float64)
    xs = jax.random.randint(k2, (N,), 0, V, dtype=jnp.int32)
    ys = jax.random.randint(k3, (N,), 0, V, dtype=jnp.int32)
    grads, closed = autodiff_and_closed_form(V, W, xs, ys)
    np.testing.assert_allclose(grads.W, closed, rtol=1e-10, atol=1e-14)


@functools.partial(jax.jit, static_argnums=0)
def autodiff_and_closed_form(V, W, xs, ys):
    """One compilation per shape for both sides."""
    model = neural_bigram(BigramConfig(vocab_size=V))
    return model.value_and_grad(BigramParams(W), (), xs[:, None], ys)[1], neural_bigram_grad_closed_form(W, xs, ys)


def test_l2_penalty_is_in_the_objective_only():
    cfg = BigramConfig(vocab_size=5, l2=0.01)
    model = neural_bigram(cfg)
    params, _ = model.init(jax.random.key(0))
    x, y = jnp.zeros((4, 1), jnp.int32), jnp.ones((4,), jnp.int32)
    loss, _ = model.loss(params, (), x, y)
    obj, _ = model.objective(params, (), x, y)
    assert float(obj - loss) == pytest.approx(0.01 * float(jnp.mean(params.W ** 2)), rel=1e-5)


@pytest.mark.slow
def test_neural_bigram_converges_to_counting_model(names_txt, optimized):
    words = read_words(names_txt)
    v = Vocab.from_words(words)
    X, Y = build_windows(words, v, 1)
    counting = nll_from_counts(fit_counts(X[:, 0], Y, v.size, 1.0).W, count_matrix(X[:, 0], Y, v.size))
    assert counting == pytest.approx(2.454577, abs=1e-6)
    model = neural_bigram(BigramConfig(vocab_size=v.size, init="normal"))  # the lecture's random start
    res = fit(model, (X, Y), TrainConfig(steps=500, batch_size=None, lr=50.0, lr_boundaries=(), eval_every=500,
                                         chunk=100), evals={})
    neural = evaluate(model, res.ts.params, (), X, Y)
    assert abs(neural - counting) < 0.01
    assert res.losses[0] > 3.5  # it really started from a random W


def test_sampling_is_deterministic_and_stops_at_boundary():
    v = Vocab.from_words(["ab", "b"])
    xs, ys = bigram_pairs(["ab", "b"], v)
    model = counting_bigram(BigramConfig(vocab_size=3, smoothing=0.0))
    params = fit_counts(xs, ys, 3, smoothing=0.0)
    toks = generate(model, params, (), jax.random.key(3), 50, max_len=6)
    assert (toks == generate(model, params, (), jax.random.key(3), 50, max_len=6)).all()
    words = {v.decode(r) for r in toks}
    assert words <= {"ab", "b"} and words == {"ab", "b"}  # only the corpus's two paths have nonzero probability
    for row in toks:  # after the first boundary every token is a boundary
        first = int(np.argmax(row == 0))
        assert (row[first:] == 0).all()
