"""Layers as forward/backward pairs, each backward directly under its forward (llm.c style).

Every ``<name>_forward(...)`` returns ``(out, cache)``: the output and only what the backward needs. Every
``<name>_backward(dout, cache)`` takes the upstream gradient (same shape as ``out``) and returns the gradients of the
forward's inputs, named and ordered as they are (``None`` for integer inputs). Models call the forwards in order and,
for hand-written backprop, the backwards in exactly the reverse order. Autodiff models call the same forwards and drop
the cache (XLA removes what nobody reads), so a model is written once.

Shapes use one vocabulary: B batch, T context, C channels, V vocabulary, H hidden. ``...`` is any leading batch axes:
``linear`` and ``batchnorm`` accept (B, C) and (B, T, C) alike.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def check_shape(name: str, arr: jax.Array, shape: tuple[int, ...]) -> None:
    """Backwards rely on shapes; a wrong upstream gradient gets a clear error instead of silent broadcasting."""
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")


def check_train(train) -> None:
    """``train`` selects a code path at trace time, so it must be a Python bool (not an array)."""
    if not isinstance(train, bool):
        raise TypeError(f"train must be a Python bool (it selects the code path), got {type(train).__name__}")


def _per_channel(v, ndim: int):
    """A (C,) vector shaped (1, …, 1, C) to broadcast explicitly against (..., C) (rank promotion stays strict)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


# ----------------------------------------------------------------------------------------------------------------------
# Linear: y = x @ W + b


class Linear(NamedTuple):
    """Parameters of a linear layer."""

    W: jax.Array  # (Cin, Cout)
    b: jax.Array | None  # (Cout,), or None for a bias-free layer (e.g. before BatchNorm)


def linear_forward(x, W, b=None):
    """``x (..., Cin) @ W (Cin, Cout) + b (Cout,) -> y (..., Cout)``."""
    if x.shape[-1] != W.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} input channels but W expects {W.shape[0]} (W is {W.shape})")
    y = x @ W
    if b is not None:
        y = y + _per_channel(b, y.ndim)
    return y, (x, W, b is not None)


def linear_backward(dy, cache):
    """``dx = dy @ Wᵀ``, ``dW = xᵀ @ dy`` (leading axes flattened), ``db = Σ dy`` over leading axes."""
    x, W, has_bias = cache
    check_shape("linear_backward: dy", dy, x.shape[:-1] + (W.shape[1],))
    dx = dy @ W.T  # (..., Cin)
    dW = x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])  # (Cin, Cout)
    db = dy.reshape(-1, dy.shape[-1]).sum(0) if has_bias else None  # (Cout,)
    return dx, dW, db


# ----------------------------------------------------------------------------------------------------------------------
# Nonlinearities


def tanh_forward(x):
    y = jnp.tanh(x)
    return y, y


def tanh_backward(dy, y):
    """``dx = (1 - y²) · dy``: the derivative of tanh written in its output.

    Computed as ``(1 - y)(1 + y)``: near saturation (|y| → 1) ``1 - y`` is exact where ``1 - y·y`` loses the digits
    that matter (float32, y = 0.9999: relative error 3e-8 against 5e-5).
    """
    check_shape("tanh_backward: dy", dy, y.shape)
    return (1.0 - y) * (1.0 + y) * dy


def gated_tanh_forward(x):
    """WaveNet's gated activation: ``x (..., 2H) = [a, b] -> tanh(a) · sigmoid(b) (..., H)`` — a tanh "filter"
    opened or closed per unit by a sigmoid "gate" (van den Oord et al. 2016)."""
    if x.shape[-1] % 2:
        raise ValueError(f"gated_tanh: x must have an even number of channels (filter, gate), got {x.shape}")
    H = x.shape[-1] // 2
    t, g = jnp.tanh(x[..., :H]), jax.nn.sigmoid(x[..., H:])
    return t * g, (t, g)


def gated_tanh_backward(dy, cache):
    """``da = dy · g · (1 - t²)``, ``db = dy · t · g (1 - g)``, side by side as ``dx (..., 2H)``."""
    t, g = cache
    check_shape("gated_tanh_backward: dy", dy, t.shape)
    return jnp.concatenate([dy * g * (1.0 - t) * (1.0 + t), dy * t * g * (1.0 - g)], axis=-1)


def relu_forward(x):
    y = jnp.maximum(x, 0)
    return y, y


def relu_backward(dy, y):
    """``dx = dy · [y > 0]`` (the subgradient 0 at 0, as PyTorch and micrograd)."""
    check_shape("relu_backward: dy", dy, y.shape)
    return jnp.where(y > 0, dy, jnp.zeros_like(dy))


# ----------------------------------------------------------------------------------------------------------------------
# Recurrent cell (Elman 1990; makemore.py's RNNCell): one time step


def rnn_cell_forward(x, h, W, b):
    """``h_new = tanh([x, h] @ W + b)``: ``x (B, E)`` this step's input, ``h (B, H)`` the previous state,
    ``W (E + H, H)``, ``b (H,)`` → ``h_new (B, H)``."""
    if x.shape[:-1] != h.shape[:-1] or W.shape != (x.shape[-1] + h.shape[-1], h.shape[-1]) or b.shape != h.shape[-1:]:
        raise ValueError(f"rnn_cell: expected x (B, E), h (B, H), W (E + H, H), b (H,), got {x.shape}, {h.shape}, "
                         f"{W.shape}, {b.shape}")
    xh = jnp.concatenate([x, h], axis=-1)  # (B, E + H)
    h_new = jnp.tanh(xh @ W + _per_channel(b, h.ndim))  # (B, H)
    return h_new, (xh, W, h_new)


def rnn_cell_backward(dh_new, cache):
    """``da = (1 - h_new²) · dh_new``; ``dW = [x, h]ᵀ da``, ``db = Σ da``, and ``[dx, dh] = da Wᵀ`` split at E: the
    gradient that flows back in time is ``dh``."""
    xh, W, h_new = cache
    check_shape("rnn_cell_backward: dh_new", dh_new, h_new.shape)
    da = (1.0 - h_new) * (1.0 + h_new) * dh_new  # (B, H)
    dxh = da @ W.T  # (B, E + H)
    E = xh.shape[-1] - h_new.shape[-1]
    return dxh[..., :E], dxh[..., E:], xh.T @ da, da.sum(0)


def gru_cell_forward(x, h, Wz, bz, Wr, br, Wh, bh):
    """A gated recurrent step (Cho et al. 2014, as makemore.py): with ``xh = [x, h]``,
    ``z = σ(xh Wz + bz)`` (update), ``r = σ(xh Wr + br)`` (reset), ``h̄ = tanh([x, r ⊙ h] Wh + bh)`` (candidate),
    ``h_new = (1 − z) ⊙ h + z ⊙ h̄``. ``x (B, E)``, ``h (B, H)``, each ``W (E + H, H)``, ``b (H,)``."""
    if x.shape[:-1] != h.shape[:-1] or any(W.shape != (x.shape[-1] + h.shape[-1], h.shape[-1]) for W in (Wz, Wr, Wh)):
        raise ValueError(f"gru_cell: expected x (B, E), h (B, H) and weights (E + H, H), got {x.shape}, {h.shape}, "
                         f"{Wz.shape}, {Wr.shape}, {Wh.shape}")
    xh = jnp.concatenate([x, h], axis=-1)  # (B, E + H)
    z = jax.nn.sigmoid(xh @ Wz + _per_channel(bz, h.ndim))  # (B, H)
    r = jax.nn.sigmoid(xh @ Wr + _per_channel(br, h.ndim))  # (B, H)
    xhr = jnp.concatenate([x, r * h], axis=-1)  # (B, E + H)
    hbar = jnp.tanh(xhr @ Wh + _per_channel(bh, h.ndim))  # (B, H)
    h_new = (1.0 - z) * h + z * hbar
    return h_new, (xh, xhr, h, z, r, hbar, Wz, Wr, Wh)


def gru_cell_backward(dh_new, cache):
    """Each gate's chain rule in reverse order of the forward: the mix (``dz = dh_new ⊙ (h̄ − h)``, ``dh̄ = dh_new ⊙ z``,
    ``dh += dh_new ⊙ (1 − z)``), the candidate's tanh and linear (its input ``r ⊙ h`` splits into ``dr`` and ``dh``),
    then the reset and update gates' sigmoids and linears. Returns ``(dx, dh, dWz, dbz, dWr, dbr, dWh, dbh)``."""
    xh, xhr, h, z, r, hbar, Wz, Wr, Wh = cache
    check_shape("gru_cell_backward: dh_new", dh_new, h.shape)
    E = xh.shape[-1] - h.shape[-1]
    dz = dh_new * (hbar - h)  # (B, H)
    dhbar = dh_new * z
    dh = dh_new * (1.0 - z)
    da_h = dhbar * (1.0 - hbar) * (1.0 + hbar)  # through tanh
    dxhr = da_h @ Wh.T  # (B, E + H)
    drh = dxhr[..., E:]  # the gradient at r ⊙ h
    dr, dh = drh * h, dh + drh * r
    da_r = dr * r * (1.0 - r)  # through the reset gate's sigmoid
    da_z = dz * z * (1.0 - z)  # through the update gate's sigmoid
    dxh = da_r @ Wr.T + da_z @ Wz.T  # (B, E + H)
    dx = dxhr[..., :E] + dxh[..., :E]
    dh = dh + dxh[..., E:]
    return dx, dh, xh.T @ da_z, da_z.sum(0), xh.T @ da_r, da_r.sum(0), xhr.T @ da_h, da_h.sum(0)


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


# ----------------------------------------------------------------------------------------------------------------------
# Dropout (Srivastava et al. 2014), inverted: scaled in training so that eval mode is the identity


def dropout_forward(x, key, rate: float):
    """Zero each element with probability ``rate``, scale the rest by ``1 / (1 - rate)``: ``E[y] = x``. The cache is
    the scaled mask ``m / (1 - rate)``, ``m ~ Bernoulli(1 - rate)``, drawn from ``key``."""
    if not 0 <= rate < 1:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate!r}")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    scale = jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(x.dtype)
    return x * scale, scale


def dropout_backward(dy, scale):
    """``dx = dy · m / (1 - rate)``: the same mask, the same scale (``key`` and ``rate`` get no gradient)."""
    check_shape("dropout_backward: dy", dy, scale.shape)
    return dy * scale, None, None


def check_dropout_key(rate: float, train, key) -> None:
    """A model's forward with dropout: ``train`` a Python bool, and a key whenever training drops something."""
    check_train(train)
    if train and rate > 0 and key is None:
        raise ValueError(f"dropout {rate} in train mode needs a key (forward(..., train=True, key=...))")


def dropout_in_training(x, key, i: int, rate: float, train: bool):
    """A model's dropout number ``i``: in training, :func:`dropout_forward` with a key of its own
    (``fold_in(key, i)``); otherwise the identity. ``(x, cache)``, cache None when nothing was dropped."""
    if not (train and rate > 0):
        return x, None
    return dropout_forward(x, jax.random.fold_in(key, i), rate)


# ----------------------------------------------------------------------------------------------------------------------
# Embedding lookup: emb = C[ix]


def embedding_forward(C, ix):
    """``C (V, C) [ix (...)] -> emb (..., C)``. The row lookup is the one-hot product ``onehot(ix) @ C``."""
    if not jnp.issubdtype(ix.dtype, jnp.integer):
        raise TypeError(f"embedding: ix must be an integer array, got {ix.dtype}")
    return C[ix], (ix, C.shape)


def embedding_backward(demb, cache):
    """``dC[v] = Σ_{i: ix_i = v} demb_i`` — a scatter-add, so a repeated index accumulates; unseen rows stay 0."""
    ix, C_shape = cache
    check_shape("embedding_backward: demb", demb, ix.shape + (C_shape[1],))
    dC = jnp.zeros(C_shape, demb.dtype).at[ix.reshape(-1)].add(demb.reshape(-1, C_shape[1]))
    return dC, None


# ----------------------------------------------------------------------------------------------------------------------
# Pairing neighbours (WaveNet, makemore part 5): the tree's FlattenConsecutive, and the kernel-2 dilated causal
# convolution that slides the same pairing over every position.


def flatten_consecutive_forward(x, n: int = 2):
    """``x (B, T, C) -> (B, T/n, n·C)``: every ``n`` consecutive positions side by side (makemore's
    ``FlattenConsecutive``; a row-major reshape). Never squeezes: at ``T = n`` the output is ``(B, 1, n·C)``, so a tree
    of any depth keeps its three axes (the lecture's squeeze at ``T' = 1`` broke trees deeper than three levels)."""
    if x.ndim != 3 or x.shape[1] % n:
        raise ValueError(f"flatten_consecutive: x must be (B, T, C) with T divisible by {n}, got {x.shape}")
    B, T, C = x.shape
    return x.reshape(B, T // n, n * C), (x.shape, n)


def flatten_consecutive_backward(dy, cache):
    """The inverse reshape: ``dx = dy.reshape(B, T, C)`` (each input element feeds exactly one output element)."""
    (B, T, C), n = cache
    check_shape("flatten_consecutive_backward: dy", dy, (B, T // n, n * C))
    return dy.reshape(B, T, C), None


def causal_conv_forward(x, W, dilation: int):
    """A kernel-2 dilated causal convolution, unpadded ("valid"): ``x (B, L, Cin)``, ``W (2·Cin, Cout)`` →
    ``y (B, L - d, Cout)`` with ``y[:, t] = x[:, t] @ W[:Cin] + x[:, t + d] @ W[Cin:]``.

    Output ``t`` sits at input position ``t + d`` and reads it and the input ``d`` steps earlier, nothing later. ``W``
    is exactly the tree's level weight (two taps stacked on the input axis: the earlier element first, as
    :func:`flatten_consecutive_forward` places them), applied at every position instead of every ``n``-th; stacking
    dilations 1, 2, 4 gives each output the tree over the 8 inputs up to it. Computed as one matmul of the pairs.
    """
    if x.ndim != 3 or W.ndim != 2 or W.shape[0] != 2 * x.shape[2]:
        raise ValueError(f"causal_conv: expected x (B, L, C) and W (2C, Cout), got {x.shape} and {W.shape}")
    if not (isinstance(dilation, int) and 1 <= dilation < x.shape[1]):
        raise ValueError(f"causal_conv: dilation must be an int in [1, L) = [1, {x.shape[1]}), got {dilation!r}")
    d = dilation
    pairs = jnp.concatenate([x[:, :-d], x[:, d:]], axis=-1)  # (B, L - d, 2·Cin)
    return pairs @ W, (x, W, d)


def causal_conv_backward(dy, cache):
    """``dW = Σ_t pairs_tᵀ dy_t``; ``dx`` gathers both taps: ``dy @ W[:Cin]ᵀ`` at ``t`` and ``dy @ W[Cin:]ᵀ`` at
    ``t + d`` (an input used by two outputs accumulates both)."""
    x, W, d = cache
    B, L, C = x.shape
    check_shape("causal_conv_backward: dy", dy, (B, L - d, W.shape[1]))
    pairs = jnp.concatenate([x[:, :-d], x[:, d:]], axis=-1)  # (B, L - d, 2C), recomputed rather than cached
    dW = pairs.reshape(-1, 2 * C).T @ dy.reshape(-1, W.shape[1])  # (2C, Cout)
    dpairs = dy @ W.T  # (B, L - d, 2C)
    no_pad, pad = (0, 0), (0, d)
    dx = jnp.pad(dpairs[..., :C], (no_pad, pad, no_pad)) + jnp.pad(dpairs[..., C:], (no_pad, pad[::-1], no_pad))
    return dx, dW, None


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
    C = wte_shape[1]
    dwte = jnp.zeros(wte_shape, dout.dtype).at[ix.reshape(-1)].add(dout.reshape(-1, C))
    dwpe = jnp.zeros(wpe_shape, dout.dtype).at[:ix.shape[1]].set(dout.sum(0))
    return dwte, dwpe, None


def layernorm_forward(x, w, b, eps: float = 1e-5):
    """Normalise each row over its last axis (biased variance), then scale and shift: ``x (..., C)``, ``w, b (C,)``.
    Caches ``mean`` and ``rstd = 1/sqrt(var + eps)`` (``(..., 1)`` each), as llm.c does, not the normalised input."""
    if w.shape != x.shape[-1:] or b.shape != x.shape[-1:]:
        raise ValueError(f"layernorm: w and b must have shape ({x.shape[-1]},) for x {x.shape}, got {w.shape} and "
                         f"{b.shape}")
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    rstd = jax.lax.rsqrt((xc * xc).mean(-1, keepdims=True) + eps)
    return xc * rstd * _per_channel(w, x.ndim) + _per_channel(b, x.ndim), (x, w, mean, rstd)


def layernorm_backward(dy, cache):
    """llm.c's form: ``n`` recomputed from ``mean`` and ``rstd``, ``g = w ⊙ dy``, then two reductions per row:
    ``dx = rstd · (g − mean(g) − n ⊙ mean(g ⊙ n))``; ``dw = Σ dy ⊙ n``, ``db = Σ dy`` over the leading axes."""
    x, w, mean, rstd = cache
    check_shape("layernorm_backward: dy", dy, x.shape)
    n = (x - mean) * rstd
    g = dy * _per_channel(w, x.ndim)
    dx = rstd * (g - g.mean(-1, keepdims=True) - n * (g * n).mean(-1, keepdims=True))
    C = x.shape[-1]
    return dx, (dy * n).reshape(-1, C).sum(0), dy.reshape(-1, C).sum(0)


GELU_C = float(np.sqrt(2.0 / np.pi))


def gelu_forward(x):
    """GELU in GPT-2's tanh form: ``0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))``. Caches ``x`` (llm.c's ``fch``)."""
    return 0.5 * x * (1.0 + jnp.tanh(GELU_C * (x + 0.044715 * x**3))), x


def gelu_backward(dy, x):
    """``dx = dy · [0.5 (1 + tanh u) + 0.5 x sech²u · √(2/π) (1 + 3 · 0.044715 x²)]``, ``u`` recomputed from ``x``."""
    check_shape("gelu_backward: dy", dy, x.shape)
    t = jnp.tanh(GELU_C * (x + 0.044715 * x**3))
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3 * 0.044715 * x * x))


def residual_forward(a, b):
    """``a + b``: the residual stream plus a block's branch."""
    if a.shape != b.shape:
        raise ValueError(f"residual: both inputs must have the same shape, got {a.shape} and {b.shape}")
    return a + b, a.shape


def residual_backward(dout, shape):
    """The gradient flows unchanged into both inputs."""
    check_shape("residual_backward: dout", dout, shape)
    return dout, dout


def _heads(x, n_head: int):
    """``(B, T, C) -> (B, nh, T, hs)``."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _qkv_heads(qkv, n_head: int):
    """``qkv (B, T, 3C) -> q, k, v``, each ``(B, nh, T, hs)``."""
    C = qkv.shape[-1] // 3
    return tuple(_heads(qkv[..., i * C:(i + 1) * C], n_head) for i in range(3))


def _merge_heads(x):
    """``(B, nh, T, hs) -> (B, T, C)``."""
    B, nh, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)


def attention_forward(qkv, n_head: int):
    """Causal multi-head attention on a fused projection ``qkv (B, T, 3C) -> (B, T, C)`` (llm.c's
    ``attention_forward``): per head, ``att = softmax(q kᵀ / √hs)`` over the positions ``t' <= t`` (later ones get
    exactly 0), then ``y = att v``. Caches ``qkv`` and ``att (B, nh, T, T)``: the softmax's backward needs its output
    only. Rows are shifted by their maximum, so logits of ±1e4 stay finite."""
    if qkv.ndim != 3 or qkv.shape[-1] % 3 or (qkv.shape[-1] // 3) % n_head:
        raise ValueError(f"attention: qkv must be (B, T, 3C) with C divisible by n_head = {n_head}, got {qkv.shape}")
    C = qkv.shape[-1] // 3
    q, k, v = _qkv_heads(qkv, n_head)  # (B, nh, T, hs) each
    T = qkv.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))[None, None]  # (1, 1, T, T): position t sees t' <= t
    preatt = jnp.where(causal, (q @ k.transpose(0, 1, 3, 2)) * (C // n_head) ** -0.5, -jnp.inf)
    e = jnp.exp(preatt - preatt.max(-1, keepdims=True))  # the diagonal is never masked: a finite maximum per row
    att = e / e.sum(-1, keepdims=True)  # (B, nh, T, T), exactly 0 above the diagonal
    return _merge_heads(att @ v), (qkv, att, n_head)


def attention_backward(dy, cache):
    """In reverse: the value mix (``datt = dy vᵀ``, ``dv = attᵀ dy``); the softmax in vector form,
    ``dpreatt = att ⊙ (datt − ⟨att, datt⟩)`` per row (0 wherever ``att`` is, so the masked positions get nothing);
    the scaled ``q kᵀ`` (``dq = dpreatt k / √hs``, ``dk = dpreattᵀ q / √hs``)."""
    qkv, att, n_head = cache
    B, T, C3 = qkv.shape
    C = C3 // 3
    check_shape("attention_backward: dy", dy, (B, T, C))
    q, k, v = _qkv_heads(qkv, n_head)
    dyh = _heads(dy, n_head)  # (B, nh, T, hs)
    datt = dyh @ v.transpose(0, 1, 3, 2)  # (B, nh, T, T)
    dv = att.transpose(0, 1, 3, 2) @ dyh
    dpreatt = att * (datt - (att * datt).sum(-1, keepdims=True)) * (C // n_head) ** -0.5
    dq = dpreatt @ k
    dk = dpreatt.transpose(0, 1, 3, 2) @ q
    return jnp.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1), None


def self_attention_forward(x, W_qkv, b_qkv, W_proj, b_proj, n_head: int):
    """The whole attention layer: the fused projection ``x (B, T, C) @ W_qkv (C, 3C)``, causal multi-head attention,
    the output projection ``(C, C)``."""
    qkv, c_qkv = linear_forward(x, W_qkv, b_qkv)
    y, c_att = attention_forward(qkv, n_head)
    out, c_proj = linear_forward(y, W_proj, b_proj)
    return out, (c_qkv, c_att, c_proj)


def self_attention_backward(dout, cache):
    """The three backwards in reverse order: ``(dx, dW_qkv, db_qkv, dW_proj, db_proj, None)``."""
    c_qkv, c_att, c_proj = cache
    dy, dW_proj, db_proj = linear_backward(dout, c_proj)
    dqkv, _ = attention_backward(dy, c_att)
    dx, dW_qkv, db_qkv = linear_backward(dqkv, c_qkv)
    return dx, dW_qkv, db_qkv, dW_proj, db_proj, None


# ----------------------------------------------------------------------------------------------------------------------
# Losses (each returns a scalar; its backward takes the scalar upstream gradient)


def cross_entropy_forward(logits, y):
    """Mean softmax cross-entropy over the valid targets, via logsumexp: ``logits (..., V)``, ``y (...)`` int.

    Targets ``< 0`` are ignored (makemore's ``-1`` padding of a word's tail): the loss is the mean over the ``n``
    valid targets (0 when there are none). Window models pass ``(B, V)`` and ``(B,)``; sequence models ``(B, T, V)``
    and ``(B, T)``. A concrete ``y`` with a target ``>= V`` is a ``ValueError`` (under ``jit`` the caller checks:
    :func:`check_targets`).
    """
    if logits.ndim < 1 or y.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: expected logits (..., V) and y (...) with the same leading shape, got "
                         f"{logits.shape} and {y.shape}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"cross_entropy: y must be an integer array, got {y.dtype}")
    if not isinstance(y, jax.core.Tracer):
        check_targets(y, logits.shape[-1], "cross_entropy: y")
    logprobs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # (..., V)
    nll, valid = target_nll(logprobs, y)  # (...)
    n = jnp.maximum(valid.sum(), 1).astype(logits.dtype)  # the number of valid targets
    return nll.sum() / n, (logprobs, y, n)


def target_nll(logprobs, y):
    """``(nll (...), valid (...))``: ``-logprobs[..., y]`` where ``y >= 0``, exactly 0 where the target is ignored.
    The one place a target's log-probability is picked (the loss above, evaluation in :mod:`jnnex.lm`)."""
    valid = y >= 0
    picked = jnp.take_along_axis(logprobs, jnp.where(valid, y, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, -picked, 0.0), valid


def cross_entropy_backward(dloss, cache):
    """``dlogits = dloss · (softmax(logits) - onehot(y)) / n`` at valid targets, exactly 0 where ``y < 0``."""
    logprobs, y, n = cache
    check_shape("cross_entropy_backward: dloss", jnp.asarray(dloss), ())
    valid = (y >= 0)[..., None]  # (..., 1)
    dlogits = jnp.exp(logprobs) - jax.nn.one_hot(y, logprobs.shape[-1], dtype=logprobs.dtype)  # (..., V)
    return jnp.where(valid, dlogits * (dloss / n), 0.0), None


def check_targets(y, vocab_size: int, what: str = "targets") -> None:
    """Targets must lie in ``[0, V)`` or be ``-1`` (ignored); anything else is a ``ValueError`` naming ``what``."""
    y = np.asarray(y)
    bad = (y >= vocab_size) | (y < -1)
    if bad.any():
        raise ValueError(f"{what} must be token ids in [0, {vocab_size}) or -1 (ignored); found {int(y[bad][0])}")


def hinge_forward(scores, y):
    """Max-margin loss ``mean(relu(1 - y·s))`` of micrograd's moons demo. ``scores (B,), y (B,) in {-1, +1}``."""
    if scores.ndim != 1 or y.shape != scores.shape:
        raise ValueError(f"hinge: expected scores (B,) and y (B,), got {scores.shape} and {y.shape}")
    margins = 1.0 - y * scores  # (B,)
    return jnp.maximum(margins, 0).mean(), (margins, y)


def hinge_backward(dloss, cache):
    """``dscores = -dloss · y · [1 - y·s > 0] / B``."""
    margins, y = cache
    check_shape("hinge_backward: dloss", jnp.asarray(dloss), ())
    return jnp.where(margins > 0, -y, jnp.zeros_like(y)) * (dloss / margins.shape[0]), None


def mse_forward(pred, target):
    """``mean((pred - target)²)`` over every element."""
    if pred.shape != target.shape:
        raise ValueError(f"mse: pred {pred.shape} and target {target.shape} must have the same shape")
    diff = pred - target
    return jnp.mean(diff * diff), diff


def mse_backward(dloss, diff):
    """``dpred = dloss · 2 (pred - target) / N``, ``dtarget = -dpred``."""
    check_shape("mse_backward: dloss", jnp.asarray(dloss), ())
    dpred = diff * (2.0 * dloss / diff.size)
    return dpred, -dpred


# ----------------------------------------------------------------------------------------------------------------------
# BatchNorm (Ioffe & Szegedy, 2015). Statistics over every axis but the last: (B, C) and (B, T, C) alike.
#
# Variance convention (PyTorch's): the *biased* batch variance (divide by n) normalises in training, and the
# *unbiased* one (divide by n - 1) feeds the running estimate used in eval. The backward below matches this.


class BatchNormParams(NamedTuple):
    gamma: jax.Array  # (C,) gain
    beta: jax.Array  # (C,) shift


class BatchNormState(NamedTuple):
    mean: jax.Array  # (C,) running mean
    var: jax.Array  # (C,) running (unbiased) variance


def batchnorm_init(C: int, dtype=jnp.float32) -> tuple[BatchNormParams, BatchNormState]:
    return (
        BatchNormParams(jnp.ones((C,), dtype), jnp.zeros((C,), dtype)),
        BatchNormState(jnp.zeros((C,), dtype), jnp.ones((C,), dtype)),
    )


_BATCH_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("jnnex_batchnorm_axis", default=None)


@contextlib.contextmanager
def batchnorm_across(axis_name: str | None):
    """Inside ``jax.shard_map``: BatchNorm's batch statistics — and the means its backward takes — over the rows of
    every device along mesh axis ``axis_name`` (synchronised BatchNorm), not this device's shard alone. ``None``:
    per-device statistics. Read at trace time by :func:`batchnorm_forward`, :func:`batchnorm_backward` and
    :func:`batchnorm_update_state`; every device must hold the same number of rows."""
    token = _BATCH_AXIS.set(axis_name)
    try:
        yield
    finally:
        _BATCH_AXIS.reset(token)


def _batch_mean(v, axes):
    """The mean over the rows ``axes`` — of every device's rows when :func:`batchnorm_across` is in force."""
    m = v.mean(axes)
    axis = _BATCH_AXIS.get()
    return m if axis is None else jax.lax.pmean(m, axis)


def _bn_rows(x) -> int:
    n = 1
    for d in x.shape[:-1]:
        n *= d
    return n


def batchnorm_forward(x, gamma, beta, eps: float = 1e-5):
    """Train-mode BatchNorm: ``y = γ · (x - mean) / sqrt(var + eps) + β`` with batch statistics.

    Args:
        x: (..., C) activations; the statistics run over all leading axes (n = their product rows).
        gamma, beta: (C,) gain and shift.
    Returns:
        ``(y, cache)``; ``cache`` holds ``x``, ``rstd``, ``gamma`` and the batch ``mean``/biased ``var`` (llm.c's
        choice: the backward recomputes ``xhat`` from ``x``, ``mean`` and ``rstd`` inside its fused passes, which
        measured faster than storing ``xhat`` — one (..., C) array less written per layer).
    """
    C = x.shape[-1]
    if gamma.shape != (C,) or beta.shape != (C,):
        raise ValueError(f"batchnorm: x has {C} channels but gamma/beta have shapes {gamma.shape}/{beta.shape}")
    if _bn_rows(x) < 2:
        raise ValueError(f"batchnorm in train mode needs at least 2 rows to estimate statistics, got x {x.shape}")
    axes = tuple(range(x.ndim - 1))
    mean = _batch_mean(x, axes)  # (C,)
    xc = x - _per_channel(mean, x.ndim)  # (..., C)
    var = _batch_mean(xc * xc, axes)  # (C,) biased
    rstd = jax.lax.rsqrt(var + eps)  # (C,)
    xhat = xc * _per_channel(rstd, x.ndim)  # (..., C)
    y = xhat * _per_channel(gamma, x.ndim) + _per_channel(beta, x.ndim)
    return y, (x, rstd, gamma, mean, var)


def batchnorm_backward(dy, cache):
    """``dx = γ·rstd/n · (n·dy - Σdy - xhat·Σ(dy·xhat))``; ``dγ = Σ dy·xhat``, ``dβ = Σ dy``.

    The lecture's form with ``dxhat = γ·dy`` and ``Σdxhat``, ``Σdxhat·xhat``, with γ taken out of the sums: they are
    then ``dβ`` and ``dγ``, so the whole backward reads ``dy`` in two reductions (one fused pass) and one elementwise pass.
    """
    x, rstd, gamma, mean, _ = cache
    check_shape("batchnorm_backward: dy", dy, x.shape)
    axes = tuple(range(dy.ndim - 1))
    n = _bn_rows(dy)
    d = dy.ndim
    xhat = (x - _per_channel(mean, d)) * _per_channel(rstd, d)  # (..., C), recomputed (see batchnorm_forward)
    dgamma = (dy * xhat).sum(axes)  # (C,)
    dbeta = dy.sum(axes)  # (C,)
    if _BATCH_AXIS.get() is None:
        dx = _per_channel(gamma * rstd / n, d) * (n * dy - _per_channel(dbeta, d) - xhat * _per_channel(dgamma, d))
    else:  # synchronised: the two means over every device's rows (dγ, dβ stay this device's share)
        mean_dy, mean_dyx = (jax.lax.pmean(s / n, _BATCH_AXIS.get()) for s in (dbeta, dgamma))
        dx = _per_channel(gamma * rstd, d) * (dy - _per_channel(mean_dy, d) - xhat * _per_channel(mean_dyx, d))
    return dx, dgamma, dbeta


def batchnorm_update_state(state: BatchNormState, mean, var, n: int, momentum: float) -> BatchNormState:
    """Exponential running averages; the biased batch ``var`` is turned unbiased (× n/(n-1)) first (``n``: this
    device's rows, times the devices under :func:`batchnorm_across`)."""
    if _BATCH_AXIS.get() is not None:
        n = n * jax.lax.axis_size(_BATCH_AXIS.get())
    unbiased = var * (n / (n - 1))
    return BatchNormState(
        (1 - momentum) * state.mean + momentum * jax.lax.stop_gradient(mean),
        (1 - momentum) * state.var + momentum * jax.lax.stop_gradient(unbiased),
    )


def batchnorm_eval(x, gamma, beta, state: BatchNormState, eps: float = 1e-5):
    """Eval-mode BatchNorm with the running statistics: an affine map per channel."""
    C = x.shape[-1]
    if state.mean.shape != (C,):
        raise ValueError(f"batchnorm: x has {C} channels but the running statistics have {state.mean.shape[0]}")
    scale = gamma * jax.lax.rsqrt(state.var + eps)  # (C,)
    return (x - _per_channel(state.mean, x.ndim)) * _per_channel(scale, x.ndim) + _per_channel(beta, x.ndim)


def batchnorm(
    params: BatchNormParams,
    state: BatchNormState,
    x: jax.Array,
    *,
    train: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[jax.Array, BatchNormState]:
    """BatchNorm as a stateful layer: ``(y, new_state) = batchnorm(params, state, x, train=...)``.

    Train mode normalises with the batch statistics and returns updated running statistics; eval mode uses the running
    statistics and returns ``state`` unchanged.

    >>> p, s = batchnorm_init(2)
    >>> y, s = batchnorm(p, s, jnp.array([[0., 1.], [2., 5.]], jnp.float32), train=True)
    >>> y.round(3).tolist()
    [[-1.0, -1.0], [1.0, 1.0]]
    """
    check_train(train)
    if not train:
        return batchnorm_eval(x, params.gamma, params.beta, state, eps), state
    y, (_, _, _, mean, var) = batchnorm_forward(x, params.gamma, params.beta, eps)
    return y, batchnorm_update_state(state, mean, var, _bn_rows(x), momentum)
