"""makemore.py's causal bag of words (``BoW``): a transformer block with the attention replaced by a uniform average of
the past, and its backward by hand.

    x = C[idx] + P[t]                               (B, T, E)   token + position embeddings
    x = x + causal_average(x)                       (B, T, E)   each position: the mean of positions 0..t
    x = x + tanh(x @ W_fc + b_fc) @ W_proj + b_proj (B, T, E)   an MLP block, E -> E2 -> E
    logits = x @ W_head + b_head                    (B, T, V)

At makemore.py's defaults (n_embd 64, n_embd2 64, block size 16 on names.txt): 12,827 parameters. Initialisation is
PyTorch's — embeddings ``N(0, 1)``, linears ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` — except the head, made "less
confident" as every jnnex model's output layer (weight × 0.1, bias 0): with PyTorch's head the sum of two ``N(0, 1)``
embeddings and two residual branches gives logits of std ≈ 1 and an initial loss of 4.25 instead of ln 27 = 3.30.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jnnex.init import OUTPUT_SCALE, torch_linear
from jnnex.layers import (
    Linear, Pair, check_shape, embedding_backward, embedding_forward, linear_backward, linear_forward, tanh_backward,
    tanh_forward,
)
from jnnex.lm import Forward, LanguageModel
from jnnex.settings import positive_int, setting


# ----------------------------------------------------------------------------------------------------------------------
# Causal bag of words (makemore.py's CausalBoW): each position the mean of the positions up to it


def causal_average_forward(x):
    """``y[:, t] = (x[:, 0] + … + x[:, t]) / (t + 1)`` for ``x (B, T, C)``: uniform attention over the past, as a
    running sum (makemore.py builds the same weights as a softmax over a masked zero matrix)."""
    if x.ndim != 3:
        raise ValueError(f"causal_average: x must be (B, T, C), got {x.shape}")
    counts = jnp.arange(1, x.shape[1] + 1, dtype=x.dtype).reshape(1, -1, 1)  # (1, T, 1)
    return jnp.cumsum(x, axis=1) / counts, x.shape


def causal_average_backward(dy, x_shape):
    """``dx[:, s] = Σ_{t ≥ s} dy[:, t] / (t + 1)``: the same running sum, taken from the end."""
    check_shape("causal_average_backward: dy", dy, x_shape)
    counts = jnp.arange(1, dy.shape[1] + 1, dtype=dy.dtype).reshape(1, -1, 1)
    return jnp.cumsum((dy / counts)[:, ::-1], axis=1)[:, ::-1]


PAIRS = {"causal_average": Pair(causal_average_forward, causal_average_backward, ("x",))}


@dataclasses.dataclass(frozen=True)
class BoWConfig:
    vocab_size: int = setting(27, "V: tokens in the vocabulary (set from the data)")
    block_size: int = setting(16, "T: the longest word + 1 (set from the data); the position table's size")
    n_embd: int = setting(64, "E: embedding size per character")
    n_embd2: int = setting(64, "E2: the MLP block's hidden width")

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_embd", "n_embd2"):
            positive_int(name, getattr(self, name))


class BoWParams(NamedTuple):
    C: jax.Array  # (V, E) token embeddings
    P: jax.Array  # (T, E) position embeddings
    fc: Linear  # (E, E2)
    proj: Linear  # (E2, E)
    head: Linear  # (E, V)


def init(key, cfg: BoWConfig):
    E, E2, V, T = cfg.n_embd, cfg.n_embd2, cfg.vocab_size, cfg.block_size
    k = jax.random.split(key, 8)
    head = torch_linear(k[6], k[7], E, V)
    head = Linear(head.W * OUTPUT_SCALE, jnp.zeros_like(head.b))  # less confident: initial loss ≈ ln V
    params = BoWParams(jax.random.normal(k[0], (V, E), jnp.float32), jax.random.normal(k[1], (T, E), jnp.float32),
                       torch_linear(k[2], k[3], E, E2), torch_linear(k[4], k[5], E2, E), head)
    return params, ()


def forward(cfg: BoWConfig, params: BoWParams, state, x, train: bool, key=None) -> Forward:
    """``Forward(logits (B, T, V), (), caches, acts)`` for ``x (B, T)``, ``T <= block_size``; ``acts`` holds the
    MLP's tanh output ``(B, T, E2)``."""
    del key  # no random layer: one signature for every model's forward
    del train
    if x.ndim != 2 or not 1 <= x.shape[1] <= cfg.block_size:
        raise ValueError(f"bow: x must have shape (B, T <= {cfg.block_size}), got {x.shape}")
    T = x.shape[1]
    tok, c_tok = embedding_forward(params.C, x)  # (B, T, E)
    h = tok + params.P[None, :T]  # (B, T, E)
    avg, c_avg = causal_average_forward(h)
    h = h + avg  # the residual around the bag of words
    a, c_fc = linear_forward(h, params.fc.W, params.fc.b)  # (B, T, E2)
    t, c_tanh = tanh_forward(a)
    m, c_proj = linear_forward(t, params.proj.W, params.proj.b)  # (B, T, E)
    h = h + m  # the residual around the MLP
    logits, c_head = linear_forward(h, params.head.W, params.head.b)  # (B, T, V)
    return Forward(logits, state, (c_tok, c_avg, c_fc, c_tanh, c_proj, c_head), (t,))


def backward(cfg: BoWConfig, params: BoWParams, caches, dlogits):
    """In reverse: the head; the MLP branch (its gradient joins the residual's); the bag of words (likewise); the
    position table (summed over the batch) and the token scatter-add."""
    c_tok, c_avg, c_fc, c_tanh, c_proj, c_head = caches
    dh, dW_head, db_head = linear_backward(dlogits, c_head)  # (B, T, E)
    dt, dW_proj, db_proj = linear_backward(dh, c_proj)  # (B, T, E2)
    dt_act = dt  # the gradient at the tanh output, for diagnostics
    da = tanh_backward(dt, c_tanh)
    dh_mlp, dW_fc, db_fc = linear_backward(da, c_fc)
    dh = dh + dh_mlp  # both paths into the block's input
    dh = dh + causal_average_backward(dh, c_avg)
    T = dh.shape[1]
    dP = jnp.zeros_like(params.P).at[:T].add(dh.sum(0))  # (block_size, E): positions beyond T get 0
    dC, _ = embedding_backward(dh, c_tok)
    grads = BoWParams(dC, dP, Linear(dW_fc, db_fc), Linear(dW_proj, db_proj), Linear(dW_head, db_head))
    return grads, (dt_act,)


def embeddings(params: BoWParams) -> jax.Array:
    return params.C


def bow(cfg: BoWConfig = BoWConfig()) -> LanguageModel:
    """makemore.py's causal bag of words; ``.with_gradients("manual")`` trains it on :func:`backward`."""
    return LanguageModel("bow", cfg, init, forward, backward, per_position=True, embeddings_fn=embeddings)
