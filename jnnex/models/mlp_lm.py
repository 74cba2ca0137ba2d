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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jnnex.init import OUTPUT_SCALE, kaiming_scale, normals
from jnnex.layers import (
    embedding_backward, embedding_forward, linear_backward, linear_forward, tanh_backward, tanh_forward,
)
from jnnex.lm import Forward, LanguageModel
from jnnex.settings import check_choice, positive_int, setting

# The makemore part-3 ladder of initialisations, from the lecture's original to the principled one.
INITS = ("lecture", "softmax-fixed", "tanh-fixed", "kaiming")

# makemore part 3's ladder: each rung one fix more, trained with the same budget (`jnnex ladder`, jnnex.run.ladder).
# (rung, registered model, its settings, the lecture's train / val loss)
LADDER = (
    ("original", "mlp", {"init": "lecture"}, (2.1245, 2.1682)),
    ("softmax fixed", "mlp", {"init": "softmax-fixed"}, (2.07, 2.13)),
    ("tanh fixed", "mlp", {"init": "tanh-fixed"}, (2.0356, 2.1027)),
    ("kaiming", "mlp", {"init": "kaiming"}, (2.0377, 2.1070)),
    ("+ batchnorm", "bn-mlp", {}, (2.0668, 2.1048)),
)


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    vocab_size: int = setting(27, "V: tokens in the vocabulary (set from the data)")
    block_size: int = setting(3, "T: characters of context")
    n_embd: int = setting(10, "embedding size per character")
    n_hidden: int = setting(200, "H: hidden units")
    init: str = setting("kaiming", "initialisation (makemore part 3's ladder): lecture = every parameter N(0, 1); "
                        "softmax-fixed = W2 x 0.01, b2 = 0; tanh-fixed = also W1 x 0.2, b1 x 0.01; "
                        "kaiming = W1 ~ N(0, (5/3)^2 / fan_in), W2 x 0.1 / sqrt(H)", choices=INITS)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden"):
            positive_int(name, getattr(self, name))
        check_choice("init", self.init, INITS)


class MLPParams(NamedTuple):
    C: jax.Array  # (V, n_embd) embedding table
    W1: jax.Array  # (T·n_embd, H)
    b1: jax.Array  # (H,)
    W2: jax.Array  # (H, V)
    b2: jax.Array  # (V,)


def init(key, cfg: MLPConfig) -> tuple[MLPParams, tuple]:
    """Parameters for ``cfg`` (float32), and the empty model state."""
    kC, k1, kb1, k2, kb2 = jax.random.split(key, 5)
    V, E, H, fan_in = cfg.vocab_size, cfg.n_embd, cfg.n_hidden, cfg.block_size * cfg.n_embd
    # One vectorised draw for all five (see jnnex.init.normals: it keeps init's compile time short).
    C, W1, b1, W2, b2 = normals([(kC, (V, E)), (k1, (fan_in, H)), (kb1, (H,)), (k2, (H, V)), (kb2, (V,))])
    if cfg.init == "kaiming":
        W1 = W1 * kaiming_scale(fan_in, "tanh")
        b1 = b1 * 0.01
        W2 = W2 * kaiming_scale(H, "linear") * OUTPUT_SCALE
        b2 = jnp.zeros((V,), jnp.float32)
    else:
        if cfg.init in ("softmax-fixed", "tanh-fixed"):
            W2, b2 = W2 * 0.01, b2 * 0.0
        if cfg.init == "tanh-fixed":
            W1, b1 = W1 * 0.2, b1 * 0.01
    return MLPParams(C, W1, b1, W2, b2), ()


def forward(cfg: MLPConfig, params: MLPParams, state, x, train: bool, key=None) -> Forward:
    """``logits (B, V)``, the unchanged (empty) state, the layer caches in forward order, and the hidden activation."""
    del key  # no random layer: one signature for every model's forward
    del train  # no train/eval difference in this model
    if x.ndim != 2 or x.shape[1] != cfg.block_size:
        raise ValueError(f"mlp: x must have shape (B, {cfg.block_size}), got {x.shape}")
    B, T = x.shape
    emb, c_emb = embedding_forward(params.C, x)  # (B, T, n_embd)
    embcat = emb.reshape(B, -1)  # (B, T·n_embd)
    hpre, c_lin1 = linear_forward(embcat, params.W1, params.b1)  # (B, H)
    h, c_tanh = tanh_forward(hpre)  # (B, H)
    logits, c_lin2 = linear_forward(h, params.W2, params.b2)  # (B, V)
    return Forward(logits, state, (c_emb, c_lin1, c_tanh, c_lin2), (h,))


def backward(cfg: MLPConfig, params: MLPParams, caches, dlogits):
    """Every parameter gradient from ``dlogits (B, V)``: the layer backwards in reverse order of :func:`forward`.
    Returns ``(grads, (dh,))``, ``dh`` being the gradient at the hidden activation."""
    del cfg
    c_emb, c_lin1, c_tanh, c_lin2 = caches
    dh, dW2, db2 = linear_backward(dlogits, c_lin2)  # (B, H)
    dhpre = tanh_backward(dh, c_tanh)  # (B, H)
    dembcat, dW1, db1 = linear_backward(dhpre, c_lin1)  # (B, T·n_embd)
    dC, _ = embedding_backward(dembcat.reshape(c_emb[0].shape + (params.C.shape[1],)), c_emb)  # (V, n_embd)
    return MLPParams(dC, dW1, db1, dW2, db2), (dh,)


def mlp_lm(cfg: MLPConfig = MLPConfig()) -> LanguageModel:
    """The Bengio MLP as a :class:`~jnnex.lm.LanguageModel` (``.with_gradients("manual")`` trains it on
    :func:`backward`).

    >>> from jnnex.lm import count_params
    >>> model = mlp_lm(MLPConfig())
    >>> params, state = model.init(jax.random.key(0))
    >>> count_params(params)
    11897
    """
    return LanguageModel("mlp", cfg, init, forward, backward, embeddings_fn=embeddings)


def embeddings(params: MLPParams) -> jax.Array:
    """The character embedding table ``C (V, n_embd)``."""
    return params.C
