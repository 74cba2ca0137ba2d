"""Deep character MLPs with BatchNorm (makemore part 3; Ioffe & Szegedy 2015).

Embeddings, then ``n_layers`` × [Linear → BatchNorm → tanh], then Linear (→ BatchNorm)::

    x = C[ix].reshape(B, T·n_embd)                              # (B, T·n_embd)
    for each hidden layer:  x = tanh(bn(x @ W [+ b]))             # (B, H)
    logits = x @ W_out [+ b_out]  (→ bn, with γ × 0.1)           # (B, V)

Two registered shapes:

* ``deep-mlp`` — the lecture's deep net: 5 hidden layers of 100, bias-free linears (BatchNorm's β makes a bias
  redundant), a final BatchNorm whose γ starts at 0.1 ("last layer less confident").
* ``bn-mlp`` — the single-hidden-layer net of the backprop lecture (n_embd 10, H 200): Linear with bias → BatchNorm →
  tanh → Linear, running statistics with momentum 0.001.

``batchnorm=False`` gives the same nets without normalisation (biases back on every linear), for the lecture's
comparisons. Variance convention: :mod:`jnnex.layers` (biased to normalise, unbiased running estimate, as PyTorch).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jnnex.init import GAINS, OUTPUT_SCALE, kaiming_normal
from jnnex.layers import (
    BatchNormParams, BatchNormState, Linear, batchnorm, embedding_forward, linear_forward, tanh_forward,
)
from jnnex.lm import LanguageModel


@dataclasses.dataclass(frozen=True)
class BNMLPConfig:
    vocab_size: int = 27  # V
    block_size: int = 3  # T
    n_embd: int = 10  # embedding size per character
    n_hidden: int = 100  # H: width of every hidden layer
    n_layers: int = 5  # hidden layers
    batchnorm: bool = True  # BatchNorm after every hidden linear
    final_batchnorm: bool = True  # and after the output linear (its γ starts at OUTPUT_SCALE)
    hidden_bias: bool = False  # a bias on hidden linears even with BatchNorm (redundant; the backprop lecture keeps it)
    gain: float = GAINS["tanh"]  # Kaiming gain of the hidden layers (5/3 for tanh)
    momentum: float = 0.1  # running statistics: new = (1 - momentum) · old + momentum · batch
    eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0 < self.momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if self.final_batchnorm and not self.batchnorm:
            raise ValueError("final_batchnorm needs batchnorm=True")


class BNMLPParams(NamedTuple):
    C: jax.Array  # (V, n_embd)
    dense: tuple  # n_layers + 1 Linear layers, the last one to V logits
    bn: tuple  # BatchNormParams for each normalised layer (empty without BatchNorm)


def _has_bias(cfg: BNMLPConfig, i: int) -> bool:
    last = i == cfg.n_layers
    if not cfg.batchnorm:
        return True
    return not cfg.final_batchnorm if last else cfg.hidden_bias


def _n_bn(cfg: BNMLPConfig) -> int:
    return (cfg.n_layers + cfg.final_batchnorm) if cfg.batchnorm else 0


def init(cfg: BNMLPConfig, key):
    """Kaiming init (gain ``cfg.gain``) on hidden layers; the output made less confident: γ × 0.1 of the final
    BatchNorm, or W × 0.1 and bias 0 without one. Small random hidden biases (× 0.01) where they exist."""
    keys = jax.random.split(key, 2 * (cfg.n_layers + 1) + 1)
    sizes = [cfg.block_size * cfg.n_embd] + [cfg.n_hidden] * cfg.n_layers + [cfg.vocab_size]
    dense = []
    for i, (nin, nout) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == cfg.n_layers
        W = kaiming_normal(keys[2 * i], nin, nout, "linear") * (1.0 if last else cfg.gain)
        if last and not cfg.final_batchnorm:
            W = W * OUTPUT_SCALE
        b = None
        if _has_bias(cfg, i) and last:
            b = jnp.zeros((nout,), jnp.float32)
        elif _has_bias(cfg, i):
            b = jax.random.normal(keys[2 * i + 1], (nout,), jnp.float32) * 0.01
        dense.append(Linear(W, b))
    bn, state = [], []
    for i in range(_n_bn(cfg)):
        C = sizes[i + 1]
        scale = OUTPUT_SCALE if i == cfg.n_layers else 1.0
        bn.append(BatchNormParams(jnp.full((C,), scale, jnp.float32), jnp.zeros((C,), jnp.float32)))
        state.append(BatchNormState(jnp.zeros((C,), jnp.float32), jnp.ones((C,), jnp.float32)))
    C = jax.random.normal(keys[-1], (cfg.vocab_size, cfg.n_embd), jnp.float32)
    return BNMLPParams(C, tuple(dense), tuple(bn)), tuple(state)


def forward(cfg: BNMLPConfig, params: BNMLPParams, state, x, train: bool, probes=None):
    """``(logits (B, V), new_state, activations)``: ``activations`` holds each hidden layer's tanh output (B, H),
    for diagnostics (unused outputs cost nothing under jit). ``probes`` (zeros of the activations' shapes) are added
    to the activations so that their gradient is the activations' gradient."""
    if x.ndim != 2 or x.shape[1] != cfg.block_size:
        raise ValueError(f"bn-mlp: x must have shape (B, {cfg.block_size}), got {x.shape}")
    B = x.shape[0]
    h = embedding_forward(params.C, x)[0].reshape(B, -1)  # (B, T·n_embd)
    new_state, acts = [], []
    for i, layer in enumerate(params.dense):
        h = linear_forward(h, layer.W, layer.b)[0]  # (B, H) or (B, V)
        if i < len(params.bn):
            h, s = batchnorm(params.bn[i], state[i], h, train=train, momentum=cfg.momentum, eps=cfg.eps)
            new_state.append(s)
        if i < cfg.n_layers:
            h = tanh_forward(h)[0]
            if probes is not None:
                h = h + probes[i]
            acts.append(h)
    return h, tuple(new_state), tuple(acts)


def apply(cfg: BNMLPConfig, params: BNMLPParams, state, x, train: bool):
    logits, new_state, _ = forward(cfg, params, state, x, train)
    return logits, new_state


def bn_mlp(cfg: BNMLPConfig = BNMLPConfig(), name: str = "deep-mlp") -> LanguageModel:
    """A BatchNorm MLP language model (``deep-mlp`` defaults; :data:`BN_MLP_SMALL` gives ``bn-mlp``)."""
    return LanguageModel(name, cfg, init, apply, forward_fn=forward)


# The single-hidden-layer BatchNorm net of makemore parts 3-4.
BN_MLP_SMALL = dict(n_hidden=200, n_layers=1, final_batchnorm=False, hidden_bias=True, momentum=0.001)


# ----------------------------------------------------------------------------------------------------------------------
# After training


def calibrate(cfg: BNMLPConfig, params: BNMLPParams, X, *, chunk: int = 32768):
    """Exact BatchNorm statistics over the whole training set ``X (N, T)``: the lecture's alternative to running
    averages. Returns a new state whose means/variances (unbiased, as the running estimate) are those of the data.

    Layers are calibrated in order, each on activations produced with the already-calibrated earlier layers, exactly
    as eval mode will see them.
    """
    X = jnp.asarray(X, jnp.int32)
    n = X.shape[0]
    if n < 2:
        raise ValueError("calibrate needs at least 2 examples")
    _, state = init(cfg, jax.random.key(0))
    state = list(state)
    for k in range(len(params.bn)):
        sums = jnp.zeros_like(state[k].mean, dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
        sq = jnp.zeros_like(sums)
        for start in range(0, n, chunk):
            pre = _pre_bn(cfg, params, tuple(state), X[start : start + chunk], k)  # (b, C)
            sums = sums + pre.astype(sums.dtype).sum(0)
            sq = sq + (pre.astype(sums.dtype) ** 2).sum(0)
        mean = sums / n
        var = (sq - n * mean * mean) / (n - 1)
        state[k] = BatchNormState(mean.astype(state[k].mean.dtype), var.astype(state[k].var.dtype))
    return tuple(state)


def _pre_bn(cfg, params, state, x, k):
    """The input of BatchNorm ``k`` in eval mode: layer ``k``'s linear applied to what :func:`forward` feeds it (the
    embeddings for ``k = 0``, else hidden layer ``k - 1``'s activations)."""
    if k == 0:
        h = embedding_forward(params.C, x)[0].reshape(x.shape[0], -1)  # (B, T·n_embd)
    else:
        h = forward(cfg, params, state, x, train=False)[2][k - 1]  # (B, H)
    return linear_forward(h, params.dense[k].W, params.dense[k].b)[0]


def fold_batchnorm(cfg: BNMLPConfig, params: BNMLPParams, state):
    """Fold each eval-mode BatchNorm into the linear before it: ``W' = W·s``, ``b' = (b - mean)·s + β`` with
    ``s = γ / sqrt(var + eps)``. Returns ``(cfg', params')`` of an equivalent network without BatchNorm."""
    dense = []
    for i, layer in enumerate(params.dense):
        if i < len(params.bn):
            g, beta = params.bn[i]
            s = g * jax.lax.rsqrt(state[i].var + cfg.eps)  # (C,)
            b = layer.b if layer.b is not None else jnp.zeros_like(beta)
            dense.append(Linear(layer.W * s.reshape(1, -1), (b - state[i].mean) * s + beta))
        else:
            dense.append(layer)
    folded = dataclasses.replace(cfg, batchnorm=False, final_batchnorm=False)
    return folded, BNMLPParams(params.C, tuple(dense), ())
