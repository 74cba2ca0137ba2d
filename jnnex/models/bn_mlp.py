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

The hand-written backward (makemore part 4) sits directly under the forward: :func:`backward` calls the layer
backwards in reverse order and works for every config (``bn-mlp``, ``deep-mlp``, with or without BatchNorm).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jnnex.init import GAINS, OUTPUT_SCALE, kaiming_scale, normals
from jnnex.layers import (
    BatchNormParams, BatchNormState, Linear, batchnorm_backward, batchnorm_step, check_train, embedding_backward,
    embedding_forward, linear_backward, linear_forward, tanh_backward, tanh_forward,
)
from jnnex.lm import Forward, LanguageModel
from jnnex.settings import positive_int, setting


@dataclasses.dataclass(frozen=True)
class BNMLPConfig:
    vocab_size: int = setting(27, "V: tokens in the vocabulary (set from the data)")
    block_size: int = setting(3, "T: characters of context")
    n_embd: int = setting(10, "embedding size per character")
    n_hidden: int = setting(100, "H: width of every hidden layer")
    n_layers: int = setting(5, "hidden layers")
    batchnorm: bool = setting(True, "BatchNorm after every hidden linear")
    final_batchnorm: bool | None = setting(None, "BatchNorm after the output linear too, its gain starting at 0.1 "
                                                 "(default: as batchnorm)")
    hidden_bias: bool = setting(False, "a bias on hidden linears even with BatchNorm (redundant; the backprop "
                                       "lecture keeps it)")
    gain: float = setting(GAINS["tanh"], "Kaiming gain of the hidden layers (5/3 for tanh)")
    momentum: float = setting(0.1, "BatchNorm running statistics: new = (1 - momentum) old + momentum batch")
    eps: float = setting(1e-5, "BatchNorm's epsilon")
    batch_axis: str | None = setting(None, "the mesh axis BatchNorm's statistics span under jax.shard_map (set by "
                                           "jnnex.parallel.explicit_step; None: this device's rows)", flag=False)

    def __post_init__(self):
        if self.final_batchnorm is None:  # a frozen dataclass: resolved once, here
            object.__setattr__(self, "final_batchnorm", self.batchnorm)
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layers"):
            positive_int(name, getattr(self, name))
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


def init(key, cfg: BNMLPConfig):
    """Kaiming init (gain ``cfg.gain``) on hidden layers; the output made less confident: γ × 0.1 of the final
    BatchNorm, or W × 0.1 and bias 0 without one. Small random hidden biases (× 0.01) where they exist."""
    keys = jax.random.split(key, 2 * (cfg.n_layers + 1) + 1)
    sizes = [cfg.block_size * cfg.n_embd] + [cfg.n_hidden] * cfg.n_layers + [cfg.vocab_size]
    pairs = list(enumerate(zip(sizes[:-1], sizes[1:])))
    random_bias = [_has_bias(cfg, i) and i < cfg.n_layers for i, _ in pairs]  # the output bias starts at 0
    draws = [(keys[2 * i], (nin, nout)) for i, (nin, nout) in pairs]
    draws += [(keys[2 * i + 1], (nout,)) for i, (_, nout) in pairs if random_bias[i]]
    z = normals([*draws, (keys[-1], (cfg.vocab_size, cfg.n_embd))])  # one draw for all (see init.normals)
    Ws, biases, table = z[: len(pairs)], iter(z[len(pairs) : -1]), z[-1]
    dense = []
    for i, (nin, nout) in pairs:
        last = i == cfg.n_layers
        W = Ws[i] * kaiming_scale(nin, "linear") * (1.0 if last else cfg.gain)
        if last and not cfg.final_batchnorm:
            W = W * OUTPUT_SCALE
        b = None
        if _has_bias(cfg, i) and last:
            b = jnp.zeros((nout,), jnp.float32)
        elif random_bias[i]:
            b = next(biases) * 0.01
        dense.append(Linear(W, b))
    bn, state = [], []
    for i in range(_n_bn(cfg)):
        C = sizes[i + 1]
        scale = OUTPUT_SCALE if i == cfg.n_layers else 1.0
        bn.append(BatchNormParams(jnp.full((C,), scale, jnp.float32), jnp.zeros((C,), jnp.float32)))
        state.append(BatchNormState(jnp.zeros((C,), jnp.float32), jnp.ones((C,), jnp.float32)))
    return BNMLPParams(table, tuple(dense), tuple(bn)), tuple(state)


def forward(cfg: BNMLPConfig, params: BNMLPParams, state, x, train: bool, key=None) -> Forward:
    """``Forward(logits (B, V), new_state, caches, acts)``: ``caches`` holds each layer's (train mode) for
    :func:`backward`, ``acts`` each hidden layer's tanh output (B, H). Train mode normalises with the batch
    statistics and updates the running ones; eval mode uses the running statistics (and keeps no BatchNorm cache)."""
    del key  # no random layer: one signature for every model's forward
    check_train(train)
    if x.ndim != 2 or x.shape[1] != cfg.block_size:
        raise ValueError(f"bn-mlp: x must have shape (B, {cfg.block_size}), got {x.shape}")
    B = x.shape[0]
    emb, c_emb = embedding_forward(params.C, x)  # (B, T, n_embd)
    h = emb.reshape(B, -1)  # (B, T·n_embd)
    caches, new_state, acts = [], [], []
    for i, dense in enumerate(params.dense):
        h, c_lin = linear_forward(h, dense.W, dense.b)  # (B, H) or (B, V)
        c_bn = c_tanh = None
        if i < len(params.bn):
            h, new, c_bn = batchnorm_step(params.bn[i], state[i], h, train=train, momentum=cfg.momentum, eps=cfg.eps,
                                          axis_name=cfg.batch_axis)  # (B, H)
            new_state.append(new)
        if i < cfg.n_layers:
            h, c_tanh = tanh_forward(h)  # (B, H)
            acts.append(h)
        caches.append((c_lin, c_bn, c_tanh))
    return Forward(h, tuple(new_state), (c_emb, tuple(caches)), tuple(acts))


def backward(cfg: BNMLPConfig, params: BNMLPParams, caches, dlogits):
    """Every parameter gradient from ``dlogits (B, V)`` (makemore part 4, compact): the closed-form layer backwards
    of :mod:`jnnex.layers` in exactly the reverse order of :func:`forward` — linear, BatchNorm (the one-line form),
    tanh (``1 - t²``), and the embedding scatter-add. Returns ``(grads, act_grads)``, ``act_grads`` the gradient at
    each hidden tanh output. ``jax.grad`` appears nowhere; the tests prove it equal to ``jax.grad`` in float64."""
    c_emb, layer_caches = caches
    dense_grads, bn_grads, act_grads = [], [], []
    dh = dlogits
    for c_lin, c_bn, c_tanh in reversed(layer_caches):
        if c_tanh is not None:
            act_grads.append(dh)  # (B, H): the gradient at this layer's activation
            dh = tanh_backward(dh, c_tanh)
        if c_bn is not None:
            dh, dgamma, dbeta = batchnorm_backward(dh, c_bn, axis_name=cfg.batch_axis)
            bn_grads.append(BatchNormParams(dgamma, dbeta))
        dh, dW, db = linear_backward(dh, c_lin)
        dense_grads.append(Linear(dW, db))
    ix = c_emb[0]
    dC, _ = embedding_backward(dh.reshape(ix.shape + (params.C.shape[1],)), c_emb)  # (V, n_embd)
    grads = BNMLPParams(dC, tuple(reversed(dense_grads)), tuple(reversed(bn_grads)))
    return grads, tuple(reversed(act_grads))


def bn_mlp(cfg: BNMLPConfig = BNMLPConfig(), name: str = "deep-mlp") -> LanguageModel:
    """A BatchNorm MLP language model (``deep-mlp`` defaults; :data:`BN_MLP_SMALL` gives ``bn-mlp``);
    ``.with_gradients("manual")`` trains it on :func:`backward`."""
    return LanguageModel(name, cfg, init, forward, backward, embeddings_fn=embeddings)


def embeddings(params: BNMLPParams) -> jax.Array:
    """The character embedding table ``C (V, n_embd)``."""
    return params.C


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
    _, state = init(jax.random.key(0), cfg)
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
        h = forward(cfg, params, state, x, False).acts[k - 1]  # (B, H)
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
