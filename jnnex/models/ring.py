"""Ring attention (Liu, Zaharia and Abbeel 2023): causal attention over a sequence split across the devices of a mesh
axis, its backward by hand beside its forward.

Each device holds one chunk of the queries, keys and values. The key/value chunks travel round the ring
(``jax.lax.ppermute`` to the next device, ``n − 1`` times). Each device folds every chunk it receives into its
queries' output with the tiled attention's online softmax: a running maximum ``m``, a running sum ``l`` and a
running output, rescaled as the maximum grows.

The chunks are **striped** (Brandon et al. 2023), not contiguous: device ``d`` holds positions ``d, d + n, d + 2n,
…``. With contiguous chunks the causal mask leaves the first device almost idle and the last one with all the work.
Striped, every device sees about half of every chunk it receives, so the load is balanced.
:func:`stripe` and :func:`unstripe` reorder a sequence to this layout and back.

The backward runs the ring once more. Each device recomputes its block of probabilities from the forward's
log-sum-exp, adds to its own ``dq``, and adds to the ``dk``/``dv`` accumulators of the chunk it holds. The
**accumulators travel with their chunk**: after ``n`` passes every chunk, with its finished gradient, is home again.
Nothing ``T × T`` is ever held: each device keeps ``(Tc × Tc)`` blocks at a time, ``Tc = T / n`` — or, with a key
``tile``, ``(Tc × tile)``: memory linear in ``T / n``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jnnex.layers import check_shape, matmul, matmul_nt, matmul_tn


def stripe(x, n: int, axis: int = 2):
    """``x`` with its sequence ``axis`` reordered for ``n`` devices: device ``d``'s contiguous chunk holds positions
    ``d, d + n, …`` (split the result evenly along ``axis``)."""
    T = x.shape[axis]
    if T % n:
        raise ValueError(f"ring attention: the sequence ({T} positions) must divide by the ring's {n} devices")
    return jnp.take(x, jnp.arange(T).reshape(T // n, n).T.reshape(-1), axis=axis)


def unstripe(x, n: int, axis: int = 2):
    """The inverse of :func:`stripe`."""
    T = x.shape[axis]
    return jnp.take(x, jnp.arange(T).reshape(n, T // n).T.reshape(-1), axis=axis)


def _ring(n: int):
    return [(j, (j + 1) % n) for j in range(n)]  # each device sends to the next


def _mask(axis: str, src, Tc: int, j, tile: int):
    """``(Tc, tile)``: this device's query positions against the positions of key tile ``j`` of device ``src``'s
    chunk, causal."""
    n, d = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    tq = n * jnp.arange(Tc, dtype=jnp.int32)
    tk = n * (j * tile + jnp.arange(tile, dtype=jnp.int32))
    return (src + tk)[None, :] <= (d + tq)[:, None]


def _tiles(a, tile: int):
    """``(B, nh, Tc, hs)`` as ``(Tc / tile, B, nh, tile, hs)``: the key tiles a step scans over."""
    B, nh, Tc, hs = a.shape
    return jnp.moveaxis(a.reshape(B, nh, Tc // tile, tile, hs), 2, 0)


def _untile(a):
    """The inverse of :func:`_tiles`."""
    nt, B, nh, tile, hs = a.shape
    return jnp.moveaxis(a, 0, 2).reshape(B, nh, nt * tile, hs)


def check_tile(Tc: int, tile: int | None) -> int:
    tile = Tc if tile is None else tile
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1 or Tc % tile:
        raise ValueError(f"ring attention: the key tile ({tile!r}) must be an integer >= 1 that divides a device's "
                         f"chunk of {Tc} positions")
    return tile


def ring_attention_forward(q, k, v, axis: str, tile: int | None = None):
    """Under ``jax.shard_map`` over ``axis``: ``q, k, v (B, nh, Tc, hs)``, this device's striped chunk, to ``y (B, nh,
    Tc, hs)``, its queries' attention over every position before them on every device. Caches the inputs, ``y`` and
    each row's log-sum-exp.

    ``tile``: each received chunk is folded in key tiles of ``tile`` positions (a ``lax.scan``), so a device holds
    ``Tc × tile`` scores at a time — memory linear in ``Tc = T / n``; ``None``: the whole chunk, ``Tc × Tc``."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"ring attention: q, k, v must all be (B, nh, Tc, hs), got {q.shape}, {k.shape}, {v.shape}")
    n, d = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    Tc, scale = q.shape[2], q.shape[3] ** -0.5
    tile = check_tile(Tc, tile)
    l = jnp.zeros_like(q[..., :1])  # running sum of exponentials (like q: varying over the ring's devices)
    m = l - jnp.inf  # running maximum
    o = jnp.zeros_like(q)  # running output, unnormalised
    kk, vv = k, v
    for s in range(n):  # step s: the chunk of device d − s (its own first: every row has its diagonal in tile 0)
        src = (d - s) % n

        def fold(carry, kv_j, src=src):
            m, l, o = carry
            kj, vj, j = kv_j
            scores = jnp.where(_mask(axis, src, Tc, j, tile), matmul_nt(q, kj) * scale, -jnp.inf)
            m_new = jnp.maximum(m, scores.max(-1, keepdims=True))
            p = jnp.exp(scores - m_new)  # masked positions: exactly 0
            correction = jnp.exp(m - m_new)  # what the old maximum's terms shrink by
            return (m_new, l * correction + p.sum(-1, keepdims=True), o * correction + matmul(p, vj)), None

        (m, l, o), _ = jax.lax.scan(fold, (m, l, o), (_tiles(kk, tile), _tiles(vv, tile),
                                                       jnp.arange(Tc // tile, dtype=jnp.int32)))
        if s < n - 1:
            kk, vv = jax.lax.ppermute((kk, vv), axis, _ring(n))
    y = o / l
    return y, (q, k, v, y, m + jnp.log(l), axis, tile)


def ring_attention_backward(dy, cache):
    """``dy (B, nh, Tc, hs)`` to ``(dq, dk, dv)`` for this device's chunk. The ring runs again: each tile's
    probabilities ``p = exp(s − lse)``, then ``dv += pᵀ dy``, ``ds = p ⊙ (dy vᵀ − D) / √hs`` with ``D = Σ dy ⊙ y``,
    ``dq += ds k``, ``dk += dsᵀ q``. The ``dk`` and ``dv`` of a chunk travel with it and come home after ``n``
    passes."""
    q, k, v, y, lse, axis, tile = cache
    check_shape("ring_attention_backward: dy", dy, q.shape)
    n, d = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    Tc, scale = q.shape[2], q.shape[3] ** -0.5
    D = (dy * y).sum(-1, keepdims=True)  # (B, nh, Tc, 1)
    dq = jnp.zeros_like(q)
    kk, vv, dk, dv = k, v, jnp.zeros_like(k), jnp.zeros_like(v)
    for s in range(n):
        src = (d - s) % n

        def back(dq, kv_j, src=src):
            kj, vj, j = kv_j
            scores = jnp.where(_mask(axis, src, Tc, j, tile), matmul_nt(q, kj) * scale, -jnp.inf)
            p = jnp.exp(scores - lse)  # this tile of the final probabilities
            ds = p * (matmul_nt(dy, vj) - D) * scale
            return dq + matmul(ds, kj), (matmul_tn(ds, q), matmul_tn(p, dy))

        dq, (dk_t, dv_t) = jax.lax.scan(back, dq, (_tiles(kk, tile), _tiles(vv, tile),
                                                   jnp.arange(Tc // tile, dtype=jnp.int32)))
        dk, dv = dk + _untile(dk_t), dv + _untile(dv_t)
        kk, vv, dk, dv = jax.lax.ppermute((kk, vv, dk, dv), axis, _ring(n))  # the n-th pass brings them home
    return dq, dk, dv
