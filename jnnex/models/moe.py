"""A mixture-of-experts MLP (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral's top-k gates), its backward by
hand beside its forward.

Each token's router logits ``r = x W_router`` (one per expert) choose its ``top_k`` experts; the gates are the
softmax of the chosen logits (Mixtral's: the other experts get exactly 0), and the output is the gated sum of the
chosen experts' MLPs (``gelu(x W1[e]) W2[e]``). **Dropless**: no capacity, every token reaches every expert it
chose (nothing dropped, nothing to count); the experts run densely here over all tokens, the unchosen ones
multiplied by a gate of 0 — the arithmetic of the layer, not yet the token exchange of expert parallelism.

The **load-balancing loss** (Switch's, for top-k as GShard and Mixtral count it): ``aux = E · Σ_e f_e · P_e``, with
``f_e`` the fraction of the ``N · top_k`` choices that went to expert ``e`` (a count: no gradient) and ``P_e`` the
mean over tokens of the full softmax of the router logits; 1 when the load is uniform, up to ``E`` when one expert
takes everything. Its gradient reaches the router through ``P``.

Ties among the router logits go to the lower expert index (``jax.lax.top_k``); the choice is piecewise constant, so
its gradient is 0, as ``jax.grad`` takes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jnnex.layers import Pair, check_shape
from jnnex.models.gpt import gelu_backward, gelu_forward


def check_moe(x, W_router, W1, W2, top_k) -> None:
    C = x.shape[-1]
    if W_router.ndim != 2 or W_router.shape[0] != C:
        raise ValueError(f"moe: W_router must be (C, E) = ({C}, E) for x {x.shape}, got {W_router.shape}")
    E = W_router.shape[1]
    if W1.ndim != 3 or W1.shape[:2] != (E, C) or W2.ndim != 3 or W2.shape != (E, W1.shape[2], C):
        raise ValueError(f"moe: with {E} experts and C = {C}, W1 must be (E, C, H) and W2 (E, H, C), got "
                         f"{W1.shape} and {W2.shape}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"moe: top_k must be an integer in [1, {E}] (the number of experts), got {top_k!r}")


def moe_forward(x, W_router, W1, W2, top_k: int):
    """``x (..., C)`` to ``(y (..., C), aux ())``: each token through its ``top_k`` experts, gated, and the
    load-balancing loss. Caches what :func:`moe_backward` needs."""
    check_moe(x, W_router, W1, W2, top_k)
    shape, E = x.shape, W_router.shape[1]
    xf = x.reshape(-1, shape[-1])  # (N, C)
    logits = xf @ W_router  # (N, E)
    _, top = jax.lax.top_k(logits, top_k)  # (N, k): ties to the lower index
    chosen = jax.nn.one_hot(top, E, dtype=xf.dtype).sum(1)  # (N, E): 1 where chosen
    gates = jax.nn.softmax(jnp.where(chosen > 0, logits, -jnp.inf), axis=-1)  # (N, E), 0 off the chosen experts
    probs = jax.nn.softmax(logits, axis=-1)  # (N, E): the full softmax, for the balancing loss
    load = chosen.mean(0) / top_k  # (E,) f_e: the fraction of the choices each expert got (sums to 1)
    aux = E * (load * probs.mean(0)).sum()
    h, c_gelu = gelu_forward(jnp.einsum("nc,ech->neh", xf, W1))  # (N, E, H)
    o = jnp.einsum("neh,ehc->nec", h, W2)  # (N, E, C): every expert's output
    y = jnp.einsum("ne,nec->nc", gates, o)  # (N, C)
    return (y.reshape(shape), aux), (xf, shape, gates, probs, load, h, c_gelu, o, W_router, W1, W2)


def moe_backward(dout, cache):
    """``(dy, daux)`` to ``(dx, dW_router, dW1, dW2, None)``. Each expert's MLP backward, weighted by its gate; the
    gates' softmax over the chosen experts (``dr = g ⊙ (dg − Σ g dg)``, 0 off them); the balancing loss through the
    full softmax (``dP_e = daux · E f_e / N``); the router's linear."""
    dy, daux = dout
    xf, shape, gates, probs, load, h, c_gelu, o, W_router, W1, W2 = cache
    check_shape("moe_backward: dy", dy, shape)
    check_shape("moe_backward: daux", daux, ())
    N, E = gates.shape
    dyf = dy.reshape(N, -1)  # (N, C)
    dgates = jnp.einsum("nc,nec->ne", dyf, o)  # (N, E)
    do = gates[:, :, None] * dyf[:, None, :]  # (N, E, C)
    dW2 = jnp.einsum("neh,nec->ehc", h, do)
    dh = gelu_backward(jnp.einsum("nec,ehc->neh", do, W2), c_gelu)  # (N, E, H)
    dW1 = jnp.einsum("nc,neh->ech", xf, dh)
    dx = jnp.einsum("neh,ech->nc", dh, W1)
    dlogits = gates * (dgates - (gates * dgates).sum(-1, keepdims=True))  # the gates' softmax
    dprobs = daux * E * load[None, :] / N  # (N, E): aux = E Σ_e f_e mean_n p_ne
    dlogits = dlogits + probs * (dprobs - (probs * dprobs).sum(-1, keepdims=True))  # the full softmax
    dW_router = xf.T @ dlogits
    dx = dx + dlogits @ W_router.T
    return dx.reshape(shape), dW_router, dW1, dW2, None


PAIRS = {
    "moe": Pair(moe_forward, moe_backward, ("x", "W_router", "W1", "W2", "top_k"), fixed=("top_k",)),
}
