"""Character-level bigram language models, counted and learned (makemore part 1).

A bigram model predicts the next character from the current one alone: a (V, V) table whose row ``i`` holds the
logits of the character that follows character ``i``.

* **Counting**: count every bigram of the corpus into ``N (V, V)``, add ``smoothing`` to every cell (add-one by
  default, so no bigram has probability 0) and normalise the rows: ``P = (N + s) / Σ_row (N + s)``. The model's
  logits are ``log P``.
* **Neural**: the logits are ``onehot(x) @ W`` for a learned ``W (V, V)`` — which is just the row ``W[x]`` — trained by
  gradient descent on the mean cross-entropy. Its maximum-likelihood solution is ``W = log P`` of the *unsmoothed*
  counts, so the two are the same model: trained long enough, the neural one reaches the counting one's loss.

Both are :class:`~jnnex.lm.LanguageModel`\\ s with ``block_size = 1``, so the shared evaluation and sampling apply.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.lm import Forward, LanguageModel
from jnnex.settings import check_choice, positive_int, setting


@dataclasses.dataclass(frozen=True)
class BigramConfig:
    vocab_size: int = setting(27, "V: tokens in the vocabulary (set from the data)")
    l2: float = setting(0.0, "neural-bigram: weight of the regulariser l2 mean(W^2) added to the training loss")
    smoothing: float = setting(1.0, "bigram (counting): pseudo-count added to every cell (add-k smoothing)")
    init: str = setting("zeros", "neural-bigram: zeros (uniform predictions, initial loss = ln V) or normal "
                                 "(the lecture's N(0, 1))", choices=("zeros", "normal"))

    block_size = 1  # a bigram model sees one character (a class attribute: not a setting)

    def __post_init__(self):
        positive_int("vocab_size", self.vocab_size, minimum=2)
        if not self.l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2!r}")
        if not self.smoothing >= 0:
            raise ValueError(f"smoothing must be >= 0, got {self.smoothing!r}")
        check_choice("init", self.init, ("zeros", "normal"))


class BigramParams(NamedTuple):
    W: jax.Array  # (V, V) logits of the next character (row) given the current one


# ----------------------------------------------------------------------------------------------------------------------
# Counting


def count_matrix(xs, ys, vocab_size: int) -> jax.Array:
    """``N (V, V) int32`` with ``N[i, j]`` = the number of bigrams ``(xs, ys) == (i, j)``."""
    xs, ys = jnp.asarray(xs, jnp.int32), jnp.asarray(ys, jnp.int32)
    return jnp.zeros((vocab_size, vocab_size), jnp.int32).at[xs, ys].add(1)


def probs_from_counts(counts, smoothing: float = 1.0) -> jax.Array:
    """Row-normalised ``P = (N + smoothing) / Σ_row (N + smoothing)``, float32 (V, V). Every row sums to 1."""
    if not smoothing >= 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing!r}")
    P = jnp.asarray(counts, jnp.float32) + smoothing
    row = P.sum(1, keepdims=True)
    if not bool(jnp.all(row > 0)):
        raise ValueError("a row of counts is all zero and smoothing is 0: its probabilities are undefined")
    return P / row


def nll_from_counts(log_probs, counts) -> float:
    """Mean negative log-likelihood of the bigrams counted in ``counts (V, V)`` under ``log_probs (V, V)``.

    Exact and cheap: ``-Σ N ⊙ log P / Σ N`` reads V² cells instead of every bigram of the corpus. Summed in float64 on
    the host so the result is accurate to the last printed digit.
    """
    counts = np.asarray(counts, np.float64)
    lp = np.asarray(log_probs, np.float64)
    used = counts > 0  # 0 · log 0 counts as 0
    return float(-(counts[used] * lp[used]).sum() / counts.sum())


def fit_counts(xs, ys, vocab_size: int, smoothing: float = 1.0) -> BigramParams:
    """The counting model as parameters: ``W = log P`` of the smoothed counts."""
    return BigramParams(jnp.log(probs_from_counts(count_matrix(xs, ys, vocab_size), smoothing)))


def fit(cfg: BigramConfig, X, Y):
    """The counting model fitted in closed form on windows ``X (N, 1)``, ``Y (N,)``: ``(params, state)``."""
    return fit_counts(np.asarray(X)[:, 0], Y, cfg.vocab_size, cfg.smoothing), ()


# ----------------------------------------------------------------------------------------------------------------------
# As a language model (counting and neural share the forward; they differ in init and training)


def forward(cfg: BigramConfig, params: BigramParams, state, x, train: bool, key=None) -> Forward:
    """``logits (B, V) = W[x[:, 0]]`` — the row lookup that equals ``onehot(x) @ W``."""
    del key  # no random layer: one signature for every model's forward
    del train
    if x.ndim != 2 or x.shape[1] != cfg.block_size:
        raise ValueError(f"bigram: x must have shape (B, 1), got {x.shape}")
    return Forward(params.W[x[:, 0]], state, None, ())


def _init_neural(key, cfg: BigramConfig):
    """``W = 0`` (every prediction uniform: the initial loss is exactly ln V), or ``W ~ N(0, 1)`` as in the lecture."""
    shape = (cfg.vocab_size, cfg.vocab_size)
    if cfg.init == "normal":
        return BigramParams(jax.random.normal(key, shape, jnp.float32)), ()
    return BigramParams(jnp.zeros(shape, jnp.float32)), ()


def _init_counting(key, cfg: BigramConfig):
    """Uniform until :func:`fit` fills in the counts (the counting model is fitted, not trained)."""
    del key
    return BigramParams(jnp.full((cfg.vocab_size, cfg.vocab_size), -np.log(cfg.vocab_size), jnp.float32)), ()


def _l2_penalty(cfg: BigramConfig, params: BigramParams):
    return cfg.l2 * jnp.mean(params.W * params.W)


def counting_bigram(cfg: BigramConfig = BigramConfig()) -> LanguageModel:
    return LanguageModel("bigram", cfg, _init_counting, forward)


def neural_bigram(cfg: BigramConfig = BigramConfig()) -> LanguageModel:
    return LanguageModel("neural-bigram", cfg, _init_neural, forward, penalty_fn=_l2_penalty)


def neural_bigram_grad_closed_form(W, xs, ys):
    """``dL/dW`` of the mean cross-entropy in closed form: row ``xs_i`` gets ``(softmax(W[xs_i]) - onehot(ys_i)) / N``."""
    N, V = xs.shape[0], W.shape[0]
    dlogits = (jax.nn.softmax(W[xs], axis=-1) - jax.nn.one_hot(ys, V, dtype=W.dtype)) / N  # (N, V)
    return jnp.zeros_like(W).at[xs].add(dlogits)
