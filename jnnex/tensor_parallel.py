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
:func:`qkv_for_devices` has put each device's heads' query, key and value columns side by side (and
:func:`swiglu_for_devices` each device's SwiGLU gate and value columns); :func:`model_mesh` is a one-axis mesh.

**Whole models on a data × model mesh** (:func:`mesh_2d`): :func:`gpt_forward` / :func:`gpt_backward` and
:func:`llama_forward` / :func:`llama_backward` are one device's model — embeddings, norms, residual stream and head
replicated, every block split — and :func:`split_value_and_grad` runs them under ``shard_map`` with the batch's rows
along ``"data"`` (the gradients summed there by ``psum``); :func:`split_step` adds the optimiser in the global view.
``jnnex.train.fit(..., devices=N, model_parallel=M)`` (``jnnex train --devices N --model-parallel M``) trains with
it (:func:`split_of`, :func:`train_layout`). Every pair and both models' steps are proven against the unsplit
layers and models in float64 (``tests/test_tensor_parallel.py``), where the all-reduces are also counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jnnex.layers import (
    Linear, cross_entropy_backward, cross_entropy_forward, embedding_backward, embedding_forward, linear_backward,
    linear_forward, per_channel,
)
from jnnex.models import gpt as gpt_model, llama
from jnnex.models.gpt import gelu_backward, gelu_forward, qkv_attention_backward, qkv_attention_forward
from jnnex.parallel import DATA

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


# ----------------------------------------------------------------------------------------------------------------------
# The whole GPT on a data × model mesh: its hand-written step, Megatron's layout


def mesh_2d(data: int, model: int, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A ``("data", "model")`` mesh of ``data × model`` devices (the first of ``jax.devices()``, or those given):
    the batch split along ``"data"``, each layer along ``"model"`` (a device's neighbours on the model axis are
    adjacent in the device list: on a GPU node, the tensor-parallel all-reduces stay on its fastest links)."""
    for name, size in (("data", data), ("model", model)):
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"mesh: the {name} axis must be an integer >= 1, got {size!r}")
    available = list(jax.devices()) if devices is None else list(devices)
    if data * model > len(available):
        raise ValueError(f"mesh: data {data} × model {model} = {data * model} devices, but only {len(available)} "
                         f"exist (on CPU, start with JAX_NUM_CPU_DEVICES={data * model} for more)")
    grid = np.array(available[:data * model]).reshape(data, model)
    return jax.sharding.Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def gpt_specs(params: gpt_model.GPTParams) -> gpt_model.GPTParams:
    """Where each GPT tensor lives on the model axis (``PartitionSpec``s, the tree of ``params``): ``qkv`` and ``fc``
    split by columns (their biases with them), ``attproj`` and ``fcproj`` by rows (their biases replicated: added
    once, after the all-reduce); the embeddings, every LayerNorm and the head replicated."""
    col, row, rep = P(None, MODEL), P(MODEL, None), P()

    def lin(layer, spec):
        return Linear(spec, None if layer.b is None else (P(MODEL) if spec == col else rep))

    def ln(layer):
        return gpt_model.LayerNorm(rep, None if layer.b is None else rep)

    blocks = tuple(gpt_model.Block(ln(b.ln1), lin(b.qkv, col), lin(b.attproj, row), ln(b.ln2), lin(b.fc, col),
                                   lin(b.fcproj, row)) for b in params.blocks)
    return gpt_model.GPTParams(rep, rep, blocks, ln(params.lnf), None if params.lm_head is None else rep)


def check_split_step(what: str, cfg) -> None:
    """The split steps' own arithmetic: no dropout, the parameters' dtype (float32, or float64 under x64)."""
    if cfg.dropout:
        raise ValueError(f"tensor parallel: the split {what} step trains without dropout (got dropout {cfg.dropout});"
                         " set it to 0")
    if cfg.precision != "float32":
        raise ValueError(f"tensor parallel: the split {what} step computes in the parameters' dtype (precision "
                         f"float32), got {cfg.precision!r}")


def check_gpt_split(cfg: gpt_model.GPTConfig, model: int) -> None:
    """What the split needs of a GPT config: heads and the MLP's width divisible by the model axis, no dropout,
    float32/64."""
    check_divides("n_head", cfg.n_head, model)
    check_divides("the MLP width 4·n_embd", 4 * cfg.n_embd, model)
    check_split_step("GPT", cfg)


def gpt_layout(params_like, cfg: gpt_model.GPTConfig, n: int, inverse: bool = False):
    """A tree of functions, one per leaf of ``params_like``: the ``qkv`` leaves' :func:`qkv_for_devices` (or, with
    ``inverse``, :func:`qkv_from_devices`), the identity elsewhere — for what has the parameters' tree leaf by leaf
    (the optimiser's moments: :func:`optimizer_state_map`)."""
    move = qkv_from_devices if inverse else qkv_for_devices

    def perm(a):
        return move(a, cfg.n_head, n)

    fns = jax.tree.map(lambda _: (lambda a: a), params_like)
    return fns._replace(blocks=tuple(b._replace(qkv=Linear(perm, None if b.qkv.b is None else perm))
                                     for b in fns.blocks))


def gpt_for_devices(params: gpt_model.GPTParams, cfg: gpt_model.GPTConfig, n: int) -> gpt_model.GPTParams:
    """The GPT's parameters (or anything shaped like them: gradients, Adam's moments) with every ``qkv`` weight and
    bias laid out for ``n`` devices (:func:`qkv_for_devices`); :func:`gpt_from_devices` undoes it."""
    def blk(b):
        qkv = Linear(qkv_for_devices(b.qkv.W, cfg.n_head, n),
                     None if b.qkv.b is None else qkv_for_devices(b.qkv.b, cfg.n_head, n))
        return b._replace(qkv=qkv)

    return params._replace(blocks=tuple(blk(b) for b in params.blocks))


def gpt_from_devices(params: gpt_model.GPTParams, cfg: gpt_model.GPTConfig, n: int) -> gpt_model.GPTParams:
    def blk(b):
        qkv = Linear(qkv_from_devices(b.qkv.W, cfg.n_head, n),
                     None if b.qkv.b is None else qkv_from_devices(b.qkv.b, cfg.n_head, n))
        return b._replace(qkv=qkv)

    return params._replace(blocks=tuple(blk(b) for b in params.blocks))


def gpt_forward(cfg: gpt_model.GPTConfig, params: gpt_model.GPTParams, x, axis: str = MODEL):
    """One device's GPT forward: ``x (B_d, T)`` its rows, ``params`` its slices (:func:`gpt_specs`). The embeddings,
    LayerNorms, residual stream and head replicated along ``axis``; each block's attention and MLP split
    (:func:`attention_forward`, :func:`mlp_forward`: one all-reduce each). Returns the logits ``(B_d, T, V)``, whole
    on every device of the model axis, and the caches."""
    h, c_emb = gpt_model.token_position_embedding_forward(params.wte, params.wpe, x)
    block_caches = []
    for blk in params.blocks:
        a, c_ln1 = gpt_model.layernorm_forward(h, blk.ln1.w, blk.ln1.b)
        a, c_att = attention_forward(a, blk.qkv.W, blk.qkv.b, blk.attproj.W, blk.attproj.b, cfg.n_head, axis)
        h = h + a
        m, c_ln2 = gpt_model.layernorm_forward(h, blk.ln2.w, blk.ln2.b)
        m, c_mlp = mlp_forward(m, blk.fc.W, blk.fc.b, blk.fcproj.W, blk.fcproj.b, axis)
        h = h + m
        block_caches.append((c_ln1, c_att, c_ln2, c_mlp))
    h, c_lnf = gpt_model.layernorm_forward(h, params.lnf.w, params.lnf.b)
    logits, c_head = gpt_model.head_forward(h, params.wte.T if cfg.tie else params.lm_head)
    return logits, (c_emb, tuple(block_caches), c_lnf, c_head)


def gpt_backward(cfg: gpt_model.GPTConfig, caches, dlogits):
    """In reverse: the gradients of this device's slices (a replicated tensor's the same on every device of the model
    axis: the stream's gradient is whole there, after each split layer's all-reduce of ``dx``)."""
    c_emb, block_caches, c_lnf, c_head = caches
    dh, dlm_head, _ = linear_backward(dlogits, c_head)
    dh, dlnf_w, dlnf_b = gpt_model.layernorm_backward(dh, c_lnf)
    dblocks = []
    for c_ln1, c_att, c_ln2, c_mlp in reversed(block_caches):
        dm, dfc_W, dfc_b, dfcproj_W, dfcproj_b = mlp_backward(dh, c_mlp)  # the residual: dh to both
        dm, dln2_w, dln2_b = gpt_model.layernorm_backward(dm, c_ln2)
        dh = dh + dm
        da, dqkv_W, dqkv_b, dproj_W, dproj_b, _ = attention_backward(dh, c_att)
        da, dln1_w, dln1_b = gpt_model.layernorm_backward(da, c_ln1)
        dh = dh + da
        dblocks.append(gpt_model.Block(gpt_model.LayerNorm(dln1_w, dln1_b), Linear(dqkv_W, dqkv_b),
                                       Linear(dproj_W, dproj_b), gpt_model.LayerNorm(dln2_w, dln2_b),
                                       Linear(dfc_W, dfc_b), Linear(dfcproj_W, dfcproj_b)))
    dwte, dwpe, _ = gpt_model.token_position_embedding_backward(dh, c_emb)
    if cfg.tie:
        dwte, dlm_head = dwte + dlm_head.T, None
    return gpt_model.GPTParams(dwte, dwpe, tuple(reversed(dblocks)), gpt_model.LayerNorm(dlnf_w, dlnf_b), dlm_head)


def split_value_and_grad(local_forward: Callable, local_backward: Callable, mesh: jax.sharding.Mesh,
                         specs) -> Callable:
    """``(loss, grads) = f(params, x, y)`` over ``mesh`` (:func:`mesh_2d`), written with ``jax.shard_map``:
    ``params`` whole in the device layout (``specs`` says what each device holds), ``x, y (B, T)`` split by rows along
    ``"data"``. Each device runs ``local_forward(params, x) -> (logits, caches)`` on its rows and slices, seeds the
    cross-entropy's backward with its share of the global mean (``n_d / n``: its valid targets over the batch's),
    runs ``local_backward(caches, dlogits) -> grads`` and sums the gradients over ``"data"`` (``psum``)."""

    def local(params, x, y):
        logits, caches = local_forward(params, x)
        loss_d, c_ce = cross_entropy_forward(logits, y)
        n_d = (y >= 0).sum(dtype=jnp.int32)
        share = n_d.astype(logits.dtype) / jax.lax.psum(n_d, DATA).astype(logits.dtype)  # dL/dL_d
        dlogits, _ = cross_entropy_backward(share, c_ce)
        grads = jax.lax.psum(local_backward(caches, dlogits), DATA)
        return jax.lax.psum(loss_d * share, DATA), grads

    return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(DATA), P(DATA)), out_specs=(P(), specs))


def gpt_value_and_grad(cfg: gpt_model.GPTConfig, mesh: jax.sharding.Mesh, params_like) -> Callable:
    """The GPT's :func:`split_value_and_grad` (``params_like`` gives the tree's shape). Communication per block and
    step: two all-reduces of ``(B_d, T, C)`` forward and two backward along ``"model"``; one gradient all-reduce
    along ``"data"``."""
    check_gpt_split(cfg, mesh.shape[MODEL])
    return split_value_and_grad(lambda p, x: gpt_forward(cfg, p, x), lambda c, d: gpt_backward(cfg, c, d), mesh,
                                gpt_specs(params_like))


def split_step(value_and_grad: Callable, optimizer) -> Callable:
    """``step(ts, batch, key) -> (ts, metrics)`` (:func:`jnnex.train.make_step`'s signature; ``key`` unused, a split
    step has no dropout): the gradients from a :func:`split_value_and_grad`, the optimiser in the global view outside
    ``shard_map`` (so a global-norm clip sums every device's slice, and Muon sees whole matrices). Jit it;
    ``ts.params`` in the device layout."""

    def step(ts, batch, key):
        loss, grads = value_and_grad(ts.params, *batch)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        return type(ts)(optax.apply_updates(ts.params, updates), ts.state, opt_state, ts.step + 1), {"loss": loss}

    return step


def gpt_step(cfg: gpt_model.GPTConfig, optimizer, mesh: jax.sharding.Mesh, params_like) -> Callable:
    """The GPT's :func:`split_step`."""
    return split_step(gpt_value_and_grad(cfg, mesh, params_like), optimizer)


# ----------------------------------------------------------------------------------------------------------------------
# The whole Llama the same way: its grouped-query attention by heads with their groups, SwiGLU by hidden units


def swiglu_for_devices(W, n: int):
    """The fused ``fc`` weight ``(..., 2H) = [W₁ | W₃]`` with its columns reordered so that ``n`` contiguous blocks are
    each ``[W₁ | W₃]`` of the same ``H / n`` hidden units — a device's SwiGLU gate and value side by side, what
    :func:`jnnex.models.llama.swiglu_forward` splits in two. :func:`swiglu_from_devices` undoes it."""
    *lead, width = W.shape
    check_divides("the SwiGLU width H", width // 2, n)
    gate, value = (part.reshape(*lead, n, width // 2 // n) for part in jnp.split(W, 2, axis=-1))
    return jnp.concatenate([gate, value], axis=-1).reshape(*lead, width)


def swiglu_from_devices(W, n: int):
    *lead, width = W.shape
    gate, value = jnp.split(W.reshape(*lead, n, width // n), 2, axis=-1)
    return jnp.concatenate([gate.reshape(*lead, width // 2), value.reshape(*lead, width // 2)], axis=-1)


def llama_specs(params: llama.LlamaParams) -> llama.LlamaParams:
    """The Llama's tensors on the model axis: ``qkv`` and ``fc`` by columns, ``attproj`` and ``fcproj`` by rows
    (no biases), the embedding, every RMSNorm gain and the head replicated."""
    col, row, rep = Linear(P(None, MODEL), None), Linear(P(MODEL, None), None), P()
    blocks = tuple(llama.Block(rep, col, row, rep, col, row) for _ in params.blocks)
    return llama.LlamaParams(rep, blocks, rep, None if params.lm_head is None else rep)


def check_llama_split(cfg: llama.LlamaConfig, model: int) -> None:
    """The Llama's: query and key/value heads and the SwiGLU width divisible by the model axis, no dropout,
    float32/64."""
    check_divides("n_head", cfg.n_head, model)
    check_divides("n_kv_head", cfg.n_kv_head, model)
    check_divides("the SwiGLU width", cfg.hidden, model)
    check_split_step("Llama", cfg)


def llama_layout(params_like, cfg: llama.LlamaConfig, n: int, inverse: bool = False):
    """One function per leaf: ``qkv`` by :func:`qkv_for_devices` with the key/value groups, ``fc`` by
    :func:`swiglu_for_devices` (or back, with ``inverse``), the identity elsewhere."""
    def qkv(a):
        return (qkv_from_devices if inverse else qkv_for_devices)(a, cfg.n_head, n, cfg.n_kv_head)

    def fc(a):
        return (swiglu_from_devices if inverse else swiglu_for_devices)(a, n)

    fns = jax.tree.map(lambda _: (lambda a: a), params_like)
    return fns._replace(blocks=tuple(b._replace(qkv=Linear(qkv, None), fc=Linear(fc, None)) for b in fns.blocks))


def llama_forward(cfg: llama.LlamaConfig, params: llama.LlamaParams, x, axis: str = MODEL):
    """One device's Llama forward (as :func:`gpt_forward`): RMSNorms, embedding, residual stream and head replicated;
    attention by :func:`llama_attention_forward`, the SwiGLU MLP column- then row-parallel (``f``, the device's hidden
    units, ``g``)."""
    h, c_emb = embedding_forward(params.wte, x)
    block_caches = []
    for blk in params.blocks:
        a, c_n1 = llama.rmsnorm_forward(h, blk.norm1, cfg.norm_eps)
        a, c_att = llama_attention_forward(a, blk.qkv.W, blk.attproj.W, cfg.n_head, cfg.n_kv_head, cfg.tiled,
                                           base=cfg.rope_base, axis=axis)
        h = h + a
        m, c_n2 = llama.rmsnorm_forward(h, blk.norm2, cfg.norm_eps)
        m, c_fc = column_linear_forward(m, blk.fc.W, None, axis)  # (B, T, 2H/n): this device's gate and value
        m, c_swiglu = llama.swiglu_forward(m)
        m, c_fcproj = row_linear_forward(m, blk.fcproj.W, None, axis)
        h = h + m
        block_caches.append((c_n1, c_att, c_n2, c_fc, c_swiglu, c_fcproj))
    h, c_nf = llama.rmsnorm_forward(h, params.normf, cfg.norm_eps)
    logits, c_head = gpt_model.head_forward(h, params.wte.T if cfg.tie else params.lm_head)
    return logits, (c_emb, tuple(block_caches), c_nf, c_head)


def llama_backward(cfg: llama.LlamaConfig, caches, dlogits):
    c_emb, block_caches, c_nf, c_head = caches
    dh, dlm_head, _ = linear_backward(dlogits, c_head)
    dh, dnormf = llama.rmsnorm_backward(dh, c_nf)
    dblocks = []
    for c_n1, c_att, c_n2, c_fc, c_swiglu, c_fcproj in reversed(block_caches):
        dm, dfcproj, _ = row_linear_backward(dh, c_fcproj)
        dm = llama.swiglu_backward(dm, c_swiglu)
        dm, dfc, _ = column_linear_backward(dm, c_fc)
        dm, dnorm2 = llama.rmsnorm_backward(dm, c_n2)
        dh = dh + dm
        da, dqkv, dattproj, *_ = llama_attention_backward(dh, c_att)
        da, dnorm1 = llama.rmsnorm_backward(da, c_n1)
        dh = dh + da
        dblocks.append(llama.Block(dnorm1, Linear(dqkv, None), Linear(dattproj, None), dnorm2, Linear(dfc, None),
                                   Linear(dfcproj, None)))
    dwte, _ = embedding_backward(dh, c_emb)
    if cfg.tie:
        dwte, dlm_head = dwte + dlm_head.T, None
    return llama.LlamaParams(dwte, tuple(reversed(dblocks)), dnormf, dlm_head)


def llama_step(cfg: llama.LlamaConfig, optimizer, mesh: jax.sharding.Mesh, params_like) -> Callable:
    """The Llama's :func:`split_step`: per block and step, the same 2 + 2 all-reduces of ``(B_d, T, C)``."""
    check_llama_split(cfg, mesh.shape[MODEL])
    value_and_grad = split_value_and_grad(lambda p, x: llama_forward(cfg, p, x),
                                          lambda c, d: llama_backward(cfg, c, d), mesh, llama_specs(params_like))
    return split_step(value_and_grad, optimizer)


def shardings(mesh: jax.sharding.Mesh, specs):
    """``NamedSharding``s for a tree of ``PartitionSpec``s (``None`` leaves kept)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


# ----------------------------------------------------------------------------------------------------------------------
# What training needs of a split model


class Split(NamedTuple):
    """A model's tensor-parallel split, for :func:`jnnex.train.fit` (``model_parallel=M``): its parameters' layout
    on ``n`` devices and back, their specs along ``"model"``, and its split training step."""

    layout: Callable  # (params_like, n, inverse) -> a function per leaf: to the layout for n devices, or back
    specs: Callable  # params -> PartitionSpecs
    step: Callable  # (optimizer, mesh, params_like) -> step(ts, batch, key)


SPLIT_MODELS = ("gpt", "llama")  # the registered models with a split


def split_of(model) -> Split:
    """The split of a registered ``model`` (a :class:`jnnex.lm.LanguageModel`); a clear error naming the models that
    have one otherwise."""
    cfg = model.cfg
    if model.name == "gpt":
        return Split(lambda like, n, inverse=False: gpt_layout(like, cfg, n, inverse), gpt_specs,
                     lambda opt, mesh, like: gpt_step(cfg, opt, mesh, like))
    if model.name == "llama":
        return Split(lambda like, n, inverse=False: llama_layout(like, cfg, n, inverse), llama_specs,
                     lambda opt, mesh, like: llama_step(cfg, opt, mesh, like))
    raise ValueError(f"tensor parallel: model {model.name!r} has no split across devices (its layers are not "
                     f"Megatron's column/row pairs); the models that have one: {', '.join(SPLIT_MODELS)}")


def optimizer_state_map(optimizer, fn: Callable, opt_state, *trees, other: Callable = lambda x: x):
    """``fn(leaf, *matching leaves of trees)`` applied to every parameter-shaped leaf of ``opt_state`` (Adam's moments,
    momentum; ``optax.tree_utils.tree_map_params``), ``other`` to the other fields (step counts: kept). The parts of
    a partitioned optimiser's state that belong to its other half (``optax.MaskedNode``), and absent tensors (a
    bias-free layer's ``None``), stay as they are."""
    def one(leaf, *rest):
        return leaf if leaf is None or isinstance(leaf, optax.MaskedNode) else fn(leaf, *rest)

    return optax.tree_utils.tree_map_params(optimizer, one, opt_state, *trees, transform_non_params=other,
                                            is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode))


def train_layout(split: Split, optimizer, mesh: jax.sharding.Mesh, ts):
    """For :func:`jnnex.train.fit`: ``(to_devices, to_host, shardings)`` — functions taking a training state (host
    arrays, the parameters' own layout) to the device layout and back, and the state's ``NamedSharding``s there."""
    n = mesh.shape[MODEL]
    apply = lambda fn, a: fn(a)  # noqa: E731
    there, back = split.layout(ts.params, n), split.layout(ts.params, n, True)

    def moved(fns, ts):
        params = jax.tree.map(apply, fns, ts.params)
        opt_state = optimizer_state_map(optimizer, lambda a, fn: fn(a), ts.opt_state, fns)
        return type(ts)(params, ts.state, opt_state, ts.step)

    rep = NamedSharding(mesh, P())
    param_shardings = shardings(mesh, split.specs(ts.params))
    opt_shardings = optimizer_state_map(optimizer, lambda _, s: s, ts.opt_state, param_shardings,
                                        other=lambda x: None if x is None else rep)
    layout = type(ts)(param_shardings, jax.tree.map(lambda _: rep, ts.state), opt_shardings, rep)
    return (lambda ts: moved(there, ts)), (lambda ts: moved(back, ts)), layout
