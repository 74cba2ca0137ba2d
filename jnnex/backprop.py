"""Tensor-level backprop for the BatchNorm language models: every gradient by hand (makemore part 4).

The compact granularity: the network backward calls the closed-form layer backwards of :mod:`jnnex.layers` in exactly
the reverse order of the forward — cross-entropy (``(softmax - onehot)/B``), linear, BatchNorm (the one-line form),
tanh (``1 - t²``), and the embedding scatter-add. ``jax.grad`` appears nowhere in this path; the tests prove it equal
to ``jax.grad`` in float64.

It works for every :class:`~jnnex.bn_mlp.BNMLPConfig`: ``bn-mlp`` (the lecture's single hidden layer), ``deep-mlp``,
with or without BatchNorm.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jnnex import layers
from jnnex.bn_mlp import BNMLPConfig, BNMLPParams, bn_mlp
from jnnex.layers import BatchNormParams, Linear
from jnnex.lm import LanguageModel


def forward_with_caches(cfg: BNMLPConfig, params: BNMLPParams, state, x):
    """Train-mode forward keeping every layer's cache: ``(logits (B, V), new_state, caches)``."""
    if x.ndim != 2 or x.shape[1] != cfg.block_size:
        raise ValueError(f"x must have shape (B, {cfg.block_size}), got {x.shape}")
    B = x.shape[0]
    emb, c_emb = layers.embedding_forward(params.C, x)  # (B, T, n_embd)
    h = emb.reshape(B, -1)  # (B, T·n_embd)
    caches, new_state = [], []
    for i, dense in enumerate(params.dense):
        h, c_lin = layers.linear_forward(h, dense.W, dense.b)  # (B, H) or (B, V)
        c_bn = c_tanh = None
        if i < len(params.bn):
            h, c_bn = layers.batchnorm_forward(h, params.bn[i].gamma, params.bn[i].beta, cfg.eps)
            _, _, _, mean, var = c_bn
            new_state.append(layers.batchnorm_update_state(state[i], mean, var, B, cfg.momentum))
        if i < cfg.n_layers:
            h, c_tanh = layers.tanh_forward(h)  # (B, H)
        caches.append((c_lin, c_bn, c_tanh))
    return h, tuple(new_state), (c_emb, tuple(caches))


def backward(dlogits, caches, params: BNMLPParams) -> BNMLPParams:
    """Gradients of every parameter from ``dlogits (B, V)``: the layer backwards in reverse order of the forward."""
    c_emb, layer_caches = caches
    dense_grads, bn_grads = [], []
    dh = dlogits
    for c_lin, c_bn, c_tanh in reversed(layer_caches):
        if c_tanh is not None:
            dh = layers.tanh_backward(dh, c_tanh)
        if c_bn is not None:
            dh, dgamma, dbeta = layers.batchnorm_backward(dh, c_bn)
            bn_grads.append(BatchNormParams(dgamma, dbeta))
        dh, dW, db = layers.linear_backward(dh, c_lin)
        dense_grads.append(Linear(dW, db))
    ix = c_emb[0]
    dC, _ = layers.embedding_backward(dh.reshape(ix.shape + (params.C.shape[1],)), c_emb)  # (V, n_embd)
    return BNMLPParams(dC, tuple(reversed(dense_grads)), tuple(reversed(bn_grads)))


def value_and_grad(cfg: BNMLPConfig, params: BNMLPParams, state, x, y):
    """``(loss, grads, new_state)`` of the mean cross-entropy, entirely by hand (a ``LanguageModel.grad_fn``)."""
    logits, new_state, caches = forward_with_caches(cfg, params, state, x)
    loss, c_ce = layers.cross_entropy_forward(logits, y)
    dlogits, _ = layers.cross_entropy_backward(jnp.ones((), logits.dtype), c_ce)  # (B, V)
    return loss, backward(dlogits, caches, params), new_state


def bn_mlp_manual(cfg: BNMLPConfig = BNMLPConfig(), name: str = "deep-mlp") -> LanguageModel:
    """The BatchNorm MLP trained on :func:`value_and_grad` — hand-written gradients only. (Its ``forward_fn`` is
    dropped: in-step diagnostics differentiate with ``jax.grad``, which this model promises not to use.)"""
    return dataclasses.replace(bn_mlp(cfg, name), grad_fn=value_and_grad, forward_fn=None)
