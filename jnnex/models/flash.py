"""Tiled causal attention, forward and backward by hand: FlashAttention-2's algorithm (Dao 2023) in plain JAX.

The plain pair (:func:`jnnex.models.gpt.attend_forward`) forms the whole ``(T, T)`` matrix of probabilities per head
and keeps it for the backward: memory grows with T². Here the queries are cut into tiles of ``tile`` rows and the
keys into tiles of ``tile`` columns; nothing of size ``T × T`` ever exists::

    for each query tile i:                                  (outer loop)
        m, l, acc = -inf, 0, 0                              running row max, row sum, unnormalised output
        for each key tile j <= i:                           (inner loop; later tiles are all masked: skipped)
            s   = q_i k_jᵀ / √hs, masked above the diagonal
            m'  = max(m, rowmax(s));  p = exp(s − m')
            l   = l · exp(m − m') + rowsum(p)
            acc = acc · exp(m − m') + p v_j
            m   = m'
        o_i = acc / l;  lse_i = m + log l                   the log-sum-exp is all the backward needs

The backward recomputes each tile's probabilities from the saved log-sum-exp, ``p = exp(s − lse)``, with
``D = rowsum(dO ⊙ O)`` standing for softmax's ``⟨att, datt⟩``::

    for each key tile j:                                    (outer loop: dk_j, dv_j accumulate in registers)
        for each query tile i >= j:
            p = exp(q_i k_jᵀ / √hs − lse_i), masked
            dv_j += pᵀ dO_i;   dp = dO_i v_jᵀ;   ds = p ⊙ (dp − D_i) / √hs
            dk_j += dsᵀ q_i;   dq_i += ds k_j             (dq: the one array written across the outer loop)

The memory is that of q, k, v, o and a few tiles: linear in T. The time is the plain pair's and a recomputation of
``q kᵀ`` in the backward; on a GPU the tiles stay in on-chip memory, which is the point of the algorithm. A length
that is not a multiple of ``tile`` is padded with zeros at the end: padded keys sit after every real query, so the
causal mask already hides them; padded queries are sliced off (and get zero upstream gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jnnex.layers import Pair, check_shape, matmul, matmul_nt, matmul_tn, wide

TILE = 64  # rows and columns of a tile; a setting of the models that use it


def check_tile(tile) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive integer (the rows of a query tile and columns of a key tile), "
                         f"got {tile!r}")


def _tiles(x, tile: int):
    """``(B, nh, T, ...) -> (B, nh, n_tiles · tile, ...)``, zero-padded at the end."""
    pad = -x.shape[2] % tile
    return jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3)) if pad else x


def _rows(x, i, tile: int):
    """Tile ``i`` (traced) of ``x (B, nh, Tp, ...)`` along the positions."""
    return jax.lax.dynamic_slice_in_dim(x, i * tile, tile, axis=2)


def _scores(qi, kj, i, j, tile: int, scale: float | None = None):
    """``q_i k_jᵀ / √hs`` (or ``· scale``) of tiles ``i`` and ``j``, ``-inf`` where the key comes after the query:
    ``(B, nh, tile, tile)``."""
    s = matmul_nt(qi, kj) * (qi.shape[-1] ** -0.5 if scale is None else scale)  # float32 for bfloat16
    rows = i * tile + jnp.arange(tile)
    cols = j * tile + jnp.arange(tile)
    return jnp.where(rows[:, None] >= cols[None, :], s, -jnp.inf)


def _varying_as(x, ref):
    """``x`` typed as varying over the mesh axes ``ref`` varies over: under ``jax.shard_map`` (tensor parallelism
    splits heads over devices) a loop's carry must keep one type, and the zeros it starts from vary over nothing
    until the first tile's values are added. Outside ``shard_map``, ``x`` itself."""
    vma = tuple(sorted(jax.typeof(ref).manual_axis_type.varying))
    return jax.lax.pcast(x, vma, to="varying") if vma else x


def flash_attend_forward(q, k, v, tile: int = TILE, scale: float | None = None):
    """Causal attention per head, tile by tile: ``q, k, v (B, nh, T, hs) -> y (B, T, nh·hs)``, equal to
    :func:`jnnex.models.gpt.attend_forward`'s (``scale``: its scores' factor, default ``1/√hs``). Caches ``(q, k, v,
    o, lse, tile, scale)``: the output and the log-sum-exp of each row, ``(B, nh, T)``, instead of the ``(B, nh, T,
    T)`` probabilities."""
    check_tile(tile)
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attend: q, k, v must all be (B, nh, T, hs), got {q.shape}, {k.shape}, {v.shape}")
    B, nh, T, hs = q.shape
    qp, kp, vp = _tiles(q, tile), _tiles(k, tile), _tiles(v, tile)
    n = qp.shape[2] // tile

    def query_tile(i):
        qi = _rows(qp, i, tile)

        def key_tile(j, carry):
            m, l, acc = carry
            s = _scores(qi, _rows(kp, j, tile), i, j, tile, scale)
            m_new = jnp.maximum(m, s.max(-1))  # finite: tile j <= i has a key at or before every query row
            p = jnp.exp(s - m_new[..., None])
            shrink = jnp.exp(m - m_new)  # 0 on the first tile (m = -inf)
            vj = _rows(vp, j, tile)
            return m_new, l * shrink + p.sum(-1), acc * shrink[..., None] + matmul(p.astype(vj.dtype), vj)

        acc_dtype = wide(q.dtype)  # the running max, sum and output: float32 for bfloat16
        init = (jnp.full((B, nh, tile), -jnp.inf, acc_dtype), jnp.zeros((B, nh, tile), acc_dtype),
                jnp.zeros((B, nh, tile, hs), acc_dtype))
        init = tuple(_varying_as(a, qi) for a in init)
        # Over all n key tiles, those after the diagonal skipped: a loop of fixed length, so that jax.grad can
        # differentiate this forward too (keeping every tile's intermediates: quadratic memory, unlike the backward
        # below).
        m, l, acc = jax.lax.fori_loop(0, n, lambda j, c: jax.lax.cond(j <= i, key_tile, lambda j, c: c, j, c), init)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    o, lse = jax.lax.map(query_tile, jnp.arange(n))  # (n, B, nh, tile, hs), (n, B, nh, tile)
    o = o.transpose(1, 2, 0, 3, 4).reshape(B, nh, n * tile, hs)[:, :, :T]
    lse = lse.transpose(1, 2, 0, 3).reshape(B, nh, n * tile)[:, :, :T]
    y = o.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)
    return y, (q, k, v, o, lse, tile, scale)


def flash_attend_backward(dy, cache):
    """FlashAttention-2's backward: ``(dq, dk, dv, None)``, each of the three ``(B, nh, T, hs)``; the tile size gets
    ``None``. Never forms more than a ``(tile, tile)`` block of probabilities per head."""
    q, k, v, o, lse, tile, scale = cache
    B, nh, T, hs = q.shape
    check_shape("attend_backward: dy", dy, (B, T, nh * hs))
    do = dy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
    acc = wide(q.dtype)  # what accumulates: float32 for bfloat16
    D = (do.astype(acc) * o.astype(acc)).sum(-1)  # (B, nh, T): softmax's <att, datt> per row, from the output
    qp, kp, vp, dop = _tiles(q, tile), _tiles(k, tile), _tiles(v, tile), _tiles(do, tile)
    lsep, Dp = _tiles(lse, tile), _tiles(D, tile)  # padded rows: lse 0, dO 0, D 0 -> they contribute nothing
    n = qp.shape[2] // tile
    scale = hs ** -0.5 if scale is None else scale

    def key_tile(dq, j):
        kj, vj = _rows(kp, j, tile), _rows(vp, j, tile)

        def query_tile(i, carry):
            dq, dk, dv = carry
            qi, doi = _rows(qp, i, tile), _rows(dop, i, tile)
            p = jnp.exp(_scores(qi, kj, i, j, tile, scale) - _rows(lsep, i, tile)[..., None])  # (B, nh, tile, tile)
            dv = dv + matmul_tn(p.astype(doi.dtype), doi)
            ds = p * (matmul_nt(doi, vj) - _rows(Dp, i, tile)[..., None]) * scale
            ds = ds.astype(q.dtype)
            dk = dk + matmul_tn(ds, qi)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _rows(dq, i, tile) + matmul(ds, kj), i * tile, axis=2)
            return dq, dk, dv

        zeros = _varying_as(jnp.zeros((B, nh, tile, hs), acc), kj)
        dq, dk, dv = jax.lax.fori_loop(j, n, query_tile, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_tile, _varying_as(jnp.zeros(qp.shape, acc), qp), jnp.arange(n))

    def untile(x):  # (n, B, nh, tile, hs) -> (B, nh, T, hs)
        return x.transpose(1, 2, 0, 3, 4).reshape(B, nh, n * tile, hs)[:, :, :T].astype(q.dtype)

    return dq[:, :, :T].astype(q.dtype), untile(dk), untile(dv), None


PAIRS = {"flash_attend": Pair(flash_attend_forward, flash_attend_backward, ("q", "k", "v", "tile"), fixed=("tile",))}


