"""A mixture-of-experts MLP (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral's top-k gates), its backward by
hand beside its forward.

Each token's router logits ``r = x W_router`` (one per expert) choose its ``top_k`` experts; the gates are the
softmax of the chosen logits (Mixtral's: the other experts get exactly 0), and the output is the gated sum of the
chosen experts' MLPs (``gelu(x W1[e]) W2[e]``).

**Dispatch** (GShard's): each expert has a buffer of ``capacity`` slots per group of tokens; a group's tokens queue
for each expert they chose in token order, and fill its slots. With a capacity, the choices past it are **dropped**
(the token's output lacks that expert's share, as in Switch; :func:`dropped` counts them). With ``capacity=None`` the
layer is **dropless**: a buffer as long as the group, so nothing is ever dropped — exact, at the cost of buffers (and
expert compute) as large as the dense layer's. The experts run on their buffers; the outputs come back to the tokens
through the same slots, weighted by the gates.

**Expert parallelism** (``axis``, inside ``jax.shard_map``): the experts are split over the devices of a mesh axis,
and so are the tokens (one group per device). The buffers go to the devices that hold their experts and the outputs
come back with ``jax.lax.all_to_all``, written out — in the forward, and again in the hand-written backward, where the
output gradients go to the experts and the input gradients come back (an all-to-all is its own transpose).

The **load-balancing loss** (Switch's, for top-k as GShard and Mixtral count it): ``aux = E · Σ_e f_e · P_e``, with
``f_e`` the fraction of the ``N · top_k`` choices that went to expert ``e`` (a count: no gradient) and ``P_e`` the
mean over tokens of the full softmax of the router logits; 1 when the load is uniform, up to ``E`` when one expert
takes everything. Its gradient reaches the router through ``P``.

Ties among the router logits go to the lower expert index (``jax.lax.top_k``); the choice is piecewise constant, so
its gradient is 0, as ``jax.grad`` takes it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.layers import Pair, check_shape
from jnnex.models.gpt import gelu_backward, gelu_forward


def check_moe(x, W_router, W1, W2, top_k, capacity=None, groups: int = 1) -> None:
    C = x.shape[-1]
    if W_router.ndim != 2 or W_router.shape[0] != C:
        raise ValueError(f"moe: W_router must be (C, E) = ({C}, E) for x {x.shape}, got {W_router.shape}")
    E = W_router.shape[1]
    if W1.ndim != 3 or W1.shape[1] != C or W2.ndim != 3 or W2.shape != (W1.shape[0], W1.shape[2], C):
        raise ValueError(f"moe: with {E} experts and C = {C}, W1 must be (E, C, H) and W2 (E, H, C), got "
                         f"{W1.shape} and {W2.shape}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"moe: top_k must be an integer in [1, {E}] (the number of experts), got {top_k!r}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
        raise ValueError(f"moe: capacity must be an integer >= 1 (token slots per expert and group) or None "
                         f"(dropless), got {capacity!r}")
    N = int(np.prod(x.shape[:-1]))
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or N % groups:
        raise ValueError(f"moe: groups ({groups!r}) must be an integer >= 1 that divides the {N} tokens")


def capacity_for(factor: float, tokens: int, experts: int, top_k: int) -> int:
    """GShard's and Switch's capacity: ``ceil(factor · tokens · top_k / experts)`` slots per expert for a group of
    ``tokens`` tokens (1.0: room for a perfectly even load; a factor of ``experts / top_k`` or more never drops)."""
    return max(1, math.ceil(factor * tokens * top_k / experts))


class Routing(NamedTuple):
    """Where a group's tokens go. ``gates (N, E)``: the softmax over each token's chosen experts, 0 elsewhere;
    ``probs (N, E)``: the full softmax; ``chosen (N, E)``: 1 where chosen; ``kept (G, Ng, E)``: chosen and within the
    expert's capacity in the token's group; ``slot (G, Ng, E)``: the slot of the expert's buffer the token fills (the
    capacity, one past the last slot, where not kept); ``source (G, E, cap)``: the token in each slot (``Ng``, one past
    the last token, where the slot is empty)."""

    gates: jax.Array
    probs: jax.Array
    chosen: jax.Array
    kept: jax.Array
    slot: jax.Array
    source: jax.Array


def route(xf, W_router, top_k: int, capacity: int | None, groups: int) -> Routing:
    """Each of the ``N`` tokens' ``top_k`` experts, and its slot in each chosen expert's buffer: the tokens of each of
    the ``groups`` groups queue for an expert in token order, and those past its ``capacity`` are dropped (``None``:
    dropless, a buffer as long as the group)."""
    N, E = xf.shape[0], W_router.shape[1]
    logits = xf @ W_router  # (N, E)
    _, top = jax.lax.top_k(logits, top_k)  # (N, k): ties to the lower index
    chosen = jax.nn.one_hot(top, E, dtype=xf.dtype).sum(1)  # (N, E): 1 where chosen
    gates = jax.nn.softmax(jnp.where(chosen > 0, logits, -jnp.inf), axis=-1)  # (N, E), 0 off the chosen experts
    probs = jax.nn.softmax(logits, axis=-1)
    Ng = N // groups
    cap = Ng if capacity is None else capacity
    queue = chosen.reshape(groups, Ng, E).astype(jnp.int32)
    position = jnp.cumsum(queue, axis=1) - 1  # (G, Ng, E): the token's place in the expert's queue, in its group
    kept = (queue > 0) & (position < cap)
    slot = jnp.where(kept, position, cap)  # (G, Ng, E)
    tokens = jnp.broadcast_to(jnp.arange(Ng, dtype=jnp.int32)[:, None], (Ng, E))
    experts = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32)[None, :], (Ng, E))
    source = jax.vmap(lambda sl: jnp.full((E, cap + 1), Ng, jnp.int32).at[experts, sl].set(tokens))(slot)
    return Routing(gates, probs, chosen, kept.astype(xf.dtype), slot, source[:, :, :cap])


def _gather(rows, index):
    """Per group: ``rows (G, R, C)`` at ``index (G, ...)``, where index ``R`` (one past the last) reads zeros."""
    return jax.vmap(lambda r, i: jnp.concatenate([r, jnp.zeros_like(r[:1])])[i])(rows, index)


def _scatter_add(values, index, R: int):
    """The transpose of :func:`_gather`: ``values (G, ..., C)`` added into ``R`` rows per group at ``index``
    (index ``R`` discarded)."""
    C = values.shape[-1]
    return jax.vmap(lambda v, i: jnp.zeros((R + 1, C), v.dtype).at[i].add(v)[:R])(values, index)


def _flat_slot(slot, cap: int):
    """``slot (G, Ng, E)`` as a row of the experts' buffers laid end to end, ``(E · cap)`` rows per group: ``e · cap
    + slot``, and ``E · cap`` (no row: zeros) where the choice was not kept."""
    E = slot.shape[-1]
    return jnp.where(slot < cap, slot + cap * jnp.arange(E, dtype=jnp.int32)[None, None, :], E * cap)


def _exchange(a, axis: str | None):
    """The token exchange of expert parallelism: ``a (n, E/n, cap, C)`` — for each of the ``n`` devices of ``axis``,
    the buffers of its experts — sent to them, and what every device sent for this device's experts received:
    ``(n sources, E/n, cap, C)``. ``jax.lax.all_to_all``, its own transpose (the backward sends the gradients back
    the same way). ``axis=None``: nothing to exchange."""
    return a if axis is None else jax.lax.all_to_all(a, axis, 0, 0, tiled=True)


def moe_forward(x, W_router, W1, W2, top_k: int, capacity: int | None = None, groups: int = 1,
                axis: str | None = None, model_axis: str | None = None):
    """``x (..., C)`` to ``(y (..., C), aux ())``: each token through its ``top_k`` experts, gated, and the
    load-balancing loss. Caches what :func:`moe_backward` needs.

    ``capacity`` slots per expert per group of tokens (``groups`` groups of consecutive tokens; GShard's): a token
    past an expert's capacity in its group is dropped from that expert (its gate's share of the output is lost, as
    in Switch; :func:`dropped` counts them). ``None``: dropless.

    ``axis`` (inside ``jax.shard_map``): **expert parallelism** — ``x`` is this device's tokens (one group), ``W1``,
    ``W2`` its ``E / n`` experts, ``W_router`` whole; each device sends every expert's buffer to the device holding
    it and gets the outputs back (:func:`_exchange`, ``all_to_all``), and the balancing loss counts every device's
    tokens (``psum``). The router's gradient is this device's tokens' part (the caller sums it over ``axis``, as any
    replicated weight's); the experts' gradients are whole.

    ``model_axis`` (inside ``jax.shard_map``): **tensor parallelism inside each expert** (Megatron's expert tensor
    parallelism) — ``W1 (E, C, H/m)`` and ``W2 (E, H/m, C)`` are this device's hidden units of every expert, ``x``
    and the router whole; each expert's output is then this device's part of the sum over hidden units, and the
    gated combine is summed over ``model_axis`` (one all-reduce of ``(N, C)``, the dense MLP's ``g``)."""
    check_moe(x, W_router, W1, W2, top_k, capacity, groups)
    if axis is not None and groups != 1:
        raise ValueError("moe: under expert parallelism each device's tokens are one group; groups must be 1")
    shape, E = x.shape, W_router.shape[1]
    n = 1 if axis is None else jax.lax.axis_size(axis)
    if W1.shape[0] * n != E:
        raise ValueError(f"moe: W1 holds {W1.shape[0]} experts on each of {n} device(s), but the router has {E}")
    xf = x.reshape(-1, shape[-1])  # (N, C)
    r = route(xf, W_router, top_k, capacity, groups)
    G, cap = groups, r.source.shape[-1]
    total = xf.shape[0] * n  # every device's tokens
    load = _sum(r.chosen.sum(0), axis) / (total * top_k)  # (E,) f_e: the fraction of the choices each expert got
    aux = E * (load * _sum(r.probs.sum(0), axis) / total).sum()
    Ng = xf.shape[0] // G
    xe = _gather(xf.reshape(G, Ng, -1), r.source)  # (G, E, cap, C): each expert's buffer, slot by slot
    xe = _exchange(xe.reshape(n, E // n, cap, -1) if axis is not None else xe, axis)  # (S, E_local, cap, C)
    h, c_gelu = gelu_forward(jnp.einsum("gesc,ech->gesh", xe, W1))
    o = jnp.einsum("gesh,ehc->gesc", h, W2)  # (S, E_local, cap, C): each expert's outputs, slot by slot
    o = _exchange(o, axis).reshape(G, E, cap, -1)  # (back to the tokens' devices)
    o_tok = _gather(o.reshape(G, E * cap, -1), _flat_slot(r.slot, cap))  # (G, Ng, E, C): each choice's output
    gk = r.gates.reshape(G, Ng, E) * r.kept  # (G, Ng, E): the kept choices' gates
    y = _sum(jnp.einsum("gne,gnec->gnc", gk, o_tok), model_axis)  # (model_axis: each device's hidden units' part)
    cache = (xf, shape, r, load, xe, h, c_gelu, o_tok, gk, W_router, W1, W2, axis, model_axis)
    return (y.reshape(shape), aux), cache


def _sum(a, axis):
    return a if axis is None else jax.lax.psum(a, axis)


def dropped(x, W_router, top_k: int, capacity: int | None = None, groups: int = 1) -> jax.Array:
    """The number of (token, expert) choices dropped for want of capacity: 0 when dropless."""
    r = route(x.reshape(-1, x.shape[-1]), W_router, top_k, capacity, groups)
    return r.chosen.sum() - r.kept.sum()


def moe_backward(dout, cache):
    """``(dy, daux)`` to ``(dx, dW_router, dW1, dW2, None, None, None, None, None)``. The combine's backward (each
    slot's output weighted by its gate, and each kept gate's gradient); the exchange back (``all_to_all``: the
    gradients return to the experts' devices); each expert's MLP backward; the exchange again (to the tokens'
    devices); the dispatch's; the gates' softmax over the chosen experts (``dr = g ⊙ (dg − Σ g dg)``, 0 off them and
    for dropped choices); the balancing loss through the full softmax (``dP_e = daux · E f_e / N``); the router's
    linear. Under ``model_axis`` the gates' and the inputs' gradients are summed over it."""
    dy, daux = dout
    xf, shape, r, load, xe, h, c_gelu, o_tok, gk, W_router, W1, W2, axis, model_axis = cache
    check_shape("moe_backward: dy", dy, shape)
    check_shape("moe_backward: daux", daux, ())
    G, N, E = r.kept.shape[0], xf.shape[0], W_router.shape[1]
    n = 1 if axis is None else jax.lax.axis_size(axis)
    cap = r.source.shape[-1]
    Ng = N // G
    dyg = dy.reshape(G, Ng, shape[-1])
    dgates = (jnp.einsum("gnc,gnec->gne", dyg, o_tok) * r.kept).reshape(N, E)  # each kept gate's gradient
    dgates = _sum(dgates, model_axis)  # (model_axis: o_tok is each device's hidden units' part of the outputs)
    do_tok = gk[..., None] * dyg[:, :, None, :]  # (G, Ng, E, C)
    do = _scatter_add(do_tok.reshape(G, Ng * E, -1), _flat_slot(r.slot, cap).reshape(G, Ng * E), E * cap)
    do = do.reshape(G, E, cap, -1)
    do = _exchange(do.reshape(n, E // n, cap, -1) if axis is not None else do, axis)
    dW2 = jnp.einsum("gesh,gesc->ehc", h, do)
    dh = gelu_backward(jnp.einsum("gesc,ehc->gesh", do, W2), c_gelu)
    dW1 = jnp.einsum("gesc,gesh->ech", xe, dh)
    dxe = _exchange(jnp.einsum("gesh,ech->gesc", dh, W1), axis).reshape(G, E, cap, -1)
    dx = _scatter_add(dxe.reshape(G, E * cap, -1), r.source.reshape(G, E * cap), Ng).reshape(N, -1)
    dx = _sum(dx, model_axis)  # (model_axis: each device's hidden units' part; the dense MLP's f)
    gates, probs = r.gates, r.probs
    dlogits = gates * (dgates - (gates * dgates).sum(-1, keepdims=True))  # the gates' softmax
    dprobs = daux * E * load[None, :] / (N * n)  # (N, E): aux = E Σ_e f_e mean_n p_ne, over every device's tokens
    dlogits = dlogits + probs * (dprobs - (probs * dprobs).sum(-1, keepdims=True))  # the full softmax
    dW_router = xf.T @ dlogits
    dx = dx + dlogits @ W_router.T
    return dx.reshape(shape), dW_router, dW1, dW2, None, None, None, None, None


PAIRS = {
    "moe": Pair(moe_forward, moe_backward, ("x", "W_router", "W1", "W2", "top_k", "capacity", "groups", "axis",
                                            "model_axis"),
                fixed=("top_k", "capacity", "groups", "axis", "model_axis")),
}
