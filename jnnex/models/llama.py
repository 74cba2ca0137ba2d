"""A Llama (Touvron et al. 2023; Llama 2 and 3's block) with every gradient written by hand, beside its forwards, in
the order llm.c's ``llama3`` branch takes them.

    x = wte[idx]                                                (B, T, C)   no position table
    for each of the n_layer blocks (pre-RMSNorm):
        x = x + proj(attention(rope(q), rope(k), v))            (B, T, C)   grouped-query causal attention
        x = x + fcproj(silu(x W₁) ⊙ (x W₃))                     (B, T, C)   SwiGLU, C -> H -> C
    logits = rmsnorm(x) @ lm_head                               (B, T, V)

What changed since GPT-2 (:mod:`jnnex.models.gpt`), each a forward/backward pair below:

* **RMSNorm** (Zhang & Sennrich 2019) instead of LayerNorm: no mean, no shift, ``x · rsqrt(mean(x²) + eps) · g``.
* **Rotary position embeddings** (Su et al. 2021) instead of a learned table: queries and keys are rotated, pair of
  channels by pair, by an angle proportional to their position, so ``q · k`` depends on the distance between them.
* **SwiGLU** (Shazeer 2020) instead of GELU: a gated MLP of hidden width ``H = ⌈(2/3 · 4C) / m⌉ · m``, Llama's rule
  (three matrices of ``C × H`` cost what two of ``C × 4C`` did).
* **Grouped-query attention** (Ainslie et al. 2023): ``n_kv_head`` key/value heads, each shared by ``n_head /
  n_kv_head`` query heads; the KV cache shrinks by that factor.
* **No biases** anywhere; the head untied by default (``tie=True`` ties it, as the GPT can).
* Attention plain (:func:`jnnex.models.gpt.attend_forward`, the ``T × T`` matrix) or tiled
  (:func:`jnnex.models.flash.flash_attend_forward`, memory linear in T), by a setting.

Initialisation is the GPT's (GPT-2's): ``N(0, 0.02)``, the residual projections ``N(0, 0.02 / sqrt(2 · n_layer))``,
norm gains 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.collectives import (
    ROW, Column, ExpertsSplit, Part, column_linear_backward, column_linear_forward, local_count, row_linear_backward,
    row_linear_forward,
)
from jnnex.layers import (
    PRECISIONS, RECOMPUTE, Linear, Pair, check_dropout_key, check_shape, compute_params, dropout_backward,
    dropout_in_training, embedding_backward, embedding_forward, keep, param_grads, per_channel, recomputed,
    transpose, wide,
)
from jnnex.lm import Forward, LanguageModel, Pipe, merge_grads
from jnnex.models import flash, moe
from jnnex.models.gpt import (
    INIT_STD, PARAMETRISATIONS, KVCache, attend_backward, attend_cached, attend_forward, attention_scale,
    check_parametrisation, head_backward, head_forward, heads, lr_scales, merge_heads, readout_scale, width_ratio,
    write_kv,
)
from jnnex.settings import check_choice, positive_int, setting

ROPE_BASE = 10_000.0  # the rotation's base (Llama 2's; Llama 3 uses 500,000)


# ----------------------------------------------------------------------------------------------------------------------
# RMSNorm: y = x · rstd · g,  rstd = 1 / sqrt(mean(x²) + eps)


def rmsnorm_forward(x, g, eps: float = 1e-5):
    """Scale each row of ``x (..., C)`` to unit root-mean-square, then by the gain ``g (C,)``. Caches ``rstd``
    ``(..., 1)``, as llm.c caches LayerNorm's."""
    if x.shape[-1:] != g.shape:
        raise ValueError(f"rmsnorm: x (..., C) and g (C,) must agree on C, got {x.shape} and {g.shape}")
    xw = x.astype(wide(x.dtype))  # the statistic in float32 for bfloat16
    rstd = jax.lax.rsqrt((xw * xw).mean(-1, keepdims=True) + eps)
    return (xw * rstd * per_channel(g.astype(xw.dtype), x.ndim)).astype(x.dtype), (x, g, rstd)


def rmsnorm_backward(dy, cache):
    """With ``x̂ = x · rstd``: ``dg = Σ_rows dy ⊙ x̂`` and ``dx = rstd · (dy ⊙ g − x̂ · mean(dy ⊙ g ⊙ x̂))`` — one
    reduction per row (LayerNorm's two, less the mean's). Computed as ``rstd · dy⊙g − x · rstd³ · mean(dy⊙g⊙x)``:
    the per-row factors outside the sums, no ``x̂`` formed (XLA's program for this form is the faster one on CPU from
    512 sequences: ``jnnex bench --only llama``). Returns ``(dx, dg)``."""
    x, g, rstd = cache
    check_shape("rmsnorm_backward: dy", dy, x.shape)
    dyw, xw = dy.astype(rstd.dtype), x.astype(rstd.dtype)  # in float32 for bfloat16, as the forward's statistic
    dyg = dyw * per_channel(g.astype(rstd.dtype), x.ndim)
    dx = rstd * dyg - xw * ((dyg * xw).mean(-1, keepdims=True) * rstd**3)
    return dx.astype(dy.dtype), (dyw * xw * rstd).reshape(-1, x.shape[-1]).sum(0)


# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embedding, the rotate-half form: channel i and channel i + hs/2 of a head are one pair, rotated by
# the angle pos · base^(-2i/hs).


def rope_angles(T: int, hs: int, pos0=0, base: float = ROPE_BASE, dtype=jnp.float32):
    """``(cos, sin)``, each ``(T, hs/2)``, of positions ``pos0 .. pos0 + T − 1`` (``pos0`` may be traced: the KV
    cache's position), computed in ``dtype``."""
    freq = jnp.asarray(base, dtype) ** (-jnp.arange(0, hs, 2, dtype=dtype) / hs)  # (hs/2,)
    angle = (jnp.asarray(pos0, dtype) + jnp.arange(T, dtype=dtype))[:, None] * freq[None, :]
    return jnp.cos(angle), jnp.sin(angle)


def check_head_size(hs: int) -> None:
    if hs % 2:
        raise ValueError(f"rotary positions rotate pairs of channels: the head size n_embd / n_head must be even, "
                         f"got {hs}")


def rope_forward(x, pos0=0, base: float = ROPE_BASE):
    """Rotate the heads ``x (B, nh, T, hs)`` at positions ``pos0 ..``: with ``x = [x₁, x₂]`` (halves),
    ``y = [x₁ cos − x₂ sin, x₂ cos + x₁ sin]``."""
    if x.ndim != 4:
        raise ValueError(f"rope: x must be heads (B, nh, T, hs), got {x.shape}")
    check_head_size(x.shape[-1])
    # The angles in float32 at least (as Llama computes them for bfloat16), float64 for a float64 model: an exact
    # rotation, cos² + sin² = 1 to the model's precision.
    dtype = x.dtype if jnp.finfo(x.dtype).bits >= 32 else jnp.float32
    cos, sin = (a.astype(x.dtype)[None, None] for a in rope_angles(x.shape[2], x.shape[3], pos0, base, dtype))
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1), (x.shape, cos, sin)


def rope_backward(dy, cache):
    """The rotation by the negative angle: a rotation is orthogonal, so its transpose — what carries a gradient
    back — is its inverse. ``dx = [dy₁ cos + dy₂ sin, dy₂ cos − dy₁ sin]``; ``(dx, None)`` (``pos0`` and ``base``
    are settings, as a norm's ``eps``)."""
    shape, cos, sin = cache
    check_shape("rope_backward: dy", dy, shape)
    d1, d2 = jnp.split(dy, 2, axis=-1)
    return jnp.concatenate([d1 * cos + d2 * sin, d2 * cos - d1 * sin], axis=-1), None


# ----------------------------------------------------------------------------------------------------------------------
# SwiGLU on the fused projection: h = [x W₁, x W₃] (B, T, 2H) -> silu(h₁) ⊙ h₃ (B, T, H)


def hidden_width(n_embd: int, multiple: int) -> int:
    """Llama's rule: ``2/3 · 4C``, rounded up to a multiple of ``multiple``. ``hidden_width(4096, 256) == 11008``."""
    return multiple * math.ceil(int(2 * 4 * n_embd / 3) / multiple)


def swiglu_forward(h):
    """``h (..., 2H) -> silu(h₁) ⊙ h₃ (..., H)``, ``silu(a) = a · σ(a)``; caches ``h``."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu: the fused projection's last axis must be even (the gate and the value), got "
                         f"{h.shape}")
    a, b = jnp.split(h.astype(wide(h.dtype)), 2, axis=-1)  # float32 inside for bfloat16 (as GELU: XLA's CPU speed)
    return (jax.nn.sigmoid(a) * a * b).astype(h.dtype), h


def swiglu_backward(dy, h):
    """``da = dy ⊙ b ⊙ silu'(a)``, ``silu'(a) = σ(a) (1 + a (1 − σ(a)))``; ``db = dy ⊙ silu(a)``, side by side."""
    check_shape("swiglu_backward: dy", dy, h.shape[:-1] + (h.shape[-1] // 2,))
    a, b = jnp.split(h.astype(wide(h.dtype)), 2, axis=-1)
    s, dyw = jax.nn.sigmoid(a), dy.astype(a.dtype)
    return jnp.concatenate([dyw * b * s * (1 + a * (1 - s)), dyw * a * s], axis=-1).astype(dy.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Grouped-query heads: n_head query heads, n_kv_head key/value heads, query head j reads key/value head j // rep


def split_gqa_forward(qkv, n_head: int, n_kv_head: int):
    """The heads from the fused projection ``qkv (B, T, (nh + 2·nkv)·hs)``: ``q (B, nh, T, hs)``, ``k, v (B, nkv, T,
    hs)``."""
    check_heads(n_head, n_kv_head)
    width = qkv.shape[-1]
    if qkv.ndim != 3 or width % (n_head + 2 * n_kv_head):
        raise ValueError(f"attention: qkv must be (B, T, (n_head + 2 n_kv_head) · hs) with n_head = {n_head}, "
                         f"n_kv_head = {n_kv_head}, got {qkv.shape}")
    hs = width // (n_head + 2 * n_kv_head)
    q, k, v = jnp.split(qkv, [n_head * hs, (n_head + n_kv_head) * hs], axis=-1)
    return (heads(q, n_head), heads(k, n_kv_head), heads(v, n_kv_head)), qkv.shape


def split_gqa_backward(dheads, shape):
    """The heads put back side by side (a reshape): ``(dqkv, None, None)``."""
    dq, dk, dv = dheads
    B, T, _ = shape
    check_shape("split_gqa_backward: dk", dk, (B, dk.shape[1], T, dq.shape[-1]))
    return jnp.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1), None, None


def check_heads(n_head: int, n_kv_head: int) -> None:
    positive_int("n_head", n_head)
    positive_int("n_kv_head", n_kv_head)
    if n_head % n_kv_head:
        raise ValueError(f"n_head ({n_head}) must be divisible by n_kv_head ({n_kv_head}): each key/value head "
                         f"serves the same number of query heads")


def repeat_kv_forward(x, n_rep: int):
    """``(B, nkv, T, hs) -> (B, nkv · n_rep, T, hs)``: each key/value head repeated for its ``n_rep`` query heads."""
    return jnp.repeat(x, n_rep, axis=1), (x.shape, n_rep)


def repeat_kv_backward(dy, cache):
    """llm.c's ``repkv_backward``: a shared head's gradient is the sum of its group's. ``(dx, None)``."""
    shape, n_rep = cache
    B, nkv, T, hs = shape
    check_shape("repeat_kv_backward: dy", dy, (B, nkv * n_rep, T, hs))
    return dy.reshape(B, nkv, n_rep, T, hs).sum(2), None


# ----------------------------------------------------------------------------------------------------------------------
# The attention layer: fused projection, grouped heads, rotary positions on q and k, causal attention (plain or
# tiled), output projection


class AttentionCache(NamedTuple):
    """The attention layer's caches, by name."""

    qkv: tuple  # the fused projection's (a column-parallel linear's)
    split: tuple  # split_gqa_forward's
    rope_q: tuple
    rope_k: tuple
    repeat_k: tuple
    repeat_v: tuple
    tile: int | None  # the attention's tile (None: plain)
    att: tuple | None  # the attention pair's (plain or tiled); None when decoding against a KV cache
    proj: tuple  # the output projection's (a row-parallel linear's)
    kv: tuple  # the keys (rotated) and values of the n_kv_head shared heads, (B, nkv, T, hs) each: what a KV cache
    #            keeps (when decoding, the cache's after this position's were written)


def attention_forward(x, W_qkv, W_proj, n_head: int, n_kv_head: int, tile: int | None = None, pos0=0,
                      base: float = ROPE_BASE, axis: str | None = None, kv=None, scale: float | None = None):
    """``x (B, T, C) -> (B, T, C)``; ``tile=None``: the plain attention pair, else the tiled one with tiles of
    ``tile``. The cache holds the rotated keys and values too (what a KV cache keeps).

    ``axis`` (inside ``shard_map``; Megatron's split by heads): each device its ``n_head / n`` query heads and the
    ``n_kv_head / n`` key/value heads their groups share (:func:`jnnex.tensor_parallel.for_devices` lays ``W_qkv``
    out), ``W_proj`` the matching rows, the projection's partial sums all-reduced. ``kv = (K, V, pos)`` decodes one
    position against a KV cache: rotated by ``pos``, written there, its query attending over ``0 .. pos``. ``scale``:
    the scores' factor (default ``1/√hs``; μP's ``√hs₀/hs``)."""
    nh, nkv = local_count("n_head", n_head, axis), local_count("n_kv_head", n_kv_head, axis)
    pos0 = pos0 if kv is None else kv[2]
    qkv, c_qkv = column_linear_forward(x, W_qkv, None, axis)
    (q, k, v), c_split = split_gqa_forward(qkv, nh, nkv)
    q, c_rq = rope_forward(q, pos0, base)
    k, c_rk = rope_forward(k, pos0, base)
    if kv is None:
        kr, c_rep_k = repeat_kv_forward(k, nh // nkv)
        vr, c_rep_v = repeat_kv_forward(v, nh // nkv)
        y, c_att = attend_forward(q, kr, vr, scale) if tile is None else flash.flash_attend_forward(q, kr, vr, tile,
                                                                                                     scale)
        new_kv = (k, v)
    else:  # one position: into the cache, then attend over it
        new_kv = write_kv(kv[0], kv[1], k, v, pos0)  # (B, nkv, T, hs) each
        K, V = (jnp.repeat(a, nh // nkv, axis=1) for a in new_kv)
        y, c_att, c_rep_k, c_rep_v = attend_cached(q, K, V, pos0, scale), None, None, None
    out, c_proj = row_linear_forward(y, W_proj, None, axis)
    return out, AttentionCache(c_qkv, c_split, c_rq, c_rk, c_rep_k, c_rep_v, tile, c_att, c_proj, new_kv)


def attention_backward(dout, cache: AttentionCache):
    """In reverse: ``(dx, dW_qkv, dW_proj, None, None, None)`` (the head counts and the tile get ``None``; ``pos0``
    and ``base`` are settings, as a norm's ``eps``)."""
    c = cache
    dy, dW_proj, _ = row_linear_backward(dout, c.proj)
    dq, dkr, dvr, *_ = attend_backward(dy, c.att) if c.tile is None else flash.flash_attend_backward(dy, c.att)
    dk, _ = repeat_kv_backward(dkr, c.repeat_k)
    dv, _ = repeat_kv_backward(dvr, c.repeat_v)
    dk, *_ = rope_backward(dk, c.rope_k)
    dq, *_ = rope_backward(dq, c.rope_q)
    dqkv, *_ = split_gqa_backward((dq, dk, dv), c.split)
    dx, dW_qkv, _ = column_linear_backward(dqkv, c.qkv)
    return dx, dW_qkv, dW_proj, None, None, None


PAIRS = {  # the Llama block's own pairs (the GPT's: attend; jnnex.models.flash: the tiled attention)
    "rmsnorm": Pair(rmsnorm_forward, rmsnorm_backward, ("x", "g")),
    "rope": Pair(rope_forward, rope_backward, ("x", "pos0"), fixed=("pos0",)),
    "swiglu": Pair(swiglu_forward, swiglu_backward, ("h",)),
    "split_gqa": Pair(split_gqa_forward, split_gqa_backward, ("qkv", "n_head", "n_kv_head"),
                      fixed=("n_head", "n_kv_head")),
    "repeat_kv": Pair(repeat_kv_forward, repeat_kv_backward, ("x", "n_rep"), fixed=("n_rep",)),
    "attention": Pair(attention_forward, attention_backward, ("x", "W_qkv", "W_proj", "n_head", "n_kv_head", "tile"),
                      fixed=("n_head", "n_kv_head", "tile")),
}


# ----------------------------------------------------------------------------------------------------------------------
# The model


ATTENTION = ("plain", "tiled")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = setting(27, "V: tokens in the vocabulary (set from the data)")
    block_size: int = setting(16, "T: the longest word + 1 (set from the data); the longest context")
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "query heads per block (n_embd must divide by it)")
    n_kv_head: int = setting(4, "key/value heads per block (n_head must divide by it; fewer: grouped-query)")
    n_embd: int = setting(64, "C: the residual stream's width")
    ffn_multiple: int = setting(32, "the SwiGLU width is 2/3 of 4 n_embd rounded up to a multiple of this (Llama: 256)")
    rope_base: float = setting(ROPE_BASE, "the rotary positions' base (Llama 2: 10,000; Llama 3: 500,000)")
    norm_eps: float = setting(1e-5, "RMSNorm's eps")
    dropout: float = setting(0.0, "residual dropout in training, as the GPT's (0: off, as Llama)")
    tie: bool = setting(False, "the LM head is the token embedding's transpose")
    attention: str = setting("plain", "causal attention: plain (the T x T matrix) or tiled (flash: memory linear in "
                                      "T)", choices=ATTENTION)
    tile: int = setting(flash.TILE, "rows and columns of an attention tile (attention tiled)")
    precision: str = setting("float32", "the forward's and backward's arithmetic: float32 (the parameters' own), or "
                                        "bfloat16 with float32 sums, norms, softmax and loss (parameters stay float32)",
                             choices=PRECISIONS)
    recompute: str = setting("none", "what the training forward keeps for the backward: none (every block's "
                                     "activations) or blocks (each block's input alone, about 1/20 of its caches; "
                                     "its forward runs again in the backward, one block's caches at a time)",
                             choices=RECOMPUTE)
    n_expert: int | None = setting(None, "experts in each block's MLP (a mixture of experts: jnnex.models.moe, GELU "
                                         "experts); none: the dense SwiGLU", none=None)
    expert_top_k: int = setting(2, "experts each token goes to (with n_expert)")
    expert_hidden: int | None = setting(None, "each expert's hidden width (with n_expert; none: 3·hidden / (2·top_k), "
                                              "the dense SwiGLU's active parameters)", none=None)
    expert_capacity: float | None = setting(None, "the capacity factor: slots per expert = factor · tokens · top_k / "
                                                  "n_expert, the rest dropped (with n_expert; none: dropless)",
                                            none=None)
    aux_weight: float = setting(0.01, "the weight of the load-balancing loss in the objective, averaged over the "
                                      "blocks (with n_expert; Switch's 0.01)")
    param: str = setting("standard", "the parametrisation: standard or mup (μP, as the GPT's: hidden matrices "
                                     "initialised and trained 1/r, the readout 1/r, attention √hs₀/hs)",
                         choices=PARAMETRISATIONS)
    base_width: int | None = setting(None, "μP's base n_embd, where it equals standard (param mup; none: n_embd)",
                                     none=None)
    expert_axis: str | None = setting(None, "the mesh axis the experts (and the tokens) split along under "
                                            "jax.shard_map: expert parallelism, the tokens exchanged with all_to_all "
                                            "(set by jnnex.expert_parallel)", flag=False)
    model_axis: str | None = setting(None, "the mesh axis the blocks' heads and SwiGLU (or each expert's hidden "
                                           "units) split along under jax.shard_map (Megatron's tensor parallelism; "
                                           "set by jnnex.tensor_parallel)", flag=False)
    batch_axis: str | None = setting(None, "the mesh axis the batch's rows split along under jax.shard_map: dropout "
                                           "masks drawn for the whole batch (set by jnnex.tensor_parallel)", flag=False)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "ffn_multiple"):
            positive_int(name, getattr(self, name))
        check_heads(self.n_head, self.n_kv_head)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        check_head_size(self.n_embd // self.n_head)
        check_choice("attention", self.attention, ATTENTION)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("recompute", self.recompute, RECOMPUTE)
        flash.check_tile(self.tile)
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        self._check_experts()
        check_parametrisation(self)
        if self.param == "mup" and self.n_expert is not None:
            raise ValueError("param mup with n_expert is not supported yet (μP's multipliers for the router and the "
                             "experts are not written): use one of them")

    def _check_experts(self) -> None:
        defaults = {"expert_top_k": 2, "expert_hidden": None, "expert_capacity": None, "aux_weight": 0.01}
        if self.n_expert is None:
            given = [k for k, v in defaults.items() if getattr(self, k) != v]
            if given:
                raise ValueError(f"{', '.join(given)} apply to a mixture of experts: give n_expert too")
            return
        positive_int("n_expert", self.n_expert, 2)
        if isinstance(self.expert_top_k, bool) or not isinstance(self.expert_top_k, int) or \
                not 1 <= self.expert_top_k <= self.n_expert:
            raise ValueError(f"expert_top_k must be an integer in [1, n_expert = {self.n_expert}], got "
                             f"{self.expert_top_k!r}")
        if self.expert_hidden is not None:
            positive_int("expert_hidden", self.expert_hidden)
        for name in ("expert_capacity", "aux_weight"):
            value = getattr(self, name)
            if value is None and name == "expert_capacity":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 or (
                    name == "aux_weight" and value == 0)):
                raise ValueError(f"{name} must be a number > 0{' (or 0)' if name == 'aux_weight' else ''}, got "
                                 f"{value!r}")
        if self.precision != "float32":
            raise ValueError("n_expert with precision bfloat16 is not supported yet (the router's softmax and the "
                             "balancing loss would run in bfloat16): train the experts in float32")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        return hidden_width(self.n_embd, self.ffn_multiple)

    @property
    def expert_width(self) -> int:
        """Each expert's hidden width: ``expert_hidden``, or ``3 · hidden / (2 · top_k)`` — a token's ``top_k``
        GELU experts (two matrices each) then hold the dense SwiGLU's three matrices' parameters."""
        if self.expert_hidden is not None:
            return self.expert_hidden
        return max(1, round(3 * self.hidden / (2 * self.expert_top_k)))

    @property
    def tiled(self) -> int | None:
        """The tile size when attention is tiled, else ``None`` (what :func:`attention_forward` takes)."""
        return self.tile if self.attention == "tiled" else None


class Block(NamedTuple):
    norm1: jax.Array  # (C,) RMSNorm gain
    qkv: Linear  # (C, (nh + 2 nkv) hs): queries, then the shared keys and values, fused; no bias
    attproj: Linear  # (C, C)
    norm2: jax.Array  # (C,)
    fc: Linear  # (C, 2H): W₁ (the gate) and W₃ side by side
    fcproj: Linear  # (H, C): W₂


class Experts(NamedTuple):
    router: jax.Array  # (C, E)
    W1: jax.Array  # (E, C, H): each expert's first layer
    W2: jax.Array  # (E, H, C)


class MoEBlock(NamedTuple):
    """A block whose MLP is a mixture of experts (``n_expert``)."""

    norm1: jax.Array
    qkv: Linear
    attproj: Linear
    norm2: jax.Array
    experts: Experts


class LlamaParams(NamedTuple):
    wte: jax.Array  # (V, C)
    blocks: tuple  # n_layer Blocks
    normf: jax.Array  # (C,)
    lm_head: jax.Array | None  # (C, V); None when tied to wte


def init(key, cfg: LlamaConfig):
    """N(0, 0.02) matrices (the two residual projections /√(2L)), RMSNorm gains 1; under μP the blocks' matrices
    /√r."""
    C, V, L, H = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.hidden
    kv = 2 * cfg.n_kv_head * cfg.head_size
    hidden_std = INIT_STD / math.sqrt(width_ratio(cfg))
    resid_std = hidden_std / math.sqrt(2 * L)
    keys = iter(jax.random.split(key, 2 + 5 * L))

    def linear(n_in, n_out, std=INIT_STD):
        return Linear(std * jax.random.normal(next(keys), (n_in, n_out), jnp.float32), None)

    ones = jnp.ones((C,), jnp.float32)
    wte = INIT_STD * jax.random.normal(next(keys), (V, C), jnp.float32)
    def experts():
        E, He = cfg.n_expert, cfg.expert_width
        normal = lambda shape, std: std * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
        return Experts(normal((C, E), INIT_STD), normal((E, C, He), INIT_STD), normal((E, He, C), resid_std))

    if cfg.n_expert is None:
        blocks = tuple(Block(ones, linear(C, C + kv, hidden_std), linear(C, C, resid_std), ones,
                             linear(C, 2 * H, hidden_std), linear(H, C, resid_std)) for _ in range(L))
    else:
        blocks = tuple(MoEBlock(ones, linear(C, C + kv), linear(C, C, resid_std), ones, experts()) for _ in range(L))
    head = None if cfg.tie else INIT_STD * jax.random.normal(next(keys), (C, V), jnp.float32)
    return LlamaParams(wte, blocks, ones, head), ()


# ----------------------------------------------------------------------------------------------------------------------
# The block: one function each way, which the training forward, the KV-cache decode and every parallel scheme call


class BlockCache(NamedTuple):
    """One block's caches, by name, in forward order."""

    norm1: tuple
    attn: AttentionCache
    drop1: jax.Array | None
    norm2: tuple
    fc: tuple  # a column-parallel linear's: the gate and value side by side
    swiglu: jax.Array
    fcproj: tuple  # a row-parallel linear's
    drop2: jax.Array | None
    moe: tuple | None = None  # with n_expert: the mixture's cache (fc, swiglu and fcproj are None)
    aux: jax.Array | None = None  # with n_expert: the block's load-balancing loss
    daux: float = 0.0  # its weight in the objective: the seed of its gradient


def block_forward(cfg: LlamaConfig, blk: Block, h, i=0, *, train: bool = False, key=None, kv=None):
    """Block ``i`` on the residual stream ``h (B, T, C)``: ``h + attention(rmsnorm(h))``, then ``+ swiglu_mlp(·)``
    (dropout numbers ``2i + 1``, ``2i + 2``). ``cfg.model_axis`` splits the attention by heads with their key/value
    groups and the SwiGLU by hidden units; ``kv = (K, V, pos)`` decodes one position against a KV cache. Returns
    ``(h, BlockCache)``."""
    a, c_n1 = rmsnorm_forward(h, blk.norm1, cfg.norm_eps)
    a, c_attn = attention_forward(a, blk.qkv.W, blk.attproj.W, cfg.n_head, cfg.n_kv_head, cfg.tiled,
                                  base=cfg.rope_base, axis=cfg.model_axis, kv=kv, scale=attention_scale(cfg))
    a, c_drop1 = dropout_in_training(a, key, 2 * i + 1, cfg.dropout, train, cfg.batch_axis)
    h = h + a
    m, c_n2 = rmsnorm_forward(h, blk.norm2, cfg.norm_eps)
    if cfg.n_expert is not None:  # a mixture of experts (dropless, or a capacity per expert over the batch's tokens)
        m, c_drop2 = m, None
        ex = blk.experts
        tokens = int(np.prod(m.shape[:-1]))
        cap = None if cfg.expert_capacity is None else moe.capacity_for(cfg.expert_capacity, tokens, cfg.n_expert,
                                                                        cfg.expert_top_k)
        (m, aux), c_moe = moe.moe_forward(m, ex.router, ex.W1, ex.W2, cfg.expert_top_k, cap, axis=cfg.expert_axis,
                                          model_axis=cfg.model_axis)
        m, c_drop2 = dropout_in_training(m, key, 2 * i + 2, cfg.dropout, train, cfg.batch_axis)
        return h + m, BlockCache(c_n1, c_attn, c_drop1, c_n2, None, None, None, c_drop2, c_moe, aux,
                                 cfg.aux_weight / cfg.n_layer)
    m, c_fc = column_linear_forward(m, blk.fc.W, None, cfg.model_axis)  # (B, T, 2H/n)
    m, c_swiglu = swiglu_forward(m)  # (B, T, H/n)
    m, c_fcproj = row_linear_forward(m, blk.fcproj.W, None, cfg.model_axis)  # (B, T, C)
    m, c_drop2 = dropout_in_training(m, key, 2 * i + 2, cfg.dropout, train, cfg.batch_axis)
    return h + m, BlockCache(c_n1, c_attn, c_drop1, c_n2, c_fc, c_swiglu, c_fcproj, c_drop2)


def block_backward(dh, c: BlockCache):
    """:func:`block_forward` in reverse: ``(dh at the block's input, the block's gradients)``; ``dh`` goes to each
    branch unchanged and gets back what the branch sends (the residual add's backward, written inline)."""
    dm = dh if c.drop2 is None else dropout_backward(dh, c.drop2)[0]  # the MLP branch
    if c.moe is not None:  # the experts, and the balancing loss's share of the objective (its weight: daux)
        dm, drouter, dW1, dW2, *_ = moe.moe_backward((dm, jnp.asarray(c.daux, c.aux.dtype)), c.moe)
        experts = Experts(drouter, dW1, dW2)
    else:
        dm, dfcproj, _ = row_linear_backward(dm, c.fcproj)
        dm = swiglu_backward(dm, c.swiglu)
        dm, dfc, _ = column_linear_backward(dm, c.fc)
    dm, dnorm2 = rmsnorm_backward(dm, c.norm2)
    dh = dh + dm
    da = dh if c.drop1 is None else dropout_backward(dh, c.drop1)[0]  # the attention branch
    da, dqkv, dattproj, *_ = attention_backward(da, c.attn)
    da, dnorm1 = rmsnorm_backward(da, c.norm1)
    if c.moe is not None:
        return dh + da, MoEBlock(dnorm1, Linear(dqkv, None), Linear(dattproj, None), dnorm2, experts)
    dblk = Block(dnorm1, Linear(dqkv, None), Linear(dattproj, None), dnorm2, Linear(dfc, None), Linear(dfcproj, None))
    return dh + da, dblk


def split(cfg: LlamaConfig) -> dict:
    """Megatron's split of a Llama block, as data: ``qkv`` by the columns of each device's query heads and of the
    key/value heads their groups share, ``fc`` by hidden units (each device's gate and value columns side by side);
    ``attproj`` and ``fcproj`` by the matching rows. A mixture of experts' block splits its attention so, and every
    expert by its hidden units (Megatron's expert tensor parallelism: ``W1`` by columns, ``W2`` by rows), the router
    replicated: each device routes every token of its rows (the block's input is whole there, after the attention's
    all-reduce) and runs them through its share of every expert's hidden units; the gated outputs are summed over the
    model axis."""
    hs = cfg.head_size
    q, kv = Part("n_head", cfg.n_head, hs), Part("n_kv_head", cfg.n_kv_head, hs)
    if cfg.n_expert is not None:
        hidden = Part("expert_width", cfg.expert_width)
        return {"qkv": Column((q, kv, kv)), "attproj": ROW, "experts": ExpertsSplit(hidden)}
    hidden = Part("the SwiGLU width", cfg.hidden)
    return {"qkv": Column((q, kv, kv)), "attproj": ROW, "fc": Column((hidden, hidden)), "fcproj": ROW}


# ----------------------------------------------------------------------------------------------------------------------
# The model


class Caches(NamedTuple):
    """The forward's caches, by name."""

    emb: tuple
    drop0: jax.Array | None
    blocks: tuple  # n_layer BlockCaches
    normf: tuple
    head: tuple


def forward(cfg: LlamaConfig, params: LlamaParams, state, x, train: bool, key=None) -> Forward:
    """``Forward(logits (B, T, V), (), Caches, acts)`` for ``x (B, T)``, ``T <= block_size``; ``acts``: each block's
    output, ``(B, T, C)``."""
    check_dropout_key(cfg.dropout, train, key)
    if x.ndim != 2 or not 1 <= x.shape[1] <= cfg.block_size:
        raise ValueError(f"llama: x must have shape (B, T <= {cfg.block_size}), got {x.shape}")
    params = compute_params(params, cfg.precision)  # bfloat16: every layer below computes in it
    h, (c_emb, c_drop0) = embed_forward(cfg, params, x, train, key)
    block_caches, acts, auxes = [], [], []
    for i, blk in enumerate(params.blocks):
        h_in = h
        h, c_block = block_forward(cfg, blk, h, i, train=train, key=key)
        block_caches.append(keep(cfg.recompute, h_in, i, key, train, c_block))  # (recompute: the input alone)
        acts.append(h)
        auxes.append(c_block.aux)
    logits, (c_nf, c_head) = top_forward(cfg, params, h)  # (B, T, V), float32 for bfloat16
    aux = 0.0 if cfg.n_expert is None else cfg.aux_weight * sum(auxes) / cfg.n_layer  # (the balancing loss)
    return Forward(logits, state, Caches(c_emb, c_drop0, tuple(block_caches), c_nf, c_head), tuple(acts), aux)


def backward(cfg: LlamaConfig, params: LlamaParams, caches: Caches, dlogits):
    """Every gradient by hand, in reverse order of :func:`forward`: the head, the final RMSNorm, each block's
    :func:`block_backward` (last first), the embedding."""
    dh, top = top_backward(cfg, dlogits, (caches.normf, caches.head))
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


def embed_forward(cfg: LlamaConfig, params: LlamaParams, x, train: bool, key=None):
    """What comes before the blocks: the token embedding (no position table: RoPE rotates inside attention) and its
    dropout. ``(h (B, T, C), cache)``."""
    h, c_emb = embedding_forward(params.wte, x)
    h, c_drop0 = dropout_in_training(h, key, 0, cfg.dropout, train, cfg.batch_axis)
    return h, (c_emb, c_drop0)


def embed_backward(cfg: LlamaConfig, dh, cache) -> dict:
    """:func:`embed_forward`'s backward: the token table's gradient."""
    c_emb, c_drop0 = cache
    if c_drop0 is not None:
        dh, _, _ = dropout_backward(dh, c_drop0)
    return {"wte": embedding_backward(dh, c_emb)[0]}


def top_forward(cfg: LlamaConfig, params: LlamaParams, h):
    """What comes after the blocks: the final RMSNorm and the LM head. ``(logits (B, T, V), cache)``."""
    h, c_nf = rmsnorm_forward(h, params.normf, cfg.norm_eps)
    logits, c_head = head_forward(h, transpose(params.wte) if cfg.tie else params.lm_head)
    mult = readout_scale(cfg)
    return (logits if mult == 1.0 else logits * mult), (c_nf, c_head)  # (μP: the readout's 1/r)


def top_backward(cfg: LlamaConfig, dlogits, cache):
    """:func:`top_forward`'s backward: ``(dh, {field: gradient})``, the final RMSNorm's and the head's (tied: the
    token table's)."""
    c_nf, c_head = cache
    mult = readout_scale(cfg)
    dlogits = (dlogits if mult == 1.0 else dlogits * mult).astype(c_head[0].dtype)  # (bfloat16: computes in it)
    dh, dW = head_backward(dlogits, c_head, cfg.tie)
    dh, dnormf = rmsnorm_backward(dh, c_nf)
    return dh, {"normf": dnormf, **({"wte": dW, "lm_head": None} if cfg.tie else {"lm_head": dW})}


PIPE = Pipe(embed_forward, embed_backward, block_forward, block_backward, top_forward, top_backward)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling with a KV cache. The cache holds the keys after their rotation (each at its own position, which never
# changes) and only the n_kv_head shared heads: n_head / n_kv_head times smaller than the GPT's.


def prefill(cfg: LlamaConfig, params: LlamaParams, x):
    """The forward over ``x (B, block_size)`` (eval mode), keeping each block's rotated keys and values."""
    if x.shape[1] != cfg.block_size:
        raise ValueError(f"llama.prefill: x must be (B, {cfg.block_size}), a full context buffer; got {x.shape}")
    out = forward(cfg, params, (), x, train=False)
    kvs = [c.attn.kv for c in out.caches.blocks]  # (k rotated, v), (B, nkv, T, hs) each
    return out.logits, KVCache(tuple(k for k, _ in kvs), tuple(v for _, v in kvs))


def decode(cfg: LlamaConfig, params: LlamaParams, cache: KVCache, token, pos):
    """The next position: ``token (B,)`` at position ``pos`` (traced), through each :func:`block_forward` with its
    layer's cache: its query and key rotated by ``pos``, its key and value written into the cache, its query attending
    over ``0 .. pos``. ``(logits (B, V), cache)``."""
    pos = jnp.asarray(pos, jnp.int32)
    params = compute_params(params, cfg.precision)
    h = params.wte[token][:, None, :]  # (B, 1, C)
    kvs = []
    for i, blk in enumerate(params.blocks):
        h, c_block = block_forward(cfg, blk, h, i, kv=(cache.k[i], cache.v[i], pos))
        kvs.append(c_block.attn.kv)
    logits, _ = top_forward(cfg, params, h)
    return logits[:, 0], KVCache(tuple(K for K, _ in kvs), tuple(V for _, V in kvs))


def embeddings(params: LlamaParams) -> jax.Array:
    return params.wte


def llama(cfg: LlamaConfig = LlamaConfig()) -> LanguageModel:
    """The Llama block's model; ``.with_gradients("manual")`` trains it on :func:`backward`."""
    return LanguageModel("llama", cfg, init, forward, backward, stochastic=cfg.dropout > 0, per_position=True,
                         embeddings_fn=embeddings, prefill_fn=prefill, decode_fn=decode, split_fn=split,
                         pipe=PIPE, lr_scale_fn=lr_scales)
