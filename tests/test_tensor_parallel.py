"""Tensor parallelism (:mod:`jnnex.collectives`, :mod:`jnnex.tensor_parallel`): the column- and row-parallel
linears, the GPT's attention split by heads and its whole block split by heads and hidden units, the Llama's
grouped-query attention split with its groups — each the model's own function with its mesh axis set, forward and
hand-written backward run under ``jax.shard_map`` on 1, 2 and 4 CPU devices and proven against ``jax.vjp`` of the
unsplit function in float64; ``f``'s all-reduce is what makes ``dx`` right; the compiled block holds Megatron's 2 + 2
all-reduces of ``B·T·C``. Then the whole GPT and Llama split on data × model meshes (2 × 2, 1 × 4): one training
step (with dropout, with diagnostics) equal to one device's per tensor in float64, a bfloat16 step as close to one
device's as bfloat16 rounding allows, training and resuming through ``fit``, and the errors."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jnnex.collectives as C
import jnnex.tensor_parallel as TP
from jnnex.layout import Parallel
from jnnex.collectives import Part
from jnnex.layers import Linear, linear_forward
from jnnex.models import gpt as G, llama as L

M = TP.MODEL
DEVICES = st.sampled_from([1, 2, 4])
COLUMNS, ROWS, SPLIT_LAST, WHOLE = P(None, M), P(M, None), P(None, None, M), P()


def normal(key, *shape):
    return jax.random.normal(key, shape, jnp.float64)


def split_run(forward, backward, n, args, arg_specs, out_spec, dy):
    """``forward`` and ``backward`` of each device's slices under ``shard_map`` over ``n`` devices, one compiled
    program: ``(y, grads)`` as global arrays (the slices put back by the specs)."""

    def local(*a):
        *a, dy = a
        y, cache = forward(*a)
        return y, tuple(backward(dy, cache))[:len(arg_specs)]  # (the attention's last, for n_head, is None)

    run = jax.shard_map(local, mesh=TP.model_mesh(n), in_specs=(*arg_specs, out_spec),
                        out_specs=(out_spec, tuple(arg_specs)))
    return jax.jit(run)(*args, dy)


def vjp_of(f, dy, *args):
    """``f``'s output and ``jax.vjp`` of it at ``args`` for the upstream gradient ``dy``, the unsplit reference, as
    one compiled program (run op by op, each example's new shapes would compile every operation on its own)."""
    def both(dy, *args):
        y, vjp = jax.vjp(f, *args)
        return y, vjp(dy)
    return jax.jit(both)(dy, *args)


def assert_close(got, want, names):
    for name, g, w in zip(names, got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * float(np.abs(w).max()), err_msg=name)


def heads3(n_head, hs, n_kv_head=None):
    """The parts of a fused ``qkv``: queries, keys, values."""
    kv = Part("n_kv_head", n_head if n_kv_head is None else n_kv_head, hs)
    return (Part("n_head", n_head, hs), kv, kv)


@settings(max_examples=min(6, settings().max_examples))  # each example compiles a program of its own
@given(n=DEVICES, B=st.sampled_from([1, 3]), T=st.sampled_from([1, 4]), C_=st.sampled_from([1, 5]),
       per_device=st.sampled_from([1, 3]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_column_and_row_linears_equal_the_unsplit_linear_float64(n, B, T, C_, per_device, bias, seed):
    """Column-parallel (output columns split; ``dx`` all-reduced) and row-parallel (input rows split; output
    all-reduced, bias once): output and every gradient equal ``jax.vjp`` of ``x W + b`` on one device."""
    k = jax.random.split(jax.random.key(seed), 6)
    wide = n * per_device
    # column: x (B, T, C) whole, W (C, wide) split by columns
    x, W, b, dy = normal(k[0], B, T, C_), normal(k[1], C_, wide), normal(k[2], wide) if bias else None, \
        normal(k[3], B, T, wide)
    want_y, want = vjp_of(lambda x, W, b: linear_forward(x, W, b)[0], dy, x, W, b)
    y, grads = split_run(lambda x, W, b: C.column_linear_forward(x, W, b, M), C.column_linear_backward, n, (x, W, b),
                         (WHOLE, COLUMNS, P(M) if bias else WHOLE), SPLIT_LAST, dy)
    assert_close([g for g in (y, *grads) if g is not None], [g for g in (want_y, *want) if g is not None],
                 ["y", "dx", "dW", "db"][:3 + bias])
    # row: x (B, T, wide) split by channels, W (wide, C) split by rows, b (C,) whole
    x, W, b, dy = normal(k[4], B, T, wide), normal(k[5], wide, C_), normal(k[2], C_) if bias else None, \
        normal(k[3], B, T, C_)
    want_y, want = vjp_of(lambda x, W, b: linear_forward(x, W, b)[0], dy, x, W, b)
    y, grads = split_run(lambda x, W, b: C.row_linear_forward(x, W, b, M), C.row_linear_backward, n, (x, W, b),
                         (SPLIT_LAST, ROWS, WHOLE), WHOLE, dy)
    assert_close([g for g in (y, *grads) if g is not None], [g for g in (want_y, *want) if g is not None],
                 ["y", "dx", "dW", "db"][:3 + bias])


def test_with_no_axis_the_split_linears_are_the_linear_to_the_bit():
    """``axis=None`` (one device, every model's default): the column and row linears are
    :func:`jnnex.layers.linear_forward` and its backward, bit for bit, in bfloat16 too (where the bias is added to the
    float32 product before the one rounding)."""
    k = jax.random.split(jax.random.key(1), 4)
    x, W, b, dy = (normal(k[0], 2, 3, 8), normal(k[1], 8, 4), normal(k[2], 4), normal(k[3], 2, 3, 4))
    for dtype in (jnp.float64, jnp.bfloat16):
        args = [a.astype(dtype) for a in (x, W, b)]
        want_y, c = linear_forward(*args)
        want = C.linear_backward(dy.astype(dtype), c)
        for fwd, bwd in ((C.column_linear_forward, C.column_linear_backward),
                         (C.row_linear_forward, C.row_linear_backward)):
            y, cache = fwd(*args)
            assert y.dtype == want_y.dtype and bool((y == want_y).all())
            for g, w in zip(bwd(dy.astype(dtype), cache), want):
                assert bool((g == w).all())


def test_without_fs_all_reduce_dx_is_one_devices_part(monkeypatch):
    """The backward of ``f`` is the whole point: left as the identity, each device's ``dx`` is its own columns'
    share, and the check names ``dx`` (``dW`` and ``db`` stay right)."""
    k = jax.random.split(jax.random.key(0), 3)
    x, W, dy = normal(k[0], 2, 3, 4), normal(k[1], 4, 8), normal(k[2], 2, 3, 8)
    _, vjp = jax.vjp(lambda x, W: linear_forward(x, W)[0], x, W)
    monkeypatch.setattr(C, "f_backward", lambda dx, cache, axis=M: dx)
    with pytest.raises(AssertionError, match="dx"):
        # (the local dx varies by device; out_specs P() would refuse it, so gather all four and compare each)
        def local(x, W, dy):
            y, cache = C.column_linear_forward(x, W, None, M)
            dx, dW, _ = C.column_linear_backward(dy, cache)
            return dx[None], dW

        dxs, dW = jax.jit(jax.shard_map(local, mesh=TP.model_mesh(4), in_specs=(WHOLE, COLUMNS, SPLIT_LAST),
                                        out_specs=(P(M), COLUMNS)))(x, W, dy)
        np.testing.assert_allclose(dW, vjp(dy)[1], rtol=1e-12)
        for dx in dxs:
            assert_close([dx], [vjp(dy)[0]], ["dx"])


def gpt_block(cfg, k, C_):
    """A GPT block with every tensor random (biases and gains too: zeros hide wrong backwards)."""
    ln = lambda i: G.LayerNorm(1 + 0.1 * normal(k[i], C_), 0.1 * normal(k[i + 1], C_))  # noqa: E731
    lin = lambda i, a, b: Linear(normal(k[i], a, b) * a**-0.5, 0.1 * normal(k[i + 1], b))  # noqa: E731
    return G.Block(ln(0), lin(2, C_, 3 * C_), lin(4, C_, C_), ln(6), lin(8, C_, 4 * C_), lin(10, 4 * C_, C_))


def block_specs(model, blk):
    """The block's specs along the model axis, read off the model's own split rules."""
    fake = G.GPTParams(None, None, (blk,), None, None)
    return TP.specs(model, fake).blocks[0]


def block_layout(model, blk, n, inverse=False):
    fake = G.GPTParams(None, None, (blk,), None, None)
    fns = TP.layout(model, fake, n, inverse).blocks[0]
    return jax.tree.map(lambda fn, a: fn(a), fns, blk, is_leaf=callable)


@settings(max_examples=min(4, settings().max_examples))
@given(n=DEVICES, B=st.sampled_from([1, 2]), T=st.sampled_from([1, 5]), heads=st.sampled_from([1, 2]),
       hs=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_the_gpts_attention_and_block_split_by_heads_equal_the_unsplit_ones_float64(n, B, T, heads, hs, seed):
    """The GPT's own attention layer with its model axis set (each device ``heads`` of the ``n·heads``), and its whole
    block (``qkv`` and ``fc`` column-parallel, ``attproj`` and ``fcproj`` row-parallel, LayerNorms and the residual
    stream replicated), against the same functions unsplit: output and every gradient tensor."""
    H = n * heads  # n_head
    C_ = H * hs
    k = jax.random.split(jax.random.key(seed), 16)
    x, dy = normal(k[0], B, T, C_), normal(k[1], B, T, C_)
    W_qkv, b_qkv = normal(k[6], C_, 3 * C_) * C_**-0.5, normal(k[7], 3 * C_)
    W_proj, b_proj = normal(k[8], C_, C_), normal(k[9], C_)
    want_y, want = vjp_of(lambda *a: G.self_attention_forward(*a, H)[0], dy, x, W_qkv, b_qkv, W_proj, b_proj)
    parts = heads3(H, hs)
    y, (dx, dW_qkv, db_qkv, dW_proj, db_proj) = split_run(
        lambda *a: G.self_attention_forward(*a, n_head=H, axis=M), G.self_attention_backward, n,
        (x, TP.for_devices(W_qkv, parts, n), TP.for_devices(b_qkv, parts, n), W_proj, b_proj),
        (WHOLE, COLUMNS, P(M), ROWS, WHOLE), WHOLE, dy)
    got = [y, dx, TP.from_devices(dW_qkv, parts, n), TP.from_devices(db_qkv, parts, n), dW_proj, db_proj]
    assert_close(got, [want_y, *want], ["y", "dx", "dW_qkv", "db_qkv", "dW_proj", "db_proj"])

    model = G.gpt(G.GPTConfig(n_head=H, n_embd=C_, n_layer=1))
    cfg, split_cfg = model.cfg, dataclasses.replace(model.cfg, model_axis=M)
    blk = gpt_block(cfg, k[4:], C_)
    want_y, (want_dx, want_blk) = vjp_of(lambda h, b: G.block_forward(cfg, b, h)[0], dy, x, blk)
    y, (dx, dblk) = split_run(lambda h, b: G.block_forward(split_cfg, b, h), G.block_backward, n,
                              (x, block_layout(model, blk, n)), (WHOLE, block_specs(model, blk)), WHOLE, dy)
    dblk = block_layout(model, dblk, n, inverse=True)
    names = ["y", "dx"] + [f"d{name}" for name in ("ln1.w", "ln1.b", "qkv.W", "qkv.b", "attproj.W", "attproj.b",
                                                  "ln2.w", "ln2.b", "fc.W", "fc.b", "fcproj.W", "fcproj.b")]
    assert_close([y, dx, *jax.tree.leaves(dblk)], [want_y, want_dx, *jax.tree.leaves(want_blk)], names)


@settings(max_examples=min(4, settings().max_examples))
@given(n=DEVICES, group=st.sampled_from([1, 2]), kv_per_device=st.sampled_from([1, 2]), T=st.sampled_from([1, 6]),
       tile=st.sampled_from([None, 4]), seed=st.integers(0, 2**16))
def test_the_llamas_grouped_query_attention_split_by_heads_float64(n, group, kv_per_device, T, tile, seed):
    """Each device its query heads and the key/value heads their groups share, the Llama's own attention (rotary
    positions; plain or tiled) with its model axis set: against ``jax.vjp`` of the same function unsplit, output and
    every gradient tensor."""
    n_kv = n * kv_per_device
    H, hs = n_kv * group, 2
    C_ = H * hs
    k = jax.random.split(jax.random.key(seed), 4)
    x, dy = normal(k[0], 2, T, C_), normal(k[1], 2, T, C_)
    W_qkv, W_proj = normal(k[2], C_, (H + 2 * n_kv) * hs) * C_**-0.5, normal(k[3], C_, C_)
    want_y, want = vjp_of(lambda x, Wq, Wp: L.attention_forward(x, Wq, Wp, H, n_kv, tile)[0], dy, x, W_qkv, W_proj)
    parts = heads3(H, hs, n_kv)
    y, (dx, dW_qkv, dW_proj) = split_run(
        lambda x, Wq, Wp: L.attention_forward(x, Wq, Wp, H, n_kv, tile, axis=M), L.attention_backward, n,
        (x, TP.for_devices(W_qkv, parts, n), W_proj), (WHOLE, COLUMNS, ROWS), WHOLE, dy)
    got = [y, dx, TP.from_devices(dW_qkv, parts, n), dW_proj]
    assert_close(got, [want_y, *want], ["y", "dx", "dW_qkv", "dW_proj"])


def test_a_block_holds_two_all_reduces_of_BTC_forward_and_two_backward():
    """Megatron's count, read from the program: the GPT's own block on 4 devices, forward and backward, holds exactly
    4 all-reduces, each of ``B·T·C`` numbers (the forward's two outputs and the backward's two ``dx``)."""
    B, T, C_, H, n = 2, 8, 16, 4, 4
    k = jax.random.split(jax.random.key(0), 16)
    model = G.gpt(G.GPTConfig(n_head=H, n_embd=C_, n_layer=1))
    split_cfg = dataclasses.replace(model.cfg, model_axis=M)
    blk = gpt_block(model.cfg, k, C_)

    def local(x, blk):
        h, cache = G.block_forward(split_cfg, blk, x)
        return h, G.block_backward(jnp.cos(h), cache)[0]

    run = jax.shard_map(local, mesh=TP.model_mesh(n), in_specs=(WHOLE, block_specs(model, blk)),
                        out_specs=(WHOLE, WHOLE))
    text = jax.jit(run).lower(normal(k[15], B, T, C_), block_layout(model, blk, n)).as_text()
    # each op: "stablehlo.all_reduce"(%x) <{...}> ({ the sum region }) : (operand type) -> result type
    operands = re.findall(r'"stablehlo\.all_reduce".*?\}\) : \((tensor<[^>]*>)\)', text, flags=re.DOTALL)
    assert operands == [f"tensor<{B}x{T}x{C_}xf64>"] * 4, operands


def test_a_split_that_does_not_divide_is_named():
    with pytest.raises(ValueError, match=r"n_head \(6\) must be divisible by the model axis \(4 devices\); it splits "
                                         r"over \[1, 2, 3, 6\]"):
        TP.for_devices(jnp.zeros((6, 18)), heads3(6, 1), n=4)
    with pytest.raises(ValueError, match=r"n_kv_head \(2\) must be divisible by the model axis \(4 devices\)"):
        TP.for_devices(jnp.zeros((8, 16)), heads3(4, 2, n_kv_head=2), n=4)
    with pytest.raises(ValueError, match="devices: the model axis needs 1 to 4 devices"):
        TP.model_mesh(5)


def test_for_devices_groups_each_devices_heads_and_undoes():
    """The layout by hand for the Llama's grouped ``qkv`` (4 query heads, 2 key/value heads, head size 1) on 2
    devices: device 0 gets q0 q1 k0 v0, device 1 q2 q3 k1 v1; and :func:`from_devices` puts them back."""
    W = jnp.arange(8, dtype=jnp.int32)  # q0 q1 q2 q3 k0 k1 v0 v1
    there = TP.for_devices(W, heads3(4, 1, n_kv_head=2), n=2)
    assert there.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert TP.from_devices(there, heads3(4, 1, n_kv_head=2), n=2).tolist() == list(range(8))
    swiglu = (Part("the SwiGLU width", 4), Part("the SwiGLU width", 4))  # gate g0..g3 | value u0..u3
    assert TP.for_devices(jnp.arange(8), swiglu, n=2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


# ----------------------------------------------------------------------------------------------------------------------
# The whole GPT on a data × model mesh


SMALL_LLAMA = {"n_layer": 2, "n_embd": 16, "n_head": 4, "ffn_multiple": 4}  # SwiGLU 44 wide: 11 a device on 4


def gpt_problem(name="gpt", **over):
    from tests.test_parallel import float64_problem, model_and_data
    model, splits = model_and_data(name, **{"n_head": 4, **(SMALL_LLAMA if name == "llama" else {}), **over})
    params, state, x, y = float64_problem(model.with_gradients("manual"), splits)
    return model, params, x, y


def one_and_split_steps(model, params, x, y, data, model_axis, key, *, diagnostics=False):
    """One AdamW step (weight decay, global-norm clipping, moments not zero) of the model on one device and of the
    split model on a ``data × model_axis`` mesh, from the same state: ``(want, m_want, got, m_got, placed)`` with
    ``got`` back in the parameters' own layout and ``placed`` the split step's output on the mesh."""
    from jnnex import parallel
    from jnnex.optim import TrainConfig, make_optimizer
    from jnnex.train import init_train_state, make_step

    opt = make_optimizer(TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1, grad_clip=0.5))
    ts = init_train_state(model, opt, jax.random.key(0))
    ts = ts._replace(params=params, opt_state=jax.jit(opt.init)(params))
    one_step = jax.jit(make_step(model.with_gradients("manual"), opt, diagnostics=diagnostics))
    ts = one_step(ts, (x, y), jax.random.fold_in(key, 1))[0]  # moments that are not zero
    want, m_want = one_step(ts, (x, y), key)

    mesh = TP.mesh_2d(data, model_axis)
    to_devices, to_host, layout_ = TP.train_layout(model, opt, mesh, ts)
    step = jax.jit(TP.split_step(model, opt, mesh, ts.params, diagnostics=diagnostics), out_shardings=(layout_, None))
    placed = parallel.place(to_devices(parallel.local(ts)), layout_)
    placed, m_got = step(placed, jax.device_put((x, y), parallel.batch_sharded(mesh)), key)
    return want, m_want, to_host(parallel.local(placed)), m_got, placed


@pytest.mark.parametrize("name,layout,data,model_axis", [
    ("gpt", {"tie": False, "bias": True}, 2, 2), ("gpt", {"tie": False, "bias": True}, 1, 4),
    ("gpt", {"tie": True, "bias": False}, 2, 2), ("gpt", {"tie": True, "bias": False}, 1, 4),
    ("llama", {"n_kv_head": 2, "tie": True}, 2, 2),  # grouped: each device 2 query heads and their 1 key/value head
    ("llama", {"n_kv_head": 4, "attention": "tiled", "tile": 4}, 1, 4),
    ("gpt", {"dropout": 0.25}, 2, 2), ("llama", {"n_kv_head": 2, "dropout": 0.25}, 2, 2),
], ids=["gpt-untied-biases-2x2", "gpt-untied-biases-1x4", "gpt-tied-2x2", "gpt-tied-1x4", "llama-gqa-tied-2x2",
        "llama-tiled-1x4", "gpt-dropout-2x2", "llama-dropout-2x2"])
def test_the_split_step_on_a_data_by_model_mesh_equals_one_device_float64(name, layout, data, model_axis):
    """One AdamW step of the model's own forward and hand-written backward on each device's rows and slices — rows
    along ``"data"``, heads and MLP columns along ``"model"``, the optimiser in the global view — against the same step
    of the unsplit model on one device: the loss, every new parameter and every Adam moment agree to 1e-12, per
    tensor; each device holds its ``1/M`` of every split weight. The GPT with and without biases and tying; the Llama
    grouped-query and tied, and with tiled attention; both with dropout (the masks drawn for the whole batch and each
    device's rows taken: masks drawn per device would differ from one device's)."""
    from tests.test_parallel import rel_errors

    model, params, x, y = gpt_problem(name, **layout)
    want, m_want, got, m_got, placed = one_and_split_steps(model, params, x, y, data, model_axis, jax.random.key(7))
    fc = placed.params.blocks[0].fc.W
    assert {s.data.shape for s in fc.addressable_shards} == {(fc.shape[0], fc.shape[1] // model_axis)}
    np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=1e-12)
    assert max(rel_errors(got.params, want.params)) <= 1e-12
    assert max(rel_errors(got.opt_state, want.opt_state)) <= 1e-12


@pytest.mark.parametrize("data, model_axis, kw", [(2, 2, {}), (1, 4, {"expert_capacity": 0.5, "expert_top_k": 1,
                                                                   "n_kv_head": 4})],
                         ids=["dropless-2x2", "dropping-1x4"])
def test_a_mixture_of_experts_on_a_data_by_model_mesh_equals_one_device_per_data_shard_float64(data, model_axis, kw):
    """The attention split Megatron's way and every expert by its hidden units (``W1`` by columns, ``W2`` by rows), the
    router replicated: the loss and every gradient equal, per tensor in float64, ``jax.grad`` on one device of
    :func:`jnnex.lm.grouped_objective` with a group a data shard — each shard's routing, capacity and balancing loss,
    the shards' balancing losses averaged."""
    from jnnex.lm import grouped_objective

    model = L.llama(L.LlamaConfig(**{"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                                     "n_embd": 16, "n_expert": 4, "aux_weight": 0.5, **kw}))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0))[0])
    x = jax.random.randint(jax.random.key(1), (8, 8), 0, 11)
    y = jax.random.randint(jax.random.key(2), (8, 8), -1, 11)
    # (the one-device reference compiled as one program, not run an eager op at a time)
    want_loss, want = jax.jit(jax.value_and_grad(lambda p: grouped_objective(model, p, (), x, y, data)))(params)
    mesh = TP.mesh_2d(data, model_axis)
    placed = jax.tree.map(lambda fn, a: fn(a), TP.layout(model, params, model_axis), params)
    loss, grads, *_ = jax.jit(TP.split_value_and_grad(model, mesh, params))(placed, (), x, y, jax.random.key(0))
    grads = jax.tree.map(lambda fn, a: fn(a), TP.layout(model, params, model_axis, inverse=True), grads)
    np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-13)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12, err_msg=jax.tree_util.keystr(path))


def test_the_split_step_reads_diagnostics_as_one_device_does_float64():
    """``diagnostics`` on a 2 × 2 mesh: every per-layer figure (activation and gradient means and spreads, grad:data
    and update:data ratios) equals one device's to 1e-10 — the activations come back whole from the devices' rows, and
    a weight's spread does not depend on the devices' column order."""
    model, params, x, y = gpt_problem("gpt", dropout=0.25)
    _, m_want, _, m_got, _ = one_and_split_steps(model, params, x, y, 2, 2, jax.random.key(3), diagnostics=True)
    assert set(m_got) == set(m_want) and len(m_want) > 1
    for k in m_want:
        np.testing.assert_allclose(m_got[k], m_want[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_a_bfloat16_split_step_is_one_devices_up_to_float32_rounding():
    """``precision="bfloat16"`` split 2 × 2 (float32 parameters): the split model computes in bfloat16 exactly where
    one device does — its column-parallel ``dx`` and row-parallel outputs summed over the devices in float32 and
    rounded once, as one device's product is — so one AdamW step's parameters agree with one device's bfloat16 step
    to float32 rounding (measured: 8.5e-8 relative, per tensor), while the bfloat16 step itself is far from the float32
    step (0.38: Adam's first steps amplify bfloat16's gradient rounding). Summing the partial products in bfloat16,
    or computing the split in float32, breaks the first bound."""
    from tests.test_parallel import model_and_data, rel_errors

    with jax.enable_x64(False):
        model, splits = model_and_data("gpt", n_head=4, precision="bfloat16")
        params = jax.jit(model.init)(jax.random.key(0))[0]
        x, y = (jnp.asarray(a[:8]) for a in splits.train)
        key = jax.random.key(5)
        want, _, got, _, _ = one_and_split_steps(model, params, x, y, 2, 2, key)
        f32 = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, precision="float32"))
        exact, _, _, _, _ = one_and_split_steps(f32, params, x, y, 2, 2, key)
    assert max(rel_errors(want.params, exact.params)) > 1e-2  # bfloat16 is in force
    assert max(rel_errors(got.params, want.params)) <= 1e-5


def test_the_split_gpt_step_all_reduces_megatrons_count():
    """Read from the lowered step on a 2 × 2 mesh: along ``"model"``, 4 all-reduces of the device's ``B_d·T·C`` per
    block (2 forward, 2 backward); along ``"data"``, the loss's and the gradients' sums. The same count as one
    block's test above, now for a whole model of 2 blocks."""
    model, params, x, y = gpt_problem()
    mesh = TP.mesh_2d(2, 2)
    f = TP.split_value_and_grad(model, mesh, params)
    there = jax.tree.map(lambda fn, a: fn(a), TP.layout(model, params, 2), params, is_leaf=callable)
    text = jax.jit(f).lower(there, (), x, y, jax.random.key(0)).as_text()
    operands = re.findall(r'"stablehlo\.all_reduce".*?\}\) : \((tensor<[^>]*>)\)', text, flags=re.DOTALL)
    B, T, C_ = x.shape[0] // 2, x.shape[1], model.cfg.n_embd
    assert operands.count(f"tensor<{B}x{T}x{C_}xf64>") == 4 * model.cfg.n_layer, operands


def test_training_split_over_a_mesh_ends_where_one_device_does(tmp_path):
    """``fit(..., parallel=Parallel("tp", 4, 2))`` for 20 steps (SGD with momentum: its state must move to the split
    layout and back), checkpointed, resumed to 40 on one device: where 40 steps on one device end — so the split
    steps were the unsplit ones, and the checkpoint holds the parameters (and momentum) in their own layout (a qkv
    momentum left in the devices' column order moves the resumed parameters by ~1e-2; float32 rounding of the
    split's other summation order, ~1e-6 after 40 steps)."""
    from tests.runfiles import fit_resumed, fit_saved
    from tests.test_parallel import model_and_data, rel_errors
    from jnnex.optim import TrainConfig
    from jnnex.train import fit
    model, splits = model_and_data("gpt", n_head=4)
    short = TrainConfig(steps=20, eval_every=20, chunk=20, lr_boundaries=(), optimizer="momentum", lr=0.1)
    fit_saved(model, splits.train, short, tmp_path / "r", parallel=Parallel("tp", 4, 2))
    resumed = fit_resumed(model, splits.train, short.with_steps(40), tmp_path / "r")
    whole = fit(model, splits.train, short.with_steps(40))
    assert int(resumed.ts.step) == 40
    assert max(rel_errors(resumed.ts.params, whole.ts.params)) < 1e-5


def test_bad_tensor_parallel_settings_are_named():
    from tests.test_parallel import model_and_data
    from jnnex.optim import TrainConfig
    from jnnex.train import fit
    model, splits = model_and_data("gpt", n_head=2)
    tcfg = TrainConfig(steps=2, batch_size=8)
    with pytest.raises(ValueError, match=r"n_head \(2\) must be divisible by the model axis \(4 devices\)"):
        fit(model, splits.train, tcfg, parallel=Parallel("tp", 4, 4))
    rnn, rnn_splits = model_and_data("rnn")
    with pytest.raises(ValueError, match="model 'rnn' has no split across devices .* it declares no split_fn"):
        fit(rnn, rnn_splits.train, tcfg, parallel=Parallel("tp", 4, 2))
    with pytest.raises(ValueError, match=r"mesh: data 4 × model 2 = 8 devices, but only 4 exist"):
        fit(model, splits.train, tcfg, parallel=Parallel("tp", 8, 2))
    with pytest.raises(ValueError, match="give devices as a number that divides by it"):
        fit(model, splits.train, tcfg, parallel=Parallel("tp", 3, 2))
    with pytest.raises(ValueError, match="FSDP × tensor parallel"):
        Parallel.from_flags(devices=4, shard_params=True, model_parallel=2)
    odd, odd_splits = model_and_data("llama", **{**SMALL_LLAMA, "ffn_multiple": 2})  # SwiGLU 42 wide
    with pytest.raises(ValueError, match=r"the SwiGLU width \(42\) must be divisible by the model axis \(4 devices\)"):
        fit(odd, odd_splits.train, tcfg, parallel=Parallel("tp", 4, 4))
