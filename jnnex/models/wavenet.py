"""A WaveNet-style hierarchy (van den Oord et al. 2016; makemore part 5), and the same net as causal dilated
convolutions.

The **tree** (``wavenet``) reads a window of ``T = 2^L`` characters and fuses them slowly, two at a time::

    x (B, 8) -> C[x] (B, 8, 24)
    level 0:  flatten pairs (B, 4, 48)  -> Linear, no bias -> BatchNorm -> tanh   (B, 4, 128)
    level 1:  flatten pairs (B, 2, 256) -> Linear, no bias -> BatchNorm -> tanh   (B, 2, 128)
    level 2:  flatten pairs (B, 1, 256) -> Linear, no bias -> BatchNorm -> tanh   (B, 1, 128)
    logits = h[:, 0] @ W_out + b_out                                              (B, 27)

At the lecture's sizes that is 76,579 parameters. The depth is ``log2(T)``; any power of two works (the tree keeps
its three axes down to ``T' = 1`` and drops the position axis once, at the end).

**BatchNorm on (B, T', C)** takes its statistics over batch *and* position (the lecture's "bug fix", dims (0, 1)).
jnnex's variance convention (:mod:`jnnex.layers`) differs from the lecture's hand-written ``BatchNorm1d``: jnnex
normalises with the *biased* batch variance (÷ n, as ``torch.nn.BatchNorm1d``) and keeps the unbiased one in the
running estimate; the lecture's class calls ``x.var()``, which is Bessel-corrected (÷ n − 1), for both. With
n = 32·4 = 128 rows at level 0 (64 at level 1, 32 at level 2) the two normalisations differ by a factor
``sqrt(n / (n - 1))``, at most 1.6 %.

The **convolutional form** (``wavenet-conv``) is the lecture's "next time": the tree at every position of a padded
word at once. Level ``l`` is a kernel-2 causal convolution with dilation ``2^l``
(:func:`causal_conv_forward`, above) whose weight is the tree's level weight read as two taps, so the parameters are
the tree's, unchanged. The word is left-padded with ``T - 1`` start tokens (token 0), so position ``t`` sees exactly the window the tree sees for the
``t``-th prediction, first positions included; each level's nodes are computed once and shared by every window that
contains them (the tree recomputes them for each window). In eval mode the two forms agree to rounding. In train
mode the convolutional form's BatchNorm pools over every position of every padded word, the tails after a word's end
included, instead of the tree's 4, 2, 1 nodes per window: a different model in training.

Beyond the lecture, two of the full WaveNet's levers are options of both forms: ``gated`` replaces each tanh by the
gated activation ``tanh(a) · sigmoid(b)`` (the level's linear and BatchNorm 2H wide), and ``dropout`` drops each
level's output in training (a stochastic model: train-mode calls pass a key). With AdamW they make the registry's
``improved`` preset, which beats the lecture's 1.9937 in the same 200,000 steps.

The hand-written backward of each form sits directly under its forward: the layer backwards of
:mod:`jnnex.layers` in reverse order.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jnnex.init import OUTPUT_SCALE, kaiming_scale, normals
from jnnex.layers import (
    BatchNormParams, BatchNormState, Linear, Pair, batchnorm_backward, batchnorm_step, check_dropout_key, check_shape,
    dropout_backward, dropout_in_training, embedding_backward, embedding_forward, linear_backward, linear_forward, tanh_backward, tanh_forward,
)
from jnnex.lm import Forward, LanguageModel
from jnnex.settings import positive_int, setting


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
# WaveNet's gated activation (van den Oord et al. 2016)


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


PAIRS = {  # the WaveNet's own pairs (jnnex.layers.PAIRS: linear, batchnorm, tanh, embedding)
    "flatten_consecutive": Pair(flatten_consecutive_forward, flatten_consecutive_backward, ("x", "n"), fixed=("n",)),
    "causal_conv": Pair(causal_conv_forward, causal_conv_backward, ("x", "W", "dilation"), fixed=("dilation",)),
    "gated_tanh": Pair(gated_tanh_forward, gated_tanh_backward, ("x",)),
}


def depth(window: int, what: str = "block_size") -> int:
    """``log2(window)``: the number of levels of a tree over ``window`` characters (a power of two ≥ 2)."""
    if not (isinstance(window, int) and window >= 2 and window & (window - 1) == 0):
        raise ValueError(f"{what} must be a power of two >= 2 (the tree fuses characters two at a time, "
                         f"log2({what}) levels), got {window!r}")
    return window.bit_length() - 1


@dataclasses.dataclass(frozen=True)
class WaveNetConfig:
    vocab_size: int = setting(27, "V: tokens in the vocabulary (set from the data)")
    block_size: int = setting(8, "T: characters of context, a power of two; the tree has log2(T) levels")
    n_embd: int = setting(24, "embedding size per character")
    n_hidden: int = setting(128, "H: width of every level")
    gated: bool = setting(False, "WaveNet's gated activation tanh(a) * sigmoid(b) instead of tanh: each level's "
                                 "linear and BatchNorm are 2H wide")
    dropout: float = setting(0.0, "dropout rate after each level's activation in training (0: none)")
    momentum: float = setting(0.1, "BatchNorm running statistics: new = (1 - momentum) old + momentum batch")
    eps: float = setting(1e-5, "BatchNorm's epsilon")
    batch_axis: str | None = setting(None, "the mesh axis BatchNorm's statistics span under jax.shard_map (set by "
                                           "jnnex.parallel.explicit_step; None: this device's rows)", flag=False)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden"):
            positive_int(name, getattr(self, name))
        depth(self.window, self.window_name)
        if not 0 < self.momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def window(self) -> int:
        """The characters one prediction sees: the tree's context."""
        return self.block_size

    window_name = "block_size"


class WaveNetParams(NamedTuple):
    C: jax.Array  # (V, n_embd) character embeddings
    levels: tuple  # Linear (2·C_in, H), no bias, per level; C_in = n_embd at level 0, H above
    bn: tuple  # BatchNormParams (H,) per level
    out: Linear  # (H, V) with bias


def init(key, cfg: WaveNetConfig):
    """The lecture's init: embeddings ``N(0, 1)``, level weights ``N(0, 1/fan_in)`` (gain 1), the output weight
    × 0.1 and its bias 0; BatchNorm γ = 1, β = 0, running mean 0 and variance 1."""
    L, H = depth(cfg.window, cfg.window_name), cfg.n_hidden
    H_out = 2 * H if cfg.gated else H  # a gated level's linear gives the filter and the gate side by side
    fan_ins = [2 * cfg.n_embd] + [2 * H] * (L - 1)
    keys = jax.random.split(key, L + 2)
    draws = [(keys[0], (cfg.vocab_size, cfg.n_embd)), *((k, (n, H_out)) for k, n in zip(keys[1:], fan_ins)),
             (keys[-1], (H, cfg.vocab_size))]
    table, *Ws, W_out = normals(draws)  # one draw for all (see init.normals)
    levels = tuple(Linear(W * kaiming_scale(n, "linear"), None) for W, n in zip(Ws, fan_ins))
    out = Linear(W_out * kaiming_scale(H, "linear") * OUTPUT_SCALE, jnp.zeros((cfg.vocab_size,), jnp.float32))
    bn = tuple(BatchNormParams(jnp.ones((H_out,), jnp.float32), jnp.zeros((H_out,), jnp.float32)) for _ in range(L))
    state = tuple(BatchNormState(jnp.zeros((H_out,), jnp.float32), jnp.ones((H_out,), jnp.float32))
                  for _ in range(L))
    return WaveNetParams(table, levels, bn, out), state


def _normalise(cfg, params, state, h, i, train: bool):
    """Level ``i``'s BatchNorm over every axis but the last, then tanh (or the gated tanh):
    ``(h, new_state_i, c_bn, c_act)``."""
    h, new, c_bn = batchnorm_step(params.bn[i], state[i], h, train=train, momentum=cfg.momentum, eps=cfg.eps,
                                  axis_name=cfg.batch_axis)  # statistics over all B·T' rows of (B, T', H)
    h, c_act = (gated_tanh_forward if cfg.gated else tanh_forward)(h)
    return h, new, c_bn, c_act


def _level_backward(cfg, dh, c_bn, c_act):
    """The activation then BatchNorm, backwards: ``(dh, BatchNormParams(dγ, dβ))``."""
    dh = (gated_tanh_backward if cfg.gated else tanh_backward)(dh, c_act)
    dh, dgamma, dbeta = batchnorm_backward(dh, c_bn, axis_name=cfg.batch_axis)
    return dh, BatchNormParams(dgamma, dbeta)


# ----------------------------------------------------------------------------------------------------------------------
# The tree


def forward(cfg: WaveNetConfig, params: WaveNetParams, state, x, train: bool, key=None) -> Forward:
    """``Forward(logits (B, V), new_state, caches, acts)``; ``acts`` holds each level's activation (B, T/2^(l+1), H).
    Train mode normalises with batch-and-position statistics and updates the running ones (and drops out with
    ``key`` when ``cfg.dropout > 0``); eval mode uses the running statistics and drops nothing."""
    check_dropout_key(cfg.dropout, train, key)
    if x.ndim != 2 or x.shape[1] != cfg.block_size:
        raise ValueError(f"wavenet: x must have shape (B, {cfg.block_size}), got {x.shape}")
    B = x.shape[0]
    h, c_emb = embedding_forward(params.C, x)  # (B, T, n_embd)
    caches, new_state, acts = [], [], []
    for i, level in enumerate(params.levels):
        h, c_fc = flatten_consecutive_forward(h, 2)  # (B, T', 2C): neighbours side by side
        h, c_lin = linear_forward(h, level.W)  # (B, T', H)
        h, new, c_bn, c_act = _normalise(cfg, params, state, h, i, train)  # (B, T', H)
        new_state.append(new)
        acts.append(h)
        h, c_drop = dropout_in_training(h, key, i, cfg.dropout, train)
        caches.append((c_fc, c_lin, c_bn, c_act, c_drop))
    h = h.reshape(B, cfg.n_hidden)  # (B, 1, H) -> (B, H): the root of the tree
    logits, c_out = linear_forward(h, params.out.W, params.out.b)  # (B, V)
    return Forward(logits, tuple(new_state), (c_emb, tuple(caches), c_out), tuple(acts))


def backward(cfg: WaveNetConfig, params: WaveNetParams, caches, dlogits):
    """Every parameter gradient from ``dlogits (B, V)``, the tree's layers backwards from the root down: output
    linear, then per level dropout (if on), the activation, BatchNorm, linear and the inverse of the pairing, then
    the embedding scatter-add. Returns ``(grads, act_grads)``; ``act_grads`` is the gradient at each level's
    activation."""
    c_emb, level_caches, c_out = caches
    dh, dW_out, db_out = linear_backward(dlogits, c_out)  # (B, H)
    dh = dh.reshape(dh.shape[0], 1, cfg.n_hidden)  # (B, 1, H)
    levels, bn, act_grads = [], [], []
    for c_fc, c_lin, c_bn, c_act, c_drop in reversed(level_caches):
        if c_drop is not None:
            dh, _, _ = dropout_backward(dh, c_drop)
        act_grads.append(dh)  # (B, T', H)
        dh, dbn = _level_backward(cfg, dh, c_bn, c_act)
        dh, dW, _ = linear_backward(dh, c_lin)  # (B, T', 2C)
        dh, _ = flatten_consecutive_backward(dh, c_fc)  # (B, 2T', C)
        levels.append(Linear(dW, None))
        bn.append(dbn)
    dC, _ = embedding_backward(dh, c_emb)  # (V, n_embd)
    grads = WaveNetParams(dC, tuple(reversed(levels)), tuple(reversed(bn)), Linear(dW_out, db_out))
    return grads, tuple(reversed(act_grads))


def embeddings(params: WaveNetParams) -> jax.Array:
    """The character embedding table ``C (V, n_embd)``."""
    return params.C


def wavenet(cfg: WaveNetConfig = WaveNetConfig()) -> LanguageModel:
    """The lecture's WaveNet-style tree; ``.with_gradients("manual")`` trains it on :func:`backward`."""
    return LanguageModel("wavenet", cfg, init, forward, backward, stochastic=cfg.dropout > 0,
                         embeddings_fn=embeddings)


# ----------------------------------------------------------------------------------------------------------------------
# The convolutional form


@dataclasses.dataclass(frozen=True)
class WaveNetConvConfig(WaveNetConfig):
    block_size: int = setting(16, "T: the longest word + 1 (set from the data); the sampler's context")
    context: int = setting(8, "characters each prediction sees (the tree's block_size), a power of two: "
                              "log2(context) levels of dilations 1, 2, 4, ...")

    @property
    def window(self) -> int:
        return self.context

    window_name = "context"



def conv_forward(cfg: WaveNetConvConfig, params: WaveNetParams, state, x, train: bool, key=None) -> Forward:
    """``Forward(logits (B, T, V), …)`` for padded words ``x (B, T)``: position ``t`` predicts from the ``context``
    characters up to and including ``x[:, t]`` (start tokens before the word). ``acts`` are each level's activation
    ``(B, T + context - 2^(l+1), H)``, the positions before the word included."""
    check_dropout_key(cfg.dropout, train, key)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"wavenet-conv: x must have shape (B, T), got {x.shape}")
    B, T = x.shape
    x = jnp.concatenate([jnp.zeros((B, cfg.context - 1), x.dtype), x], axis=1)  # (B, T + context - 1)
    h, c_emb = embedding_forward(params.C, x)  # (B, T + context - 1, n_embd)
    caches, new_state, acts = [], [], []
    for i, level in enumerate(params.levels):
        h, c_conv = causal_conv_forward(h, level.W, 2**i)  # (B, L - 2^i, H)
        h, new, c_bn, c_act = _normalise(cfg, params, state, h, i, train)
        new_state.append(new)
        acts.append(h)
        h, c_drop = dropout_in_training(h, key, i, cfg.dropout, train)
        caches.append((c_conv, c_bn, c_act, c_drop))
    logits, c_out = linear_forward(h, params.out.W, params.out.b)  # (B, T, V)
    return Forward(logits, tuple(new_state), (c_emb, tuple(caches), c_out), tuple(acts))


def conv_backward(cfg: WaveNetConvConfig, params: WaveNetParams, caches, dlogits):
    """The convolutional form backwards: output linear, then per level dropout (if on), the activation, BatchNorm and
    the convolution's pair (which sends each output's gradient to both of its taps), then the embedding scatter-add."""
    c_emb, level_caches, c_out = caches
    dh, dW_out, db_out = linear_backward(dlogits, c_out)  # (B, T, H)
    levels, bn, act_grads = [], [], []
    for c_conv, c_bn, c_act, c_drop in reversed(level_caches):
        if c_drop is not None:
            dh, _, _ = dropout_backward(dh, c_drop)
        act_grads.append(dh)
        dh, dbn = _level_backward(cfg, dh, c_bn, c_act)
        dh, dW, _ = causal_conv_backward(dh, c_conv)  # (B, L, C)
        levels.append(Linear(dW, None))
        bn.append(dbn)
    dC, _ = embedding_backward(dh, c_emb)  # the start tokens' gradients land on C[0], as they should
    grads = WaveNetParams(dC, tuple(reversed(levels)), tuple(reversed(bn)), Linear(dW_out, db_out))
    return grads, tuple(reversed(act_grads))


def wavenet_conv(cfg: WaveNetConvConfig = WaveNetConvConfig()) -> LanguageModel:
    """The WaveNet as causal dilated convolutions over whole words (per-position targets). Its :func:`init` is the
    tree's: the same key gives the same parameters as the tree with ``block_size = context``."""
    return LanguageModel("wavenet-conv", cfg, init, conv_forward, conv_backward, stochastic=cfg.dropout > 0,
                         per_position=True, embeddings_fn=embeddings)
