"""Tensor parallelism, Megatron-LM's way, with the collectives of the backward written by hand.

A layer too large for one device is split across the devices of a mesh axis ``"model"``: each device holds a slice of
its weights and computes a slice of its work. Inside ``jax.shard_map`` every function below sees *one device's*
slice; the communication is written out, in the forward and in the hand-written backward, one under the other as
every pair in jnnex. Two conjugate operators carry it (Shoeybi et al. 2019, "Megatron-LM", section 3):

* ``f`` — identity forward, all-reduce (``psum``) backward: before a column-parallel layer. The input ``x`` is
  replicated; each device's slice of the layer uses all of it, so ``dL/dx`` is the *sum* of every device's part.
* ``g`` — all-reduce forward, identity backward: after a row-parallel layer. Each device's product ``x_d W_d`` is a
  partial sum of ``x W``; the output is their sum, replicated, and its gradient reaches every device whole.

With them:

* the **column-parallel linear** ``y_d = f(x) W[:, cols_d] + b[cols_d]`` (the output split by columns, nothing to
  communicate in the forward; the backward all-reduces ``dx``);
* the **row-parallel linear** ``y = g(x_d W[rows_d, :]) + b`` (the input split by the same channels, the output
  all-reduced; the backward sends nothing);
* the **MLP** column- then row-parallel (``fc`` by columns, GELU on each device's own columns, ``fcproj`` by rows)
  and **attention** split by heads (``qkv`` by the columns of each device's heads, attention local to the device,
  the projection by rows): one all-reduce forward and one backward each — Megatron's 2 + 2 per block;
* the **Llama's grouped-query attention** the same way, each device its query heads and the key/value heads their
  groups share.

Weights are stored whole (the global view, as every jnnex model's); ``shard_map`` hands each device its slice
(``in_specs`` ``P(None, MODEL)`` for a column split, ``P(MODEL, None)`` for a row split), after
:func:`qkv_for_devices` has put each device's heads' query, key and value columns side by side; :func:`model_mesh`
is the mesh. The pairs are proven against ``jax.vjp`` of the unsplit layers
in float64 (``tests/test_tensor_parallel.py``), where the all-reduces of the compiled block are also counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from jnnex.layers import linear_backward, linear_forward, per_channel
from jnnex.models import llama
from jnnex.models.gpt import gelu_backward, gelu_forward, qkv_attention_backward, qkv_attention_forward

MODEL = "model"  # the mesh axis a layer is split along


def model_mesh(devices: int | Sequence | None = None) -> jax.sharding.Mesh:
    """A one-axis mesh ``("model",)`` over the first ``devices`` of ``jax.devices()`` (or the given devices; all for
    ``None``), for ``jax.shard_map``; its axis type is ``Auto``, so a jitted ``shard_map`` splits whole arrays by its
    ``in_specs`` itself."""
    if devices is None:
        devices = jax.devices()
    elif isinstance(devices, int):
        if not 1 <= devices <= len(jax.devices()):
            raise ValueError(f"devices: the model axis needs 1 to {len(jax.devices())} devices (those JAX sees), got "
                             f"{devices}")
        devices = jax.devices()[:devices]
    return jax.sharding.Mesh(np.array(devices), (MODEL,), axis_types=(AxisType.Auto,))


def check_divides(name: str, size: int, n: int) -> None:
    """A clear error when a layer's ``size`` (heads, a hidden width) cannot be split evenly over ``n`` devices."""
    if size % n:
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        raise ValueError(f"tensor parallel: {name} ({size}) must be divisible by the model axis ({n} devices); "
                         f"it splits over {divisors}")


# ----------------------------------------------------------------------------------------------------------------------
# The conjugate pair


def f_forward(x):
    """Identity: each device goes on with the whole replicated ``x``."""
    return x, None


def f_backward(dx, cache, axis: str = MODEL):
    """The sum over the devices of their parts of ``dL/dx``: ``x`` fed every device's slice of the next layer."""
    return jax.lax.psum(dx, axis)


def g_forward(x, axis: str = MODEL):
    """The sum over the devices of their partial results: the whole output, on every device."""
    return jax.lax.psum(x, axis), None


def g_backward(dy, cache):
    """Identity: the output was replicated, so each device's part of the sum gets the whole ``dy``."""
    return dy


# ----------------------------------------------------------------------------------------------------------------------
# The split linears


def column_linear_forward(x, W, b=None, axis: str = MODEL):
    """``x (..., C)`` replicated, ``W (C, Cout/n)`` and ``b (Cout/n,)`` this device's columns: ``y (..., Cout/n)``,
    this device's columns of ``x W + b``."""
    x, c_f = f_forward(x)
    y, c_lin = linear_forward(x, W, b)
    return y, (c_f, c_lin, axis)


def column_linear_backward(dy, cache):
    """``dy`` this device's columns: ``dW``, ``db`` of its own slice; ``dx`` all-reduced (``f``'s backward)."""
    c_f, c_lin, axis = cache
    dx, dW, db = linear_backward(dy, c_lin)
    return f_backward(dx, c_f, axis), dW, db


def row_linear_forward(x, W, b=None, axis: str = MODEL):
    """``x (..., Cin/n)`` this device's channels, ``W (Cin/n, C)`` the matching rows, ``b (C,)`` replicated:
    ``y = Σ_devices x_d W_d + b``, whole and replicated (``g``); the bias added once, after the sum."""
    partial, c_lin = linear_forward(x, W)
    y, c_g = g_forward(partial, axis)
    if b is not None:
        y = y + per_channel(b.astype(y.dtype), y.ndim)
    return y, (c_lin, c_g, b is not None)


def row_linear_backward(dy, cache):
    """``dy`` replicated: ``dx``, ``dW`` this device's slice, ``db`` whole (the same on every device); no
    communication."""
    c_lin, c_g, has_bias = cache
    dx, dW, _ = linear_backward(g_backward(dy, c_g), c_lin)
    db = dy.reshape(-1, dy.shape[-1]).astype(dW.dtype).sum(0) if has_bias else None
    return dx, dW, db


# ----------------------------------------------------------------------------------------------------------------------
# Megatron's MLP and attention


def mlp_forward(x, W_fc, b_fc, W_proj, b_proj, axis: str = MODEL):
    """The GPT's MLP split: ``fc`` by columns, GELU on each device's own hidden units, ``fcproj`` by the same rows.
    One all-reduce, after ``fcproj``."""
    h, c_fc = column_linear_forward(x, W_fc, b_fc, axis)
    a, c_gelu = gelu_forward(h)
    y, c_proj = row_linear_forward(a, W_proj, b_proj, axis)
    return y, (c_fc, c_gelu, c_proj)


def mlp_backward(dy, cache):
    """In reverse: ``(dx, dW_fc, db_fc, dW_proj, db_proj)``; one all-reduce, of ``dx``."""
    c_fc, c_gelu, c_proj = cache
    da, dW_proj, db_proj = row_linear_backward(dy, c_proj)
    dh = gelu_backward(da, c_gelu)
    dx, dW_fc, db_fc = column_linear_backward(dh, c_fc)
    return dx, dW_fc, db_fc, dW_proj, db_proj


def attention_forward(x, W_qkv, b_qkv, W_proj, b_proj, n_head: int, axis: str = MODEL):
    """The GPT's attention split by heads: ``W_qkv`` holds this device's ``n_head / n`` heads' query, key and value
    columns (:func:`qkv_for_devices`), so attention runs on the device's own heads; the projection by the matching rows.
    ``n_head`` is the layer's whole count. One all-reduce, after the projection."""
    check_divides("n_head", n_head, jax.lax.axis_size(axis))
    n_local = n_head // jax.lax.axis_size(axis)
    qkv, c_qkv = column_linear_forward(x, W_qkv, b_qkv, axis)
    y, c_att = qkv_attention_forward(qkv, n_local)
    out, c_proj = row_linear_forward(y, W_proj, b_proj, axis)
    return out, (c_qkv, c_att, c_proj)


def attention_backward(dout, cache):
    """In reverse: ``(dx, dW_qkv, db_qkv, dW_proj, db_proj, None)``; one all-reduce, of ``dx``."""
    c_qkv, c_att, c_proj = cache
    dy, dW_proj, db_proj = row_linear_backward(dout, c_proj)
    dqkv, _ = qkv_attention_backward(dy, c_att)
    dx, dW_qkv, db_qkv = column_linear_backward(dqkv, c_qkv)
    return dx, dW_qkv, db_qkv, dW_proj, db_proj, None


def llama_attention_forward(x, W_qkv, W_proj, n_head: int, n_kv_head: int, tile: int | None = None, pos0=0,
                            base: float = llama.ROPE_BASE, axis: str = MODEL):
    """The Llama's grouped-query attention split by heads: each device its ``n_head / n`` query heads and the
    ``n_kv_head / n`` key/value heads their groups share (:func:`qkv_for_devices` with ``n_kv_head``), the Llama's own
    attention pair (rotary positions, plain or tiled) on them, the projection's partial sums all-reduced (``g``).
    No biases, so the layer is ``f``, :func:`jnnex.models.llama.attention_forward` on the device's heads, ``g``."""
    n = jax.lax.axis_size(axis)
    check_divides("n_head", n_head, n)
    check_divides("n_kv_head", n_kv_head, n)
    x, c_f = f_forward(x)
    partial, c_att = llama.attention_forward(x, W_qkv, W_proj, n_head // n, n_kv_head // n, tile, pos0, base)
    out, c_g = g_forward(partial, axis)
    return out, (c_f, c_att, c_g, axis)


def llama_attention_backward(dout, cache):
    """In reverse: ``(dx, dW_qkv, dW_proj, None, None, None)``; one all-reduce, of ``dx`` (``f``'s backward)."""
    c_f, c_att, c_g, axis = cache
    dx, dW_qkv, dW_proj, *_ = llama.attention_backward(g_backward(dout, c_g), c_att)
    return f_backward(dx, c_f, axis), dW_qkv, dW_proj, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Whole weights, laid out for the split


def qkv_for_devices(W, n_head: int, n: int, n_kv_head: int | None = None):
    """The fused ``W_qkv (..., width)`` — ``[q | k | v]``, ``n_head`` query heads and ``n_kv_head`` key/value heads
    (``None``: as many as query heads, the GPT's) of ``hs`` columns each, in order — with its columns reordered so
    that ``n`` equal contiguous blocks (what ``P(..., MODEL)`` hands the devices) are each ``[q | k | v]`` of
    ``n_head / n`` consecutive query heads and the ``n_kv_head / n`` key/value heads their groups share — what
    :func:`attention_forward` and :func:`llama_attention_forward` expect on a device. Works for a bias too;
    :func:`qkv_from_devices` undoes it. A plain column split (``fc``) needs no reordering.

    >>> qkv_for_devices(jnp.arange(12, dtype=jnp.int32), n_head=4, n=2)  # q0 q1 q2 q3 | k0 .. | v0 .., hs = 1
    Array([ 0,  1,  4,  5,  8,  9,  2,  3,  6,  7, 10, 11], dtype=int32)
    """
    nkv = n_head if n_kv_head is None else n_kv_head
    check_divides("n_head", n_head, n)
    check_divides("n_kv_head", nkv, n)
    *lead, width = W.shape
    hs = width // (n_head + 2 * nkv)
    q, k, v = jnp.split(W, [n_head * hs, (n_head + nkv) * hs], axis=-1)
    per_device = [part.reshape(*lead, n, part.shape[-1] // n) for part in (q, k, v)]  # (..., device, its columns)
    return jnp.concatenate(per_device, axis=-1).reshape(*lead, width)


def qkv_from_devices(W, n_head: int, n: int, n_kv_head: int | None = None):
    """The inverse of :func:`qkv_for_devices`: the columns back in ``[q | k | v]`` order."""
    nkv = n_head if n_kv_head is None else n_kv_head
    *lead, width = W.shape
    hs = width // (n_head + 2 * nkv)
    blocks = W.reshape(*lead, n, width // n)
    q, k, v = jnp.split(blocks, [n_head // n * hs, (n_head + nkv) // n * hs], axis=-1)
    return jnp.concatenate([part.reshape(*lead, part.shape[-1] * n) for part in (q, k, v)], axis=-1)
