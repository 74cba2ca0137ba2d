"""Recurrent language models (makemore.py's ``RNN``: Elman 1990, Mikolov et al. 2010; and its ``GRU``: Cho et al.
2014), with backprop through time written by hand.

Every position of a padded word is read in order; the hidden state carries what came before::

    h_{-1} = start                                   (H,), learned
    h_t    = cell(C[x_t], h_{t-1})                   (B, H)     one lax.scan step
    logits_t = h_t @ W_head + b_head                 (B, V)

The ``rnn`` cell is ``tanh([x, h] @ W + b)``; the ``gru`` cell mixes ``h`` with a candidate through an update gate
and a reset gate (:func:`gru_cell_forward`, above). At makemore.py's defaults (n_embd 64, n_embd2 64) on
names.txt: 11,803 parameters (RNN) and 28,315 (GRU). Initialisation is PyTorch's, as makemore.py inherits it:
embeddings ``N(0, 1)``, each linear's weight and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, the start state 0.

**Backprop through time** (:func:`backward`) is the forward scan run backwards: a reverse-time ``lax.scan`` whose
carry is ``dh`` — the loss gradient reaching ``h_t`` from the future — added at each step to the gradient the head
sends to ``h_t``; the cell's backward turns it into the step's input gradient, the parameter gradients (summed over
time) and the ``dh`` for the step before. What is left at ``t = -1`` is the start state's gradient.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jnnex.init import torch_linear
from jnnex.layers import (
    Linear, Pair, check_shape, embedding_backward, embedding_forward, linear_backward, linear_forward, per_channel,
)
from jnnex.lm import Forward, LanguageModel
from jnnex.settings import check_choice, positive_int, setting

CELLS = ("rnn", "gru")


# ----------------------------------------------------------------------------------------------------------------------
# Recurrent cell (Elman 1990; makemore.py's RNNCell): one time step


def rnn_cell_forward(x, h, W, b):
    """``h_new = tanh([x, h] @ W + b)``: ``x (B, E)`` this step's input, ``h (B, H)`` the previous state,
    ``W (E + H, H)``, ``b (H,)`` → ``h_new (B, H)``."""
    if x.shape[:-1] != h.shape[:-1] or W.shape != (x.shape[-1] + h.shape[-1], h.shape[-1]) or b.shape != h.shape[-1:]:
        raise ValueError(f"rnn_cell: expected x (B, E), h (B, H), W (E + H, H), b (H,), got {x.shape}, {h.shape}, "
                         f"{W.shape}, {b.shape}")
    xh = jnp.concatenate([x, h], axis=-1)  # (B, E + H)
    h_new = jnp.tanh(xh @ W + per_channel(b, h.ndim))  # (B, H)
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
    z = jax.nn.sigmoid(xh @ Wz + per_channel(bz, h.ndim))  # (B, H)
    r = jax.nn.sigmoid(xh @ Wr + per_channel(br, h.ndim))  # (B, H)
    xhr = jnp.concatenate([x, r * h], axis=-1)  # (B, E + H)
    hbar = jnp.tanh(xhr @ Wh + per_channel(bh, h.ndim))  # (B, H)
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


PAIRS = {  # the recurrent cells
    "rnn_cell": Pair(rnn_cell_forward, rnn_cell_backward, ("x", "h", "W", "b")),
    "gru_cell": Pair(gru_cell_forward, gru_cell_backward, ("x", "h", "Wz", "bz", "Wr", "br", "Wh", "bh")),
}


@dataclasses.dataclass(frozen=True)
class RNNConfig:
    vocab_size: int = setting(27, "V: tokens in the vocabulary (set from the data)")
    block_size: int = setting(16, "T: the longest word + 1 (set from the data); the sampler's context")
    n_embd: int = setting(64, "E: embedding size per character")
    n_embd2: int = setting(64, "H: size of the hidden state")
    cell: str = setting("rnn", "the recurrent cell: rnn (tanh) or gru (update and reset gates)", choices=CELLS)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_embd", "n_embd2"):
            positive_int(name, getattr(self, name))
        check_choice("cell", self.cell, CELLS)


class RNNParams(NamedTuple):
    start: jax.Array  # (H,) the hidden state before the first character
    C: jax.Array  # (V, E) character embeddings
    cell: tuple  # Linear (E + H, H) each: (W,) for rnn; (update z, reset r, candidate) for gru
    head: Linear  # (H, V), (V,)


def init(key, cfg: RNNConfig):
    """makemore.py's (PyTorch's) init: embeddings ``N(0, 1)``, linears ``U(±1/sqrt(fan_in))``, the start state 0."""
    E, H, V = cfg.n_embd, cfg.n_embd2, cfg.vocab_size
    k = jax.random.split(key, 9)
    n_cell = 1 if cfg.cell == "rnn" else 3
    cell = tuple(torch_linear(k[1 + 2 * i], k[2 + 2 * i], E + H, H) for i in range(n_cell))
    head = torch_linear(k[7], k[8], H, V)
    return RNNParams(jnp.zeros((H,), jnp.float32), jax.random.normal(k[0], (V, E), jnp.float32), cell, head), ()


def _cell_forward(cfg, cell, x, h):
    """One step of ``cfg.cell``: ``(h_new (B, H), cache)``; the cache without the weights (the same at every step:
    the scan would stack T copies of them), :func:`_cell_backward` puts them back."""
    flat = [a for lin in cell for a in lin]  # W, b[, W, b, W, b]
    h_new, cache = (rnn_cell_forward if cfg.cell == "rnn" else gru_cell_forward)(x, h, *flat)
    return h_new, (cache[0], cache[2]) if cfg.cell == "rnn" else cache[:-3]  # (xh, h_new) | (xh, xhr, h, z, r, h̄)


def _cell_backward(cfg, cell, dh_new, acts):
    """``(dx, dh_prev, cell grads)`` of one step, the cell grads shaped like the cell's parameters."""
    if cfg.cell == "rnn":
        dx, dh, *flat = rnn_cell_backward(dh_new, (acts[0], cell[0].W, acts[1]))
    else:
        dx, dh, *flat = gru_cell_backward(dh_new, (*acts, *(lin.W for lin in cell)))
    return dx, dh, tuple(Linear(flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


def forward(cfg: RNNConfig, params: RNNParams, state, x, train: bool, key=None) -> Forward:
    """``Forward(logits (B, T, V), (), caches, acts)``; ``acts`` is the hidden states ``(B, T, H)``. Train and eval
    are the same computation."""
    del key  # no random layer: one signature for every model's forward
    del train
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"rnn: x must have shape (B, T), got {x.shape}")
    B = x.shape[0]
    emb, c_emb = embedding_forward(params.C, x)  # (B, T, E)
    h0 = jnp.broadcast_to(params.start[None, :], (B, cfg.n_embd2))  # (B, H)

    def step(h, x_t):  # one time step: (B, H), (B, E) -> (B, H)
        h, c_cell = _cell_forward(cfg, params.cell, x_t, h)
        return h, (h, c_cell)

    _, (hs, c_cells) = jax.lax.scan(step, h0, jnp.swapaxes(emb, 0, 1))  # over time: hs (T, B, H)
    hs = jnp.swapaxes(hs, 0, 1)  # (B, T, H)
    logits, c_head = linear_forward(hs, params.head.W, params.head.b)  # (B, T, V)
    return Forward(logits, state, (c_emb, c_cells, c_head), (hs,))


def backward(cfg: RNNConfig, params: RNNParams, caches, dlogits):
    """Backprop through time, by hand: the head's backward gives each ``h_t`` its own gradient; a reverse-time scan
    adds the gradient ``dh`` arriving from step ``t + 1``, runs the cell backward, sums ``dW``/``db`` over time and
    hands ``dh`` to step ``t - 1``. Returns ``(grads, act_grads)``; ``act_grads`` holds ``dL/dh_t (B, T, H)``, the
    total gradient at each hidden state (the picture of vanishing or exploding gradients through time)."""
    c_emb, c_cells, c_head = caches
    dhs, dW_head, db_head = linear_backward(dlogits, c_head)  # (B, T, H): the head's share of each dL/dh_t

    def step_back(carry, inputs):  # one time step, backwards
        dh_next, dcell = carry  # dh_next: what h_t receives from step t + 1; dcell: the cell's gradients so far
        dh_head, c_cell = inputs
        dh = dh_head + dh_next  # (B, H): dL/dh_t, complete
        dx, dh_prev, dcell_t = _cell_backward(cfg, params.cell, dh, c_cell)
        return (dh_prev, jax.tree.map(jnp.add, dcell, dcell_t)), (dx, dh)

    zeros = (jnp.zeros_like(dhs[:, 0]), jax.tree.map(jnp.zeros_like, params.cell))
    (dh_start, dcell), (dxs, dh_all) = jax.lax.scan(step_back, zeros, (jnp.swapaxes(dhs, 0, 1), c_cells),
                                                    reverse=True)
    dC, _ = embedding_backward(jnp.swapaxes(dxs, 0, 1), c_emb)  # (V, E)
    grads = RNNParams(dh_start.sum(0), dC, dcell, Linear(dW_head, db_head))
    return grads, (jnp.swapaxes(dh_all, 0, 1),)


def embeddings(params: RNNParams) -> jax.Array:
    return params.C


def rnn(cfg: RNNConfig = RNNConfig()) -> LanguageModel:
    """makemore.py's RNN or GRU (``cfg.cell``); ``.with_gradients("manual")`` trains it on hand-written backprop
    through time."""
    return LanguageModel(cfg.cell, cfg, init, forward, backward, per_position=True, embeddings_fn=embeddings)
