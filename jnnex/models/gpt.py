"""A GPT (Radford et al. 2019's GPT-2, as makemore.py's ``Transformer``) with every gradient written by hand, in the
order llm.c's ``gpt2_backward`` takes them.

    x = wte[idx] + wpe[t]                                  (B, T, C)   token + position embeddings
    for each of the n_layer blocks (pre-LayerNorm):
        x = x + proj(attention(qkv(ln1(x))))               (B, T, C)   causal multi-head self-attention
        x = x + fcproj(gelu(fc(ln2(x))))                   (B, T, C)   MLP, C -> 4C -> C
    logits = lnf(x) @ lm_head                              (B, T, V)   no bias, not tied to wte

At makemore.py's defaults (4 layers, 4 heads, n_embd 64, block size 16 on names.txt, 27 tokens): **204,544
parameters**. Initialisation is GPT-2's: every weight ``N(0, 0.02)``, the two residual projections of each block
``N(0, 0.02 / sqrt(2 · n_layer))`` (the residual stream sums 2 · n_layer branches), biases 0, LayerNorms 1 and 0.
(makemore.py itself keeps PyTorch's default initialisation.)

``dropout > 0`` (not in makemore.py) drops the embedding sum and each branch's output before it joins the residual
stream (GPT-2's residual dropout), in training only; the model is then stochastic: train-mode calls pass a key.

:func:`backward` undoes the forward in reverse: the LM head, the final LayerNorm, then per block (last first) the MLP
branch and the attention branch, the residual stream's gradient accumulating what each branch sends back, and last
the embedding scatter-add. Each step is one of :mod:`jnnex.layers`' pairs, each proven against ``jax.vjp``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jnnex.layers import (
    Linear, check_dropout_key, dropout_backward, dropout_in_training, gelu_backward, gelu_forward, layernorm_backward,
    layernorm_forward, linear_backward, linear_forward, residual_backward, residual_forward, self_attention_backward,
    self_attention_forward, token_position_embedding_backward, token_position_embedding_forward,
)
from jnnex.lm import Forward, LanguageModel
from jnnex.settings import positive_int, setting

INIT_STD = 0.02  # GPT-2's


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = setting(27, "V: tokens in the vocabulary (set from the data)")
    block_size: int = setting(16, "T: the longest word + 1 (set from the data); the position table's length")
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "attention heads per block (n_embd must divide by it)")
    n_embd: int = setting(64, "C: the residual stream's width")
    dropout: float = setting(0.0, "residual dropout in training: embeddings and each branch's output (0: off, as "
                                  "makemore.py)")

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class LayerNorm(NamedTuple):
    w: jax.Array  # (C,) gain
    b: jax.Array  # (C,) shift


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
    lm_head: jax.Array  # (C, V), no bias


def init(key, cfg: GPTConfig):
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    resid_std = INIT_STD / math.sqrt(2 * L)
    keys = iter(jax.random.split(key, 3 + 4 * L))

    def normal(shape, std=INIT_STD):
        return std * jax.random.normal(next(keys), shape, jnp.float32)

    def ln():
        return LayerNorm(jnp.ones((C,), jnp.float32), jnp.zeros((C,), jnp.float32))

    def linear(n_in, n_out, std=INIT_STD):
        return Linear(normal((n_in, n_out), std), jnp.zeros((n_out,), jnp.float32))

    wte, wpe = normal((V, C)), normal((cfg.block_size, C))
    blocks = tuple(Block(ln(), linear(C, 3 * C), linear(C, C, resid_std), ln(), linear(C, 4 * C),
                         linear(4 * C, C, resid_std)) for _ in range(L))
    return GPTParams(wte, wpe, blocks, ln(), normal((C, V))), ()


def forward(cfg: GPTConfig, params: GPTParams, state, x, train: bool, key=None) -> Forward:
    """``Forward(logits (B, T, V), (), caches, acts)`` for ``x (B, T)``, ``T <= block_size``. ``acts`` holds each
    block's output (the residual stream after it), ``(B, T, C)``, for diagnostics."""
    check_dropout_key(cfg.dropout, train, key)
    if x.ndim != 2 or not 1 <= x.shape[1] <= cfg.block_size:
        raise ValueError(f"gpt: x must have shape (B, T <= {cfg.block_size}), got {x.shape}")
    h, c_emb = token_position_embedding_forward(params.wte, params.wpe, x)
    h, c_drop0 = dropout_in_training(h, key, 0, cfg.dropout, train)  # the embeddings
    block_caches, acts = [], []
    for i, blk in enumerate(params.blocks):
        a, c_ln1 = layernorm_forward(h, blk.ln1.w, blk.ln1.b)
        a, c_attn = self_attention_forward(a, blk.qkv.W, blk.qkv.b, blk.attproj.W, blk.attproj.b, cfg.n_head)
        a, c_drop1 = dropout_in_training(a, key, 2 * i + 1, cfg.dropout, train)
        h, c_res1 = residual_forward(h, a)
        m, c_ln2 = layernorm_forward(h, blk.ln2.w, blk.ln2.b)
        m, c_fc = linear_forward(m, blk.fc.W, blk.fc.b)  # (B, T, 4C)
        m, c_gelu = gelu_forward(m)
        m, c_fcproj = linear_forward(m, blk.fcproj.W, blk.fcproj.b)  # (B, T, C)
        m, c_drop2 = dropout_in_training(m, key, 2 * i + 2, cfg.dropout, train)
        h, c_res2 = residual_forward(h, m)
        block_caches.append((c_ln1, c_attn, c_drop1, c_res1, c_ln2, c_fc, c_gelu, c_fcproj, c_drop2, c_res2))
        acts.append(h)
    h, c_lnf = layernorm_forward(h, params.lnf.w, params.lnf.b)
    logits, c_head = linear_forward(h, params.lm_head)
    return Forward(logits, state, (c_emb, c_drop0, tuple(block_caches), c_lnf, c_head), tuple(acts))


def backward(cfg: GPTConfig, params: GPTParams, caches, dlogits):
    """Every gradient by hand, in reverse order of :func:`forward`. ``dh`` is the residual stream's gradient: each
    residual add passes it unchanged to the stream *and* to its branch, and what the branch sends back to the stream
    is added to it (llm.c's ``+=``). ``act_grads[i]`` is the loss gradient at block ``i``'s output."""
    c_emb, c_drop0, block_caches, c_lnf, c_head = caches
    dh, dlm_head, _ = linear_backward(dlogits, c_head)
    dh, dlnf_w, dlnf_b = layernorm_backward(dh, c_lnf)
    dblocks, act_grads = [], []
    for c_ln1, c_attn, c_drop1, c_res1, c_ln2, c_fc, c_gelu, c_fcproj, c_drop2, c_res2 in reversed(block_caches):
        act_grads.append(dh)
        dh, dm = residual_backward(dh, c_res2)  # the MLP branch
        if c_drop2 is not None:
            dm, _, _ = dropout_backward(dm, c_drop2)
        dm, dfcproj_W, dfcproj_b = linear_backward(dm, c_fcproj)
        dm = gelu_backward(dm, c_gelu)
        dm, dfc_W, dfc_b = linear_backward(dm, c_fc)
        dm, dln2_w, dln2_b = layernorm_backward(dm, c_ln2)
        dh = dh + dm
        dh, da = residual_backward(dh, c_res1)  # the attention branch
        if c_drop1 is not None:
            da, _, _ = dropout_backward(da, c_drop1)
        da, dqkv_W, dqkv_b, dproj_W, dproj_b, _ = self_attention_backward(da, c_attn)
        da, dln1_w, dln1_b = layernorm_backward(da, c_ln1)
        dh = dh + da
        dblocks.append(Block(LayerNorm(dln1_w, dln1_b), Linear(dqkv_W, dqkv_b), Linear(dproj_W, dproj_b),
                             LayerNorm(dln2_w, dln2_b), Linear(dfc_W, dfc_b), Linear(dfcproj_W, dfcproj_b)))
    if c_drop0 is not None:
        dh, _, _ = dropout_backward(dh, c_drop0)
    dwte, dwpe, _ = token_position_embedding_backward(dh, c_emb)
    grads = GPTParams(dwte, dwpe, tuple(reversed(dblocks)), LayerNorm(dlnf_w, dlnf_b), dlm_head)
    return grads, tuple(reversed(act_grads))


def embeddings(params: GPTParams) -> jax.Array:
    return params.wte


def gpt(cfg: GPTConfig = GPTConfig()) -> LanguageModel:
    """makemore.py's transformer; ``.with_gradients("manual")`` trains it on :func:`backward`."""
    return LanguageModel("gpt", cfg, init, forward, backward, stochastic=cfg.dropout > 0, per_position=True,
                         embeddings_fn=embeddings)
