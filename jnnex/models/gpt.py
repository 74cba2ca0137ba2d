"""A GPT (Radford et al. 2019's GPT-2, as makemore.py's ``Transformer``) with every gradient written by hand, in the
order llm.c's ``gpt2_backward`` takes them.

    x = wte[idx] + wpe[t]                                  (B, T, C)   token + position embeddings
    for each of the n_layer blocks (pre-LayerNorm):
        x = x + proj(attention(qkv(ln1(x))))               (B, T, C)   causal multi-head self-attention
        x = x + fcproj(gelu(fc(ln2(x))))                   (B, T, C)   MLP, C -> 4C -> C
    logits = lnf(x) @ lm_head                              (B, T, V)   no bias; lm_head = wteᵀ when tied

At makemore.py's defaults (4 layers, 4 heads, n_embd 64, block size 16 on names.txt, 27 tokens): **204,544
parameters**. Initialisation is GPT-2's: every weight ``N(0, 0.02)``, the two residual projections of each block
``N(0, 0.02 / sqrt(2 · n_layer))`` (the residual stream sums 2 · n_layer branches), biases 0, LayerNorms 1 and 0.
(makemore.py itself keeps PyTorch's default initialisation.)

``bias=False`` (nanoGPT's ``bias=False``) leaves out every linear's and LayerNorm's bias; ``tie=True`` (GPT-2's and
nanoGPT's) makes the LM head the token table's transpose, one tensor used twice: its gradient is the sum of both
uses, the embedding's scatter-add and the head's ``(dW_head)ᵀ``. nanoGPT's Shakespeare models are both.

``dropout > 0`` (not in makemore.py) drops the embedding sum and each branch's output before it joins the residual
stream (GPT-2's residual dropout), in training only; the model is then stochastic: train-mode calls pass a key.

:func:`backward` undoes the forward in reverse: the LM head, the final LayerNorm, then per block (last first) the MLP
branch and the attention branch, the residual stream's gradient accumulating what each branch sends back, and last
the embedding scatter-add. Each step is a forward/backward pair, each proven against ``jax.vjp``: the transformer's
own ones (token + position embedding, LayerNorm, GELU, the residual add, attention) first in this file, as in llm.c's
``train_gpt2.c``; linear, dropout and the cross-entropy from :mod:`jnnex.layers`, which other models share.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

import numpy as np

from jnnex.collectives import (
    ROW, Column, Part, column_linear_backward, column_linear_forward, local_count, row_linear_backward,
    row_linear_forward,
)
from jnnex.layers import (
    PRECISIONS, RECOMPUTE, Linear, Pair, check_dropout_key, check_shape, compute_params, dropout_backward,
    dropout_in_training, keep, linear_backward, matmul, matmul_nt, matmul_tn, param_grads, per_channel, recomputed,
    transpose, wide,
)
from jnnex.lm import Forward, LanguageModel, Pipe, merge_grads
from jnnex.settings import check_choice, positive_int, setting

INIT_STD = 0.02  # GPT-2's

# GPT-2 small (124M, Radford et al. 2019; nanoGPT's `gpt2`): its shape, biases everywhere, the LM head tied to the
# token table. Its vocabulary, 50,257 byte-level BPE tokens, nanoGPT pads to 50,304 (a multiple of 64: faster matmuls);
# the 47 extra rows are never a target, and their logits learn to stay low.
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "bias": True, "tie": True,
              "dropout": 0.0}
GPT2_VOCAB, GPT2_VOCAB_PADDED = 50_257, 50_304


# ----------------------------------------------------------------------------------------------------------------------
# Transformer layers (GPT-2, as llm.c writes them by hand): token + position embedding, LayerNorm, GELU, causal
# multi-head self-attention, the residual add. Linear over (B, T, C) is ``linear`` above; the fused softmax
# cross-entropy over (B, T, V) with ignored targets is ``cross_entropy`` below.


def token_position_embedding_forward(wte, wpe, ix):
    """``wte (V, C) [ix (B, T)] + wpe (T_max, C) [:T] -> (B, T, C)``: what each token is, plus where it is."""
    if not jnp.issubdtype(ix.dtype, jnp.integer):
        raise TypeError(f"token_position_embedding: ix must be an integer array, got {ix.dtype}")
    if ix.ndim != 2 or ix.shape[1] > wpe.shape[0]:
        raise ValueError(f"token_position_embedding: ix must be (B, T) with T <= {wpe.shape[0]} (the position table's "
                         f"length), got {ix.shape}")
    T = ix.shape[1]
    return wte[ix] + wpe[None, :T], (ix, wte.shape, wpe.shape)


def token_position_embedding_backward(dout, cache):
    """``dwte``: a scatter-add over the tokens (a repeated token accumulates); ``dwpe[t] = Σ_b dout[b, t]`` for the
    ``T`` positions used, 0 beyond."""
    ix, wte_shape, wpe_shape = cache
    check_shape("token_position_embedding_backward: dout", dout, ix.shape + (wte_shape[1],))
    C, acc = wte_shape[1], wide(dout.dtype)  # sums in float32 for bfloat16
    dwte = jnp.zeros(wte_shape, acc).at[ix.reshape(-1)].add(dout.reshape(-1, C).astype(acc))
    dwpe = jnp.zeros(wpe_shape, acc).at[:ix.shape[1]].set(dout.astype(acc).sum(0))
    return dwte, dwpe, None


def layernorm_forward(x, w, b=None, eps: float = 1e-5):
    """Normalise each row over its last axis (biased variance), then scale and shift: ``x (..., C)``, ``w, b (C,)``
    (``b=None``: no shift). Caches ``mean`` and ``rstd = 1/sqrt(var + eps)`` (``(..., 1)`` each), as llm.c does, not
    the normalised input."""
    if w.shape != x.shape[-1:] or (b is not None and b.shape != x.shape[-1:]):
        raise ValueError(f"layernorm: w and b must have shape ({x.shape[-1]},) for x {x.shape}, got {w.shape} and "
                         f"{None if b is None else b.shape}")
    xw = x.astype(wide(x.dtype))  # statistics in float32 for bfloat16
    mean = xw.mean(-1, keepdims=True)
    xc = xw - mean
    rstd = jax.lax.rsqrt((xc * xc).mean(-1, keepdims=True) + eps)
    y = xc * rstd * per_channel(w.astype(xw.dtype), x.ndim)
    y = y if b is None else y + per_channel(b.astype(xw.dtype), x.ndim)
    return y.astype(x.dtype), (x, w, mean, rstd, b is not None)


def layernorm_backward(dy, cache):
    """llm.c's form: ``n`` recomputed from ``mean`` and ``rstd``, ``g = w ⊙ dy``, then two reductions per row:
    ``dx = rstd · (g − mean(g) − n ⊙ mean(g ⊙ n))``; ``dw = Σ dy ⊙ n``, ``db = Σ dy`` over the leading axes."""
    x, w, mean, rstd, has_shift = cache
    check_shape("layernorm_backward: dy", dy, x.shape)
    dyw = dy.astype(mean.dtype)  # in float32 for bfloat16, as the forward's statistics
    n = (x.astype(mean.dtype) - mean) * rstd
    g = dyw * per_channel(w.astype(mean.dtype), x.ndim)
    dx = rstd * (g - g.mean(-1, keepdims=True) - n * (g * n).mean(-1, keepdims=True))
    C = x.shape[-1]
    return dx.astype(dy.dtype), (dyw * n).reshape(-1, C).sum(0), dyw.reshape(-1, C).sum(0) if has_shift else None


GELU_C = float(np.sqrt(2.0 / np.pi))


def gelu_forward(x):
    """GELU in GPT-2's tanh form: ``0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))``. Caches ``x`` (llm.c's ``fch``).
    bfloat16 in and out, float32 inside: XLA's CPU backend has no fast bfloat16 tanh (2–4× slower than this)."""
    xw = x.astype(wide(x.dtype))
    return (0.5 * xw * (1.0 + jnp.tanh(GELU_C * (xw + 0.044715 * xw**3)))).astype(x.dtype), x


def gelu_backward(dy, x):
    """``dx = dy · [0.5 (1 + tanh u) + 0.5 x sech²u · √(2/π) (1 + 3 · 0.044715 x²)]``, ``u`` recomputed from ``x``."""
    check_shape("gelu_backward: dy", dy, x.shape)
    xw = x.astype(wide(x.dtype))
    t = jnp.tanh(GELU_C * (xw + 0.044715 * xw**3))
    slope = 0.5 * (1.0 + t) + 0.5 * xw * (1.0 - t * t) * GELU_C * (1.0 + 3 * 0.044715 * xw * xw)
    return (dy.astype(xw.dtype) * slope).astype(dy.dtype)


def residual_forward(a, b):
    """``a + b``: the residual stream plus a block's branch."""
    if a.shape != b.shape:
        raise ValueError(f"residual: both inputs must have the same shape, got {a.shape} and {b.shape}")
    return a + b, a.shape


def residual_backward(dout, shape):
    """The gradient flows unchanged into both inputs."""
    check_shape("residual_backward: dout", dout, shape)
    return dout, dout


def heads(x, n_head: int):
    """``(B, T, C) -> (B, nh, T, hs)``."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """``(B, nh, T, hs) -> (B, T, C)``."""
    B, nh, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)


def split_heads_forward(qkv, n_head: int):
    """The heads from the fused projection: ``qkv (B, T, 3C) -> (q, k, v)``, each ``(B, nh, T, hs)``. What goes
    between this and :func:`attend_forward` — a rotary position encoding, fewer key/value heads — acts on heads."""
    if qkv.ndim != 3 or qkv.shape[-1] % 3 or (qkv.shape[-1] // 3) % n_head:
        raise ValueError(f"attention: qkv must be (B, T, 3C) with C divisible by n_head = {n_head}, got {qkv.shape}")
    C = qkv.shape[-1] // 3
    return tuple(heads(qkv[..., i * C:(i + 1) * C], n_head) for i in range(3)), (qkv.shape, n_head)


def split_heads_backward(dheads, cache):
    """The heads put back side by side: ``(dq, dk, dv) -> dqkv (B, T, 3C)`` (a reshape: nothing to compute)."""
    (B, T, C3), n_head = cache
    for name, d in zip(("dq", "dk", "dv"), dheads):
        check_shape(f"split_heads_backward: {name}", d, (B, n_head, T, C3 // 3 // n_head))
    return jnp.concatenate([merge_heads(d) for d in dheads], axis=-1), None


class AttendCache(NamedTuple):
    """What :func:`attend_backward` reads: the heads and the softmax's output."""

    q: jax.Array  # (B, nh, T, hs)
    k: jax.Array  # (B, nh, T, hs): the keys attended over (a KV cache's keys, for prefill)
    v: jax.Array  # (B, nh, T, hs)
    att: jax.Array  # (B, nh, T, T), exactly 0 above the diagonal
    scale: float | None = None  # the scores' factor; None: 1/√hs


def attend_forward(q, k, v, scale: float | None = None):
    """Causal attention per head (llm.c's ``attention_forward`` after the split): ``att = softmax(q kᵀ / √hs)`` over
    the positions ``t' <= t`` (later ones get exactly 0), then ``y = att v``, the heads merged: ``q, k, v (B, nh, T,
    hs) -> y (B, T, nh·hs)``. Caches ``q, k, v`` and ``att (B, nh, T, T)``: the softmax's backward needs its output
    only. Rows are shifted by their maximum, so logits of ±1e4 stay finite. ``scale`` replaces ``1/√hs`` (μP's
    ``√hs₀ / hs``: :func:`attention_scale`)."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attend: q, k, v must all be (B, nh, T, hs), got {q.shape}, {k.shape}, {v.shape}")
    T, hs = q.shape[2], q.shape[3]
    causal = jnp.tril(jnp.ones((T, T), bool))[None, None]  # (1, 1, T, T): position t sees t' <= t
    preatt = jnp.where(causal, matmul_nt(q, k) * (hs**-0.5 if scale is None else scale), -jnp.inf)  # (f32 for bf16)
    e = jnp.exp(preatt - preatt.max(-1, keepdims=True))  # the diagonal is never masked: a finite maximum per row
    att = e / e.sum(-1, keepdims=True)  # (B, nh, T, T), exactly 0 above the diagonal
    return merge_heads(matmul(att.astype(v.dtype), v).astype(q.dtype)), AttendCache(q, k, v, att, scale)


def attend_backward(dy, cache):
    """In reverse: the value mix (``datt = dy vᵀ``, ``dv = attᵀ dy``); the softmax in vector form,
    ``dpreatt = att ⊙ (datt − ⟨att, datt⟩)`` per row (0 wherever ``att`` is, so the masked positions get nothing);
    the scaled ``q kᵀ`` (``dq = dpreatt k / √hs``, ``dk = dpreattᵀ q / √hs``; or the cache's scale). Returns ``(dq, dk,
    dv)``."""
    q, k, v, att, scale = cache
    B, nh, T, hs = q.shape
    check_shape("attend_backward: dy", dy, (B, T, nh * hs))
    dyh = heads(dy, nh)  # (B, nh, T, hs)
    datt = matmul_nt(dyh, v)  # (B, nh, T, T), as wide as att
    dv = matmul_tn(att.astype(dy.dtype), dyh).astype(dy.dtype)
    scale = hs**-0.5 if scale is None else scale
    dpreatt = (att * (datt - (att * datt).sum(-1, keepdims=True)) * scale).astype(dy.dtype)
    return (matmul(dpreatt, k).astype(dy.dtype), matmul_tn(dpreatt, q).astype(dy.dtype), dv)


def qkv_attention_forward(qkv, n_head: int):
    """Causal multi-head attention on the fused projection, ``qkv (B, T, 3C) -> y (B, T, C)`` (llm.c's
    ``attention_forward``): :func:`split_heads_forward`, then :func:`attend_forward`."""
    (q, k, v), c_heads = split_heads_forward(qkv, n_head)  # (B, nh, T, hs) each
    y, c_att = attend_forward(q, k, v)  # (B, T, C)
    return y, (c_heads, c_att)


def qkv_attention_backward(dy, cache):
    """:func:`attend_backward`, then :func:`split_heads_backward`: ``(dqkv, None)``."""
    c_heads, c_att = cache
    return split_heads_backward(attend_backward(dy, c_att), c_heads)


class AttentionCache(NamedTuple):
    """The attention layer's caches, by name (llm.c's activation buffers)."""

    qkv: tuple  # the fused projection's (a column-parallel linear's)
    heads: tuple  # split_heads_forward's
    att: AttendCache | None  # attend_forward's; None when decoding one position against a KV cache
    proj: tuple  # the output projection's (a row-parallel linear's)
    kv: tuple | None  # decoding: the layer's keys and values after this position's were written, (B, nh, T, hs)


def self_attention_forward(x, W_qkv, b_qkv, W_proj, b_proj, n_head: int, axis: str | None = None, kv=None,
                           scale: float | None = None):
    """The whole attention layer: the fused projection ``x (B, T, C) @ W_qkv (C, 3C)``, the heads, causal attention,
    the output projection ``(C, C)``.

    ``axis`` (a mesh axis, inside ``shard_map``; Megatron's split by heads): ``W_qkv``/``b_qkv`` hold this device's
    ``n_head / n`` heads' query, key and value columns (:func:`jnnex.tensor_parallel.for_devices` lays them out),
    ``W_proj`` the matching rows; the projection's partial sums are all-reduced (one all-reduce forward, one of
    ``dx`` backward). ``n_head`` is the layer's whole count. ``None``: one device, the plain layer.

    ``kv = (K, V, pos)`` decodes one position (``x (B, 1, C)``) against a KV cache: its key and value are written at
    ``pos`` and its query attends over positions ``0 .. pos`` (:func:`attend_cached`); the cache's ``kv`` holds the
    updated ``(K, V)``. Eval mode only (no backward). ``scale``: the attention scores' factor (default ``1/√hs``)."""
    n_local = local_count("n_head", n_head, axis)
    qkv, c_qkv = column_linear_forward(x, W_qkv, b_qkv, axis)  # (B, T, 3C/n)
    (q, k, v), c_heads = split_heads_forward(qkv, n_local)  # (B, nh/n, T, hs) each
    if kv is None:
        y, c_att = attend_forward(q, k, v, scale)  # (B, T, C/n)
        new_kv = None
    else:
        K, V, pos = kv
        new_kv = write_kv(K, V, k, v, pos)  # (B, nh/n, T, hs) each
        y, c_att = attend_cached(q, *new_kv, pos, scale), None
    out, c_proj = row_linear_forward(y, W_proj, b_proj, axis)  # (B, T, C)
    return out, AttentionCache(c_qkv, c_heads, c_att, c_proj, new_kv)


def self_attention_backward(dout, cache):
    """The backwards in reverse order: ``(dx, dW_qkv, db_qkv, dW_proj, db_proj, None)``."""
    dy, dW_proj, db_proj = row_linear_backward(dout, cache.proj)
    dqkv, _ = split_heads_backward(attend_backward(dy, cache.att), cache.heads)
    dx, dW_qkv, db_qkv = column_linear_backward(dqkv, cache.qkv)
    return dx, dW_qkv, db_qkv, dW_proj, db_proj, None


PAIRS = {  # the transformer's own pairs (jnnex.layers.PAIRS: linear, cross-entropy)
    "token_position_embedding": Pair(token_position_embedding_forward, token_position_embedding_backward,
                                     ("wte", "wpe", "ix"), fixed=("ix",)),
    "layernorm": Pair(layernorm_forward, layernorm_backward, ("x", "w", "b")),
    "gelu": Pair(gelu_forward, gelu_backward, ("x",)),
    "residual": Pair(residual_forward, residual_backward, ("a", "b")),
    "split_heads": Pair(split_heads_forward, split_heads_backward, ("qkv", "n_head"), fixed=("n_head",)),
    "attend": Pair(attend_forward, attend_backward, ("q", "k", "v")),
    "qkv_attention": Pair(qkv_attention_forward, qkv_attention_backward, ("qkv", "n_head"), fixed=("n_head",)),
    "self_attention": Pair(self_attention_forward, self_attention_backward,
                           ("x", "W_qkv", "b_qkv", "W_proj", "b_proj", "n_head"), fixed=("n_head",)),
}


# ----------------------------------------------------------------------------------------------------------------------
# μP (the maximal update parametrisation; Yang et al. 2022, "Tensor Programs V"): what changes with the width


PARAMETRISATIONS = ("standard", "mup")


def check_parametrisation(cfg) -> None:
    """Clear errors for a parametrisation that cannot be: an unknown name, a base width given without μP, or one
    that its heads do not divide (μP's attention scale is √(base_width / n_head) / head size)."""
    check_choice("param", cfg.param, PARAMETRISATIONS)
    if cfg.base_width is None:
        return
    if cfg.param != "mup":
        raise ValueError("base_width is μP's base: give param mup too (or drop base_width)")
    positive_int("base_width", cfg.base_width)
    if cfg.base_width % cfg.n_head:
        raise ValueError(f"base_width ({cfg.base_width}) must be divisible by n_head ({cfg.n_head}): μP's attention "
                         f"scale is √(base head size) / head size")


def width_ratio(cfg) -> float:
    """μP's ``r = n_embd / base_width`` (1 under the standard parametrisation)."""
    if cfg.param != "mup" or cfg.base_width is None:
        return 1.0
    return cfg.n_embd / cfg.base_width


def attention_scale(cfg) -> float | None:
    """The attention scores' factor: ``None`` (``1/√hs``) under the standard parametrisation; μP's ``√hs₀ / hs``
    (``hs₀`` the base head size), which is ``1/√hs`` at the base width and ``∝ 1/hs`` as it grows."""
    if width_ratio(cfg) == 1.0:
        return None
    hs, hs0 = cfg.n_embd // cfg.n_head, cfg.base_width // cfg.n_head
    return hs0**0.5 / hs


def readout_scale(cfg) -> float:
    """μP's readout multiplier ``1/r`` on the logits (1: none)."""
    return 1.0 / width_ratio(cfg)


HIDDEN = ("qkv", "attproj", "fc", "fcproj")  # the blocks' matrices: μP's hidden weights (the GPT's; the Llama's too)


def lr_scales(cfg, params):
    """μP's learning-rate multipliers for Adam, a tree like ``params``: ``1/r`` for the blocks' hidden matrices, 1
    for everything else (embeddings, the readout, gains and biases). ``None`` under the standard parametrisation."""
    r = width_ratio(cfg)
    if r == 1.0:
        return None
    ones = jax.tree.map(lambda _: 1.0, params)
    blocks = tuple(b._replace(**{name: getattr(b, name)._replace(W=1.0 / r) for name in HIDDEN})
                   for b in ones.blocks)
    return ones._replace(blocks=blocks)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = setting(27, "V: tokens in the vocabulary (set from the data)")
    block_size: int = setting(16, "T: the longest word + 1 (set from the data); the position table's length")
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "attention heads per block (n_embd must divide by it)")
    n_embd: int = setting(64, "C: the residual stream's width")
    dropout: float = setting(0.0, "residual dropout in training: embeddings and each branch's output (0: off, as "
                                  "makemore.py)")
    bias: bool = setting(True, "biases in every linear and LayerNorm (false: none, nanoGPT's bias=False)")
    tie: bool = setting(False, "the LM head is the token embedding's transpose (GPT-2's and nanoGPT's weight tying)")
    precision: str = setting("float32", "the forward's and backward's arithmetic: float32 (the parameters' own), or "
                                        "bfloat16 with float32 sums, norms, softmax and loss (parameters stay float32)",
                             choices=PRECISIONS)
    recompute: str = setting("none", "what the training forward keeps for the backward: none (every block's "
                                     "activations) or blocks (each block's input alone, about 1/20 of its caches; "
                                     "its forward runs again in the backward, one block's caches at a time)",
                             choices=RECOMPUTE)
    param: str = setting("standard", "the parametrisation: standard (GPT-2's) or mup (μP, Tensor Programs V: hidden "
                                     "matrices initialised and trained 1/r, the readout multiplied by 1/r, attention "
                                     "√hs₀/hs, r = n_embd / base_width)", choices=PARAMETRISATIONS)
    base_width: int | None = setting(None, "μP's base n_embd, where it equals standard (param mup; none: n_embd)",
                                     none=None)
    model_axis: str | None = setting(None, "the mesh axis the blocks' heads and MLP split along under jax.shard_map "
                                           "(Megatron's tensor parallelism; set by jnnex.tensor_parallel)", flag=False)
    batch_axis: str | None = setting(None, "the mesh axis the batch's rows split along under jax.shard_map: dropout "
                                           "masks drawn for the whole batch (set by jnnex.tensor_parallel)", flag=False)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            positive_int(name, getattr(self, name))
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("recompute", self.recompute, RECOMPUTE)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_parametrisation(self)


class LayerNorm(NamedTuple):
    w: jax.Array  # (C,) gain
    b: jax.Array | None  # (C,) shift; None without biases


class Block(NamedTuple):
    ln1: LayerNorm
    qkv: Linear  # (C, 3C): queries, keys, values of every head, fused
    attproj: Linear  # (C, C)
    ln2: LayerNorm
    fc: Linear  # (C, 4C)
    fcproj: Linear  # (4C, C)


class GPTParams(NamedTuple):
    wte: jax.Array  # (V, C) token embeddings
    wpe: jax.Array  # (block_size, C) position embeddings
    blocks: tuple  # n_layer Blocks
    lnf: LayerNorm
    lm_head: jax.Array | None  # (C, V), no bias; None when tied to wte


def init(key, cfg: GPTConfig):
    """GPT-2's initialisation; under μP the blocks' matrices' standard deviations are divided by ``√r`` (variance
    ``∝ 1/fan-in``), the embeddings and the readout kept."""
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    hidden_std = INIT_STD / math.sqrt(width_ratio(cfg))
    resid_std = hidden_std / math.sqrt(2 * L)
    keys = iter(jax.random.split(key, 3 + 4 * L))

    def normal(shape, std=INIT_STD):
        return std * jax.random.normal(next(keys), shape, jnp.float32)

    def ln():
        return LayerNorm(jnp.ones((C,), jnp.float32), jnp.zeros((C,), jnp.float32) if cfg.bias else None)

    def linear(n_in, n_out, std=INIT_STD):
        return Linear(normal((n_in, n_out), std), jnp.zeros((n_out,), jnp.float32) if cfg.bias else None)

    wte, wpe = normal((V, C)), normal((cfg.block_size, C))
    blocks = tuple(Block(ln(), linear(C, 3 * C, hidden_std), linear(C, C, resid_std), ln(), linear(C, 4 * C, hidden_std),
                         linear(4 * C, C, resid_std)) for _ in range(L))
    return GPTParams(wte, wpe, blocks, ln(), None if cfg.tie else normal((C, V))), ()


# ----------------------------------------------------------------------------------------------------------------------
# The block: one function each way, which the training forward, the KV-cache decode and every parallel scheme call


class BlockCache(NamedTuple):
    """One block's caches, by name, in forward order."""

    ln1: tuple
    attn: AttentionCache
    drop1: jax.Array | None  # the attention branch's dropout mask (scaled); None when nothing was dropped
    res1: tuple
    ln2: tuple
    fc: tuple  # a column-parallel linear's
    gelu: jax.Array
    fcproj: tuple  # a row-parallel linear's
    drop2: jax.Array | None
    res2: tuple


def block_forward(cfg: GPTConfig, blk: Block, h, i=0, *, train: bool = False, key=None, kv=None):
    """Block ``i`` (its dropout masks are numbers ``2i + 1`` and ``2i + 2`` of the forward's ``key``) on the residual
    stream ``h (B, T, C)``: ``h + attention(ln1(h))``, then ``+ mlp(ln2(·))``. ``cfg.model_axis`` splits the attention
    by heads and the MLP by hidden units (Megatron: ``qkv`` and ``fc`` column-parallel, ``attproj`` and ``fcproj``
    row-parallel); ``kv = (K, V, pos)`` decodes one position against a KV cache. Returns ``(h, BlockCache)``."""
    a, c_ln1 = layernorm_forward(h, blk.ln1.w, blk.ln1.b)
    a, c_attn = self_attention_forward(a, blk.qkv.W, blk.qkv.b, blk.attproj.W, blk.attproj.b, cfg.n_head,
                                       cfg.model_axis, kv, attention_scale(cfg))  # (B, T, C)
    a, c_drop1 = dropout_in_training(a, key, 2 * i + 1, cfg.dropout, train, cfg.batch_axis)
    h, c_res1 = residual_forward(h, a)
    m, c_ln2 = layernorm_forward(h, blk.ln2.w, blk.ln2.b)
    m, c_fc = column_linear_forward(m, blk.fc.W, blk.fc.b, cfg.model_axis)  # (B, T, 4C/n)
    m, c_gelu = gelu_forward(m)
    m, c_fcproj = row_linear_forward(m, blk.fcproj.W, blk.fcproj.b, cfg.model_axis)  # (B, T, C)
    m, c_drop2 = dropout_in_training(m, key, 2 * i + 2, cfg.dropout, train, cfg.batch_axis)
    h, c_res2 = residual_forward(h, m)
    return h, BlockCache(c_ln1, c_attn, c_drop1, c_res1, c_ln2, c_fc, c_gelu, c_fcproj, c_drop2, c_res2)


def block_backward(dh, c: BlockCache):
    """:func:`block_forward` in reverse: ``dh (B, T, C)``, the gradient at the block's output, to ``(dh at its input,
    the block's gradients)``. Each residual add passes ``dh`` unchanged to the stream *and* to its branch, and what the
    branch sends back is added to it (llm.c's ``+=``)."""
    dh, dm = residual_backward(dh, c.res2)  # the MLP branch
    if c.drop2 is not None:
        dm, _, _ = dropout_backward(dm, c.drop2)
    dm, dfcproj_W, dfcproj_b = row_linear_backward(dm, c.fcproj)
    dm = gelu_backward(dm, c.gelu)
    dm, dfc_W, dfc_b = column_linear_backward(dm, c.fc)
    dm, dln2_w, dln2_b = layernorm_backward(dm, c.ln2)
    dh = dh + dm
    dh, da = residual_backward(dh, c.res1)  # the attention branch
    if c.drop1 is not None:
        da, _, _ = dropout_backward(da, c.drop1)
    da, dqkv_W, dqkv_b, dproj_W, dproj_b, _ = self_attention_backward(da, c.attn)
    da, dln1_w, dln1_b = layernorm_backward(da, c.ln1)
    dblk = Block(LayerNorm(dln1_w, dln1_b), Linear(dqkv_W, dqkv_b), Linear(dproj_W, dproj_b),
                 LayerNorm(dln2_w, dln2_b), Linear(dfc_W, dfc_b), Linear(dfcproj_W, dfcproj_b))
    return dh + da, dblk


def split(cfg: GPTConfig) -> dict:
    """Megatron's split of a block, as data (:mod:`jnnex.tensor_parallel` reads it): ``qkv`` by the columns of each
    device's heads (its queries, keys and values side by side), ``fc`` by hidden units; ``attproj`` and ``fcproj`` by
    the matching rows. Everything outside the blocks is replicated."""
    hs = cfg.n_embd // cfg.n_head
    heads = Part("n_head", cfg.n_head, hs)
    return {"qkv": Column((heads, heads, heads)), "attproj": ROW,
            "fc": Column((Part("the MLP width 4·n_embd", 4 * cfg.n_embd),)), "fcproj": ROW}


# ----------------------------------------------------------------------------------------------------------------------
# The model


class Caches(NamedTuple):
    """The forward's caches, by name."""

    emb: tuple
    drop0: jax.Array | None
    blocks: tuple  # n_layer BlockCaches
    lnf: tuple
    head: tuple


def forward(cfg: GPTConfig, params: GPTParams, state, x, train: bool, key=None) -> Forward:
    """``Forward(logits (B, T, V), (), Caches, acts)`` for ``x (B, T)``, ``T <= block_size``. ``acts`` holds each
    block's output (the residual stream after it), ``(B, T, C)``, for diagnostics."""
    check_dropout_key(cfg.dropout, train, key)
    if x.ndim != 2 or not 1 <= x.shape[1] <= cfg.block_size:
        raise ValueError(f"gpt: x must have shape (B, T <= {cfg.block_size}), got {x.shape}")
    params = compute_params(params, cfg.precision)  # bfloat16: every layer below computes in it
    h, (c_emb, c_drop0) = embed_forward(cfg, params, x, train, key)
    block_caches, acts = [], []
    for i, blk in enumerate(params.blocks):
        h_in = h
        h, c_block = block_forward(cfg, blk, h, i, train=train, key=key)
        block_caches.append(keep(cfg.recompute, h_in, i, key, train, c_block))  # (recompute: the input alone)
        acts.append(h)
    logits, (c_lnf, c_head) = top_forward(cfg, params, h)  # (B, T, V)
    return Forward(logits, state, Caches(c_emb, c_drop0, tuple(block_caches), c_lnf, c_head), tuple(acts))


def embed_forward(cfg: GPTConfig, params: GPTParams, x, train: bool, key=None):
    """What comes before the blocks: token + position embeddings, and their dropout. ``(h (B, T, C), cache)``."""
    h, c_emb = token_position_embedding_forward(params.wte, params.wpe, x)
    h, c_drop0 = dropout_in_training(h, key, 0, cfg.dropout, train, cfg.batch_axis)
    return h, (c_emb, c_drop0)


def embed_backward(cfg: GPTConfig, dh, cache) -> dict:
    """:func:`embed_forward`'s backward: the gradients of the tables it read, by field."""
    c_emb, c_drop0 = cache
    if c_drop0 is not None:
        dh, _, _ = dropout_backward(dh, c_drop0)
    dwte, dwpe, _ = token_position_embedding_backward(dh, c_emb)
    return {"wte": dwte, "wpe": dwpe}


def top_forward(cfg: GPTConfig, params: GPTParams, h):
    """What comes after the blocks: the final LayerNorm and the LM head. ``(logits (B, T, V), cache)``."""
    h, c_lnf = layernorm_forward(h, params.lnf.w, params.lnf.b)
    logits, c_head = head_forward(h, transpose(params.wte) if cfg.tie else params.lm_head)
    mult = readout_scale(cfg)
    return (logits if mult == 1.0 else logits * mult), (c_lnf, c_head)  # (μP: the readout's 1/r)


def top_backward(cfg: GPTConfig, dlogits, cache):
    """:func:`top_forward`'s backward: ``(dh, {field: gradient})`` — the final LayerNorm's and the head's (when tied,
    the token table's, which :func:`embed_backward`'s adds to)."""
    c_lnf, c_head = cache
    mult = readout_scale(cfg)
    dlogits = (dlogits if mult == 1.0 else dlogits * mult).astype(c_head[0].dtype)  # (bfloat16: computes in it)
    dh, dW = head_backward(dlogits, c_head, cfg.tie)
    dh, dlnf_w, dlnf_b = layernorm_backward(dh, c_lnf)
    return dh, {"lnf": LayerNorm(dlnf_w, dlnf_b), **({"wte": dW, "lm_head": None} if cfg.tie else {"lm_head": dW})}


def head_forward(h, W):
    """The LM head, ``h @ W`` without a bias, its logits left in float32 for bfloat16 (the loss's softmax reads them
    there); :func:`jnnex.layers.linear_backward` is its backward, given ``dlogits`` in ``h``'s dtype."""
    return matmul(h, W), (h, W, False)


def head_backward(dlogits, cache, tied: bool):
    """:func:`head_forward`'s backward: ``dh = dlogits Wᵀ`` and ``W``'s gradient ``hᵀ dlogits`` (C, V), or, ``tied``
    (``W`` is the token table transposed), the table's own gradient ``dlogitsᵀ h`` (V, C): the same numbers, computed
    in the table's layout instead of transposed after the product (XLA's CPU backend rewrites that transpose into a
    bfloat16 product its runtime cannot run)."""
    if not tied:
        dh, dW, _ = linear_backward(dlogits, cache)
        return dh, dW
    h, W, _ = cache
    check_shape("head_backward: dlogits", dlogits, h.shape[:-1] + (W.shape[1],))
    dh = matmul_nt(dlogits, W).astype(dlogits.dtype)
    return dh, matmul_tn(dlogits.reshape(-1, dlogits.shape[-1]), h.reshape(-1, h.shape[-1]))


def backward(cfg: GPTConfig, params: GPTParams, caches: Caches, dlogits):
    """Every gradient by hand, in reverse order of :func:`forward`: the head, the final LayerNorm, each block's
    :func:`block_backward` (last first), the embeddings. ``act_grads[i]`` is the loss gradient at block ``i``'s
    output."""
    dh, top = top_backward(cfg, dlogits, (caches.lnf, caches.head))
    dblocks, act_grads = [], []
    for blk, c_block in zip(reversed(params.blocks), reversed(caches.blocks)):
        act_grads.append(dh)
        c_block, dh = recomputed(block_forward, cfg, blk, c_block, dh)  # (a kept cache as it is)
        dh, dblk = block_backward(dh, c_block)
        dblocks.append(dblk)
    grads = params._replace(blocks=tuple(reversed(dblocks)),
                            **merge_grads(embed_backward(cfg, dh, (caches.emb, caches.drop0)), top))
    if cfg.precision != "float32":  # the cast's backward: float32 gradients again
        grads = param_grads(grads, params)
    return grads, tuple(reversed(act_grads))


# ----------------------------------------------------------------------------------------------------------------------
# Sampling with a KV cache: each new token runs the blocks once, over its one position


class KVCache(NamedTuple):
    """Every block's keys and values of the positions read so far, in a buffer of the full context; positions at
    and after the one being decoded hold stale values that the causal mask never reads."""

    k: tuple  # per block, (B, nh, T, hs) (the Llama's: its n_kv_head shared heads, rotated)
    v: tuple  # per block, (B, nh, T, hs)


def write_kv(K, V, k, v, pos):
    """A layer's cached keys and values ``K, V (B, heads, T, hs)`` with position ``pos`` (traced) set to ``k, v (B,
    heads, 1, hs)`` (``lax.dynamic_update_slice``: one program for every position). Returns ``(K, V)``."""
    at = (jnp.int32(0), jnp.int32(0), jnp.asarray(pos, jnp.int32), jnp.int32(0))
    return (jax.lax.dynamic_update_slice(K, k.astype(K.dtype), at),
            jax.lax.dynamic_update_slice(V, v.astype(V.dtype), at))


def prefill(cfg: GPTConfig, params: GPTParams, x):
    """The forward over ``x (B, block_size)`` (eval mode), keeping each block's keys and values: ``(logits (B, T, V),
    KVCache)``. Reads them from the attention caches the forward already makes for the backward."""
    if x.shape[1] != cfg.block_size:
        raise ValueError(f"gpt.prefill: x must be (B, {cfg.block_size}), a full context buffer; got {x.shape}")
    out = forward(cfg, params, (), x, train=False)
    atts = [c.attn.att for c in out.caches.blocks]
    return out.logits, KVCache(tuple(a.k for a in atts), tuple(a.v for a in atts))


def attend_cached(q, K, V, pos, scale: float | None = None):
    """One query position against the cache: ``q (B, nh, 1, hs)``, ``K, V (B, nh, T, hs)`` valid up to ``pos``
    (included) -> ``y (B, 1, nh·hs)``. The same softmax as :func:`attend_forward`, one row of it."""
    T, hs = K.shape[2], K.shape[3]
    scores = matmul_nt(q, K) * (hs**-0.5 if scale is None else scale)  # (B, nh, 1, T)
    scores = jnp.where((jnp.arange(T, dtype=jnp.int32) <= pos)[None, None, None, :], scores, -jnp.inf)
    e = jnp.exp(scores - scores.max(-1, keepdims=True))
    return merge_heads(matmul((e / e.sum(-1, keepdims=True)).astype(V.dtype), V).astype(q.dtype))


def decode(cfg: GPTConfig, params: GPTParams, cache: KVCache, token, pos):
    """The next position: ``token (B,)`` read at position ``pos`` (``< block_size``; traced: one program for all
    positions), through each :func:`block_forward` with its layer's cache: its keys and values are written there and
    its query attends over positions ``0 .. pos``. Returns ``(logits (B, V), cache)``: the full forward's logits at
    ``pos``."""
    pos = jnp.asarray(pos, jnp.int32)
    params = compute_params(params, cfg.precision)
    h = (params.wte[token] + jax.lax.dynamic_index_in_dim(params.wpe, pos, keepdims=True))[:, None, :]  # (B, 1, C)
    kvs = []
    for i, blk in enumerate(params.blocks):
        h, c_block = block_forward(cfg, blk, h, i, kv=(cache.k[i], cache.v[i], pos))
        kvs.append(c_block.attn.kv)
    logits, _ = top_forward(cfg, params, h)  # (B, 1, V)
    return logits[:, 0], KVCache(tuple(K for K, _ in kvs), tuple(V for _, V in kvs))


def embeddings(params: GPTParams) -> jax.Array:
    return params.wte


def attention_maps(cfg: GPTConfig, params: GPTParams, x) -> jax.Array:
    """Every block's attention weights on ``x (B, T)`` in eval mode: ``(n_layer, B, n_head, T, T)``, row ``t`` the
    softmax over the positions ``t' <= t`` that position ``t`` reads (the picture of what a trained model attends to).
    Read from the forward's own caches (:func:`attend_forward` keeps ``att`` for its backward)."""
    caches = forward(cfg, params, (), x, train=False).caches
    return jnp.stack([c.attn.att.att for c in caches.blocks])


PIPE = Pipe(embed_forward, embed_backward, block_forward, block_backward, top_forward, top_backward)


def gpt(cfg: GPTConfig = GPTConfig()) -> LanguageModel:
    """makemore.py's transformer; ``.with_gradients("manual")`` trains it on :func:`backward`."""
    return LanguageModel("gpt", cfg, init, forward, backward, stochastic=cfg.dropout > 0, per_position=True,
                         embeddings_fn=embeddings, prefill_fn=prefill, decode_fn=decode, split_fn=split,
                         pipe=PIPE, lr_scale_fn=lr_scales)
