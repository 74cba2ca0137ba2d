"""Megatron-LM's tensor-parallel kernels, beside the linear they split: with no axis they *are* the linear.

A layer too large for one device is split across the devices of a mesh axis (``"model"``): each device holds a slice
of its weights and computes a slice of its work. Inside ``jax.shard_map`` every kernel below sees *one device's*
slice, and the communication is written out, in the forward and in the hand-written backward, one under the other as
every pair in jnnex. Two conjugate operators carry it (Shoeybi et al. 2019, "Megatron-LM", section 3):

* ``f`` — identity forward, all-reduce (``psum``) backward: before a column-parallel layer. The input ``x`` is
  replicated; each device's slice of the layer uses all of it, so ``dL/dx`` is the *sum* of every device's part.
* ``g`` — all-reduce forward, identity backward: after a row-parallel layer. Each device's product ``x_d W_d`` is a
  partial sum of ``x W``; the output is their sum, replicated, and its gradient reaches every device whole.

With them:

* the **column-parallel linear** ``y_d = f(x) W[:, cols_d] + b[cols_d]`` (the output split by columns, nothing to
  communicate in the forward; the backward all-reduces ``dx``);
* the **row-parallel linear** ``y = g(x_d W[rows_d, :]) + b`` (the input split by the same channels, the output
  all-reduced, the bias added once after the sum; the backward sends nothing).

A model calls them where it calls a linear, with the axis its config carries (``cfg.model_axis``, as BatchNorm's
kernels take ``cfg.batch_axis``): ``axis=None`` — one device, every model's default — is the plain linear, the same
arithmetic to the bit. Which weight splits how is data the model declares beside its parameters (:class:`Column`,
:data:`ROW`, :class:`Part`), which :mod:`jnnex.tensor_parallel` turns into the devices' layout.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from jnnex.layers import check_shape, linear_backward, linear_forward, matmul, matmul_nt, matmul_tn, per_channel

MODEL = "model"  # the mesh axis a layer is split along


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class On:
    """The mesh axis a kernel communicated along, kept in its cache for its backward: static (no array leaf), so a
    cache holding it crosses ``jit`` and ``eval_shape`` like any other."""

    axis: str | None


def axis_size(axis: str | None) -> int:
    """Devices along ``axis`` (inside ``shard_map``); 1 for ``None``."""
    return 1 if axis is None else jax.lax.axis_size(axis)


def check_divides(name: str, size: int, n: int) -> None:
    """A clear error when a layer's ``size`` (heads, a hidden width) cannot be split evenly over ``n`` devices."""
    if size % n:
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        raise ValueError(f"tensor parallel: {name} ({size}) must be divisible by the model axis ({n} devices); "
                         f"it splits over {divisors}")


def local_count(name: str, count: int, axis: str | None) -> int:
    """This device's share of ``count`` units (heads, hidden units) split along ``axis``: ``count / n``."""
    n = axis_size(axis)
    check_divides(name, count, n)
    return count // n


# ----------------------------------------------------------------------------------------------------------------------
# The conjugate pair


def f_forward(x):
    """Identity: each device goes on with the whole replicated ``x``."""
    return x, None


def f_backward(dx, cache, axis: str | None = MODEL):
    """The sum over the devices of their parts of ``dL/dx``: ``x`` fed every device's slice of the next layer."""
    return dx if axis is None else jax.lax.psum(dx, axis)


def g_forward(x, axis: str | None = MODEL):
    """The sum over the devices of their partial results: the whole output, on every device."""
    return (x if axis is None else jax.lax.psum(x, axis)), None


def g_backward(dy, cache):
    """Identity: the output was replicated, so each device's part of the sum gets the whole ``dy``."""
    return dy


# ----------------------------------------------------------------------------------------------------------------------
# The split linears


def column_linear_forward(x, W, b=None, axis: str | None = None):
    """``x (..., C)`` replicated, ``W (C, Cout/n)`` and ``b (Cout/n,)`` this device's columns: ``y (..., Cout/n)``,
    this device's columns of ``x W + b``. ``axis=None``: :func:`jnnex.layers.linear_forward`."""
    x, c_f = f_forward(x)
    y, c_lin = linear_forward(x, W, b)
    return y, (c_f, c_lin, On(axis))


def column_linear_backward(dy, cache):
    """``dy`` this device's columns: ``dW``, ``db`` of its own slice; ``dx`` all-reduced (``f``'s backward), summed
    wide (float32 for bfloat16) and rounded once, as one device's product is."""
    c_f, c_lin, on = cache
    axis = on.axis
    if axis is None:
        return linear_backward(dy, c_lin)
    x, W, has_bias = c_lin
    check_shape("column_linear_backward: dy", dy, x.shape[:-1] + (W.shape[1],))
    dx = f_backward(matmul_nt(dy, W), c_f, axis).astype(dy.dtype)  # (..., C), every device's part summed
    dW = matmul_tn(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))  # (C, Cout/n)
    db = dy.reshape(-1, dy.shape[-1]).astype(dW.dtype).sum(0) if has_bias else None
    return dx, dW, db


def row_linear_forward(x, W, b=None, axis: str | None = None):
    """``x (..., Cin/n)`` this device's channels, ``W (Cin/n, C)`` the matching rows, ``b (C,)`` replicated:
    ``y = Σ_devices x_d W_d + b``, whole and replicated (``g``); the partial sums summed wide, the bias added once,
    after the sum. ``axis=None``: :func:`jnnex.layers.linear_forward`, to the bit."""
    if x.shape[-1] != W.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} input channels but W expects {W.shape[0]} (W is {W.shape})")
    y, c_g = g_forward(matmul(x, W), axis)  # (..., C), wide for bfloat16
    if b is not None:
        y = y + per_channel(b.astype(y.dtype), y.ndim)
    return y.astype(x.dtype), (x, W, b is not None)


def row_linear_backward(dy, cache):
    """``dy`` replicated: ``dx``, ``dW`` this device's slice, ``db`` whole (the same on every device); no
    communication (``g``'s backward is the identity): the linear's own backward."""
    return linear_backward(g_backward(dy, None), cache)


# ----------------------------------------------------------------------------------------------------------------------
# A model's split, declared as data: which of a block's linears split how


class Part(NamedTuple):
    """One part of a column-split layer's fused output: ``count`` units (heads, hidden units) of ``width`` columns
    each, side by side; each device takes ``count / n`` consecutive units of every part. ``name`` is what a user
    calls ``count`` (``"n_head"``), for the error when it does not divide."""

    name: str
    count: int
    width: int = 1


class Column(NamedTuple):
    """Split by output columns (Megatron's column-parallel linear; its bias with it). ``parts``: the fused output's
    parts in order — the GPT's ``qkv`` is three (queries, keys, values), a SwiGLU's ``fc`` two (gate, value), a
    plain ``fc`` one; a device's columns are its units of each part, side by side."""

    parts: tuple[Part, ...]


class Row(NamedTuple):
    """Split by input rows (Megatron's row-parallel linear; its bias replicated, added once after the sum)."""


ROW = Row()


class ExpertsSplit(NamedTuple):
    """A mixture of experts split inside each expert (Megatron's expert tensor parallelism): every expert's hidden
    units over the model axis — its first layer ``column`` ``(E, C, H)`` by its last axis, its second ``row``
    ``(E, H, C)`` by its middle one — the router replicated (:func:`jnnex.models.moe.moe_forward`'s ``model_axis``).
    ``hidden``: the units split, for the error when they do not divide."""

    hidden: Part
    column: str = "W1"
    row: str = "W2"
