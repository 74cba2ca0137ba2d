"""The MLP language model of Bengio et al. 2003, "A Neural Probabilistic Language Model" (makemore part 2).

Each of the T = block_size previous characters is looked up in a learned embedding table ``C (V, n_embd)``; the T
embeddings are concatenated and fed to a tanh hidden layer, whose output gives the logits of the next character::

    emb    = C[x]                      # (B, T, n_embd)
    embcat = emb.reshape(B, T·n_embd)  # (B, T·n_embd)
    h      = tanh(embcat @ W1 + b1)    # (B, H)
    logits = h @ W2 + b2               # (B, V)

With the lecture's sizes (V = 27, T = 3, n_embd = 10, H = 200) it has 11,897 parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jnnex.init import OUTPUT_SCALE, kaiming_normal
from jnnex.layers import (
    cross_entropy_backward, cross_entropy_forward, embedding_backward, embedding_forward, linear_backward,
    linear_forward, tanh_backward, tanh_forward,
)
from jnnex.lm import LanguageModel

# The makemore part-3 ladder of initialisations, from the lecture's original to the principled one.
INITS = ("lecture", "softmax-fixed", "tanh-fixed", "kaiming")


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    vocab_size: int = 27  # V
    block_size: int = 3  # T: characters of context
    n_embd: int = 10  # embedding size per character
    n_hidden: int = 200  # H: tanh units
    # lecture:       every parameter ~ N(0, 1) (part 2; initial loss ≈ 17 with V = 27)
    # softmax-fixed: as lecture, but W2 × 0.01 and b2 = 0 (near-uniform initial softmax)
    # tanh-fixed:    also W1 × 0.2 and b1 × 0.01 (tanh no longer saturated)
    # kaiming:       W1 ~ N(0, (5/3)² / fan_in), b1 × 0.01, W2 × 0.1 / sqrt(H), b2 = 0 (default)
    init: str = "kaiming"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")


class MLPParams(NamedTuple):
    C: jax.Array  # (V, n_embd) embedding table
    W1: jax.Array  # (T·n_embd, H)
    b1: jax.Array  # (H,)
    W2: jax.Array  # (H, V)
    b2: jax.Array  # (V,)


def init(cfg: MLPConfig, key) -> tuple[MLPParams, tuple]:
    """Parameters for ``cfg`` (float32), and the empty model state."""
    kC, k1, kb1, k2, kb2 = jax.random.split(key, 5)
    V, E, H, fan_in = cfg.vocab_size, cfg.n_embd, cfg.n_hidden, cfg.block_size * cfg.n_embd
    normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32)  # noqa: E731
    C = normal(kC, (V, E))
    if cfg.init == "kaiming":
        W1 = kaiming_normal(k1, fan_in, H, "tanh")
        b1 = normal(kb1, (H,)) * 0.01
        W2 = kaiming_normal(k2, H, V, "linear") * OUTPUT_SCALE
        b2 = jnp.zeros((V,), jnp.float32)
    else:
        W1, b1, W2, b2 = normal(k1, (fan_in, H)), normal(kb1, (H,)), normal(k2, (H, V)), normal(kb2, (V,))
        if cfg.init in ("softmax-fixed", "tanh-fixed"):
            W2, b2 = W2 * 0.01, b2 * 0.0
        if cfg.init == "tanh-fixed":
            W1, b1 = W1 * 0.2, b1 * 0.01
    return MLPParams(C, W1, b1, W2, b2), ()


def forward(params: MLPParams, x, probes=None):
    """``logits (B, V)`` and the layer caches, in forward order, for a hand-written backward. ``probes`` (zeros, for
    diagnostics) are added to the hidden activations so that their gradient is the activations' gradient."""
    B, T = x.shape
    emb, c_emb = embedding_forward(params.C, x)  # (B, T, n_embd)
    embcat = emb.reshape(B, -1)  # (B, T·n_embd)
    hpre, c_lin1 = linear_forward(embcat, params.W1, params.b1)  # (B, H)
    h, c_tanh = tanh_forward(hpre)  # (B, H)
    if probes is not None:
        h = h + probes[0]
    logits, c_lin2 = linear_forward(h, params.W2, params.b2)  # (B, V)
    return logits, (c_emb, c_lin1, c_tanh, c_lin2)


def value_and_grad_manual(cfg: MLPConfig, params: MLPParams, state, x, y):
    """``(loss, grads, state)`` by hand: the layer backwards in reverse order of :func:`forward`. No autodiff."""
    del cfg
    logits, (c_emb, c_lin1, c_tanh, c_lin2) = forward(params, x)
    loss, c_ce = cross_entropy_forward(logits, y)
    dlogits, _ = cross_entropy_backward(jnp.ones((), logits.dtype), c_ce)  # (B, V)
    dh, dW2, db2 = linear_backward(dlogits, c_lin2)  # (B, H)
    dhpre = tanh_backward(dh, c_tanh)  # (B, H)
    dembcat, dW1, db1 = linear_backward(dhpre, c_lin1)  # (B, T·n_embd)
    dC, _ = embedding_backward(dembcat.reshape(x.shape + (params.C.shape[1],)), c_emb)  # (V, n_embd)
    return loss, MLPParams(dC, dW1, db1, dW2, db2), state


def forward_with_activations(cfg: MLPConfig, params: MLPParams, state, x, train: bool, probes=None):
    """``(logits, state, (h,))``: the forward exposing the hidden tanh output for diagnostics (see ``LanguageModel``)."""
    del cfg, train
    logits, (_, _, h, _) = forward(params, x, probes)  # h: the tanh output (B, H)
    return logits, state, (h,)


def apply(cfg: MLPConfig, params: MLPParams, state, x, train: bool):
    if x.ndim != 2 or x.shape[1] != cfg.block_size:
        raise ValueError(f"mlp: x must have shape (B, {cfg.block_size}), got {x.shape}")
    del train  # no train/eval difference in this model
    return forward(params, x)[0], state


def mlp_lm(cfg: MLPConfig = MLPConfig()) -> LanguageModel:
    """The Bengio MLP as a :class:`~jnnex.lm.LanguageModel` (gradients from ``jax.grad``).

    >>> from jnnex.lm import count_params
    >>> model = mlp_lm(MLPConfig())
    >>> params, state = model.init(jax.random.key(0))
    >>> count_params(params)
    11897
    """
    return LanguageModel("mlp", cfg, init, apply, forward_fn=forward_with_activations)


def mlp_lm_manual(cfg: MLPConfig = MLPConfig()) -> LanguageModel:
    """The same model trained on :func:`value_and_grad_manual` — the hand-written backward, ``jax.grad`` nowhere."""
    return LanguageModel("mlp", cfg, init, apply, grad_fn=value_and_grad_manual)


def expected_initial_loss(vocab_size: int) -> float:
    """ln V: the loss of a uniform prediction over V tokens (3.2958 for V = 27)."""
    return math.log(vocab_size)
