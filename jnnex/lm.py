"""What every jnnex language model is, and what works on any of them: loss, evaluation, sampling.

A language model maps a context of T token ids to logits over the V tokens of the next one. In jnnex it is a bundle of
pure functions (:class:`LanguageModel`): ``init(key) -> (params, state)`` and
``apply(params, state, x, *, train) -> (logits, new_state)``. ``state`` carries what is not learned by gradient
(BatchNorm's running statistics); it is ``()`` for stateless models. A model may also carry a hand-written
``value_and_grad``, which the training machinery then uses instead of ``jax.grad``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.layers import cross_entropy_forward


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """A language model as pure functions.

    The functions are module-level and take the config first, so two models with equal configs compare (and hash)
    equal and share compiled code; the methods below bind the config.

    Attributes:
        name: registry name (``"bigram"``, ``"mlp"``, …).
        cfg: the model's frozen config dataclass; has ``vocab_size`` (V) and ``block_size`` (T).
        init_fn: ``(cfg, key) -> (params, state)``.
        apply_fn: ``(cfg, params, state, x (B, T) int32, train: bool) -> (logits (B, V), new_state)``.
        grad_fn: optional hand-written ``(cfg, params, state, x, y) -> (loss, grads, new_state)``; ``grads`` has the
            structure of ``params``. ``None`` means the machinery differentiates :meth:`objective` with ``jax.grad``.
        penalty_fn: optional ``(cfg, params) -> scalar`` added to the training objective (an L2 term, say); the
            reported cross-entropy never includes it.
        forward_fn: optional ``(cfg, params, state, x, train, probes) -> (logits, new_state, acts)`` exposing the
            hidden activations ``acts`` (a tuple of (B, H) arrays); ``probes`` (zeros, or ``None``) are added to them
            so that differentiating w.r.t. the probes gives the activations' gradients. Used by
            :mod:`jnnex.diagnostics`.
    """

    name: str
    cfg: Any
    init_fn: Callable
    apply_fn: Callable
    grad_fn: Callable | None = None
    penalty_fn: Callable | None = None
    forward_fn: Callable | None = None

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def init(self, key):
        """``(params, state)`` for this model."""
        return self.init_fn(self.cfg, key)

    def apply(self, params, state, x, *, train: bool):
        """``(logits (B, V), new_state)`` for contexts ``x (B, T)``."""
        return self.apply_fn(self.cfg, params, state, x, train)

    def loss(self, params, state, x, y, *, train: bool = True):
        """Mean cross-entropy of the next token: ``(loss, new_state)``."""
        logits, new_state = self.apply(params, state, x, train=train)
        return cross_entropy_forward(logits, y)[0], new_state

    def objective(self, params, state, x, y):
        """What training minimises: the cross-entropy plus the penalty, if any. ``(objective, new_state)``."""
        loss, new_state = self.loss(params, state, x, y, train=True)
        if self.penalty_fn is not None:
            loss = loss + self.penalty_fn(self.cfg, params)
        return loss, new_state

    def value_and_grad(self, params, state, x, y):
        """``(objective, grads, new_state)``: the hand-written backward if the model has one, else ``jax.grad``."""
        if self.grad_fn is not None:
            return self.grad_fn(self.cfg, params, state, x, y)
        (loss, new_state), grads = jax.value_and_grad(self.objective, has_aux=True)(params, state, x, y)
        return loss, grads, new_state


def count_params(params) -> int:
    return int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


@functools.partial(jax.jit, static_argnames=("model", "chunk"))
def _eval_sums(model, params, state, X, Y, chunk):
    n = X.shape[0]
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    Xp = jnp.pad(X, ((0, pad), (0, 0))).reshape(n_chunks, chunk, X.shape[1])  # (K, b, T)
    Yp = jnp.pad(Y, (0, pad)).reshape(n_chunks, chunk)  # (K, b)
    mask = (jnp.arange(n_chunks * chunk) < n).reshape(n_chunks, chunk)

    def body(total, xym):
        x, y, m = xym
        logits, _ = model.apply(params, state, x, train=False)  # (b, V)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logprobs, y[:, None], axis=1)[:, 0]  # (b,)
        return total + jnp.sum(jnp.where(m, nll, 0.0)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (Xp, Yp, mask))
    return total / n


def evaluate(model: LanguageModel, params, state, X, Y, *, chunk: int = 16384) -> float:
    """Mean negative log-likelihood (nats per token) of ``Y (N,)`` given ``X (N, T)``, in eval mode, in chunks."""
    X, Y = jnp.asarray(X, jnp.int32), jnp.asarray(Y, jnp.int32)
    if X.ndim != 2 or X.shape[1] != model.block_size or Y.shape != X.shape[:1]:
        raise ValueError(f"evaluate: expected X (N, {model.block_size}) and Y (N,), got {X.shape} and {Y.shape}")
    if X.shape[0] == 0:
        raise ValueError("evaluate: X is empty")
    return float(_eval_sums(model, params, state, X, Y, min(chunk, X.shape[0])))


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


@functools.partial(jax.jit, static_argnames=("model", "n", "max_len", "top_k"))
def _generate(model, params, state, key, n, max_len, temperature, top_k):
    def body(carry, t):
        ctx, done = carry  # (n, T), (n,)
        logits, _ = model.apply(params, state, ctx, train=False)  # (n, V)
        logits = logits.astype(jnp.float32) / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (n, 1)
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        tok = jax.random.categorical(jax.random.fold_in(key, t), logits, axis=-1).astype(jnp.int32)  # (n,)
        tok = jnp.where(done, 0, tok)  # a finished name only emits the boundary token
        ctx = jnp.concatenate([ctx[:, 1:], tok[:, None]], axis=1)
        return (ctx, done | (tok == 0)), tok

    ctx0 = jnp.zeros((n, model.block_size), jnp.int32)
    _, toks = jax.lax.scan(body, (ctx0, jnp.zeros((n,), bool)), jnp.arange(max_len))
    return toks.T  # (n, max_len)


def generate(
    model: LanguageModel,
    params,
    state,
    key: jax.Array,
    n: int = 20,
    *,
    max_len: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> np.ndarray:
    """Sample ``n`` sequences in parallel: ``tokens (n, max_len) int32``, each padded with 0 after its boundary token.

    Deterministic for a given ``key``. ``temperature`` divides the logits; ``top_k`` keeps only the k most likely
    tokens at each step.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= model.vocab_size):
        raise ValueError(f"top_k must be None or an integer in [1, {model.vocab_size}], got {top_k!r}")
    return np.asarray(_generate(model, params, state, key, n, max_len, jnp.float32(temperature), top_k))


def sample_words(model: LanguageModel, params, state, vocab, key, n: int = 20, **kwargs) -> list[str]:
    """``n`` generated words, decoded with ``vocab`` (each stops at its boundary token)."""
    return [vocab.decode(row) for row in generate(model, params, state, key, n, **kwargs)]
