"""Tensor parallelism (:mod:`jnnex.tensor_parallel`): the column- and row-parallel linears, Megatron's MLP and
attention split by heads, the Llama's grouped-query attention split with its groups, each forward and hand-written
backward run under ``jax.shard_map`` on 1, 2 and 4 CPU devices and proven against ``jax.vjp`` of the unsplit layer in
float64; ``f``'s all-reduce is what makes ``dx`` right; the compiled block holds Megatron's 2 + 2 all-reduces of
``B·T·C``. Then the whole GPT and Llama split on data × model meshes (2 × 2, 1 × 4): one training step equal to one
device's per tensor in float64, training and resuming through ``fit``, and the errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jnnex.tensor_parallel as TP
from jnnex.layers import linear_forward
from jnnex.models.gpt import gelu_forward, self_attention_forward

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


@settings(max_examples=min(6, settings().max_examples))  # each example compiles a program of its own
@given(n=DEVICES, B=st.sampled_from([1, 3]), T=st.sampled_from([1, 4]), C=st.sampled_from([1, 5]),
       per_device=st.sampled_from([1, 3]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_column_and_row_linears_equal_the_unsplit_linear_float64(n, B, T, C, per_device, bias, seed):
    """Column-parallel (output columns split; ``dx`` all-reduced) and row-parallel (input rows split; output
    all-reduced, bias once): output and every gradient equal ``jax.vjp`` of ``x W + b`` on one device."""
    k = jax.random.split(jax.random.key(seed), 6)
    wide = n * per_device
    # column: x (B, T, C) whole, W (C, wide) split by columns
    x, W, b, dy = normal(k[0], B, T, C), normal(k[1], C, wide), normal(k[2], wide) if bias else None, \
        normal(k[3], B, T, wide)
    want_y, want = vjp_of(lambda x, W, b: linear_forward(x, W, b)[0], dy, x, W, b)
    y, grads = split_run(TP.column_linear_forward, TP.column_linear_backward, n, (x, W, b),
                         (WHOLE, COLUMNS, P(M) if bias else WHOLE), SPLIT_LAST, dy)
    assert_close([g for g in (y, *grads) if g is not None], [g for g in (want_y, *want) if g is not None],
                 ["y", "dx", "dW", "db"][:3 + bias])
    # row: x (B, T, wide) split by channels, W (wide, C) split by rows, b (C,) whole
    x, W, b, dy = normal(k[4], B, T, wide), normal(k[5], wide, C), normal(k[2], C) if bias else None, \
        normal(k[3], B, T, C)
    want_y, want = vjp_of(lambda x, W, b: linear_forward(x, W, b)[0], dy, x, W, b)
    y, grads = split_run(TP.row_linear_forward, TP.row_linear_backward, n, (x, W, b),
                         (SPLIT_LAST, ROWS, WHOLE), WHOLE, dy)
    assert_close([g for g in (y, *grads) if g is not None], [g for g in (want_y, *want) if g is not None],
                 ["y", "dx", "dW", "db"][:3 + bias])


def test_without_fs_all_reduce_dx_is_one_devices_part(monkeypatch):
    """The backward of ``f`` is the whole point: left as the identity, each device's ``dx`` is its own columns'
    share, and the check names ``dx`` (``dW`` and ``db`` stay right)."""
    k = jax.random.split(jax.random.key(0), 3)
    x, W, dy = normal(k[0], 2, 3, 4), normal(k[1], 4, 8), normal(k[2], 2, 3, 8)
    _, vjp = jax.vjp(lambda x, W: linear_forward(x, W)[0], x, W)
    monkeypatch.setattr(TP, "f_backward", lambda dx, cache, axis=M: dx)
    with pytest.raises(AssertionError, match="dx"):
        # (the local dx varies by device; out_specs P() would refuse it, so gather all four and compare each)
        def local(x, W, dy):
            y, cache = TP.column_linear_forward(x, W)
            dx, dW, _ = TP.column_linear_backward(dy, cache)
            return dx[None], dW

        dxs, dW = jax.jit(jax.shard_map(local, mesh=TP.model_mesh(4), in_specs=(WHOLE, COLUMNS, SPLIT_LAST),
                                        out_specs=(P(M), COLUMNS)))(x, W, dy)
        np.testing.assert_allclose(dW, vjp(dy)[1], rtol=1e-12)
        for dx in dxs:
            assert_close([dx], [vjp(dy)[0]], ["dx"])


def unsplit_mlp(x, W_fc, b_fc, W_proj, b_proj):
    h, _ = linear_forward(x, W_fc, b_fc)
    return linear_forward(gelu_forward(h)[0], W_proj, b_proj)[0]


@settings(max_examples=min(4, settings().max_examples))
@given(n=DEVICES, B=st.sampled_from([1, 2]), T=st.sampled_from([1, 5]), heads=st.sampled_from([1, 2]),
       hs=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_megatron_mlp_and_attention_equal_the_gpts_layers_float64(n, B, T, heads, hs, seed):
    """The GPT's MLP (``fc`` by columns, GELU local, ``fcproj`` by rows) and attention split by heads (each device
    ``heads`` of them, ``n·heads`` in all) against the GPT's own unsplit layers: output and every gradient tensor."""
    H = n * heads  # n_head
    C = H * hs
    k = jax.random.split(jax.random.key(seed), 10)
    x, dy = normal(k[0], B, T, C), normal(k[1], B, T, C)
    W_fc, b_fc, W_proj, b_proj = normal(k[2], C, 4 * C), normal(k[3], 4 * C), normal(k[4], 4 * C, C), normal(k[5], C)
    want_y, want = vjp_of(unsplit_mlp, dy, x, W_fc, b_fc, W_proj, b_proj)
    y, grads = split_run(TP.mlp_forward, TP.mlp_backward, n, (x, W_fc, b_fc, W_proj, b_proj),
                         (WHOLE, COLUMNS, P(M), ROWS, WHOLE), WHOLE, dy)
    assert_close([y, *grads], [want_y, *want], ["y", "dx", "dW_fc", "db_fc", "dW_proj", "db_proj"])

    W_qkv, b_qkv = normal(k[6], C, 3 * C) * C**-0.5, normal(k[7], 3 * C)
    W_proj, b_proj = normal(k[8], C, C), normal(k[9], C)
    want_y, want = vjp_of(lambda *a: self_attention_forward(*a, H)[0], dy, x, W_qkv, b_qkv, W_proj, b_proj)
    y, (dx, dW_qkv, db_qkv, dW_proj, db_proj) = split_run(
        lambda *a: TP.attention_forward(*a, n_head=H), TP.attention_backward, n,
        (x, TP.qkv_for_devices(W_qkv, H, n), TP.qkv_for_devices(b_qkv, H, n), W_proj, b_proj),
        (WHOLE, COLUMNS, P(M), ROWS, WHOLE), WHOLE, dy)
    got = [y, dx, TP.qkv_from_devices(dW_qkv, H, n), TP.qkv_from_devices(db_qkv, H, n), dW_proj, db_proj]
    assert_close(got, [want_y, *want], ["y", "dx", "dW_qkv", "db_qkv", "dW_proj", "db_proj"])


@settings(max_examples=min(4, settings().max_examples))
@given(n=DEVICES, group=st.sampled_from([1, 2]), kv_per_device=st.sampled_from([1, 2]), T=st.sampled_from([1, 6]),
       tile=st.sampled_from([None, 4]), seed=st.integers(0, 2**16))
def test_the_llamas_grouped_query_attention_split_by_heads_float64(n, group, kv_per_device, T, tile, seed):
    """Each device its query heads and the key/value heads their groups share, the Llama's own attention pair (rotary
    positions; plain or tiled) on them: against ``jax.vjp`` of :func:`jnnex.models.llama.attention_forward` on one
    device, output and every gradient tensor."""
    import jnnex.models.llama as L

    n_kv = n * kv_per_device
    H, hs = n_kv * group, 2
    C = H * hs
    k = jax.random.split(jax.random.key(seed), 4)
    x, dy = normal(k[0], 2, T, C), normal(k[1], 2, T, C)
    W_qkv, W_proj = normal(k[2], C, (H + 2 * n_kv) * hs) * C**-0.5, normal(k[3], C, C)
    want_y, want = vjp_of(lambda x, Wq, Wp: L.attention_forward(x, Wq, Wp, H, n_kv, tile)[0], dy, x, W_qkv, W_proj)
    y, (dx, dW_qkv, dW_proj) = split_run(
        lambda x, Wq, Wp: TP.llama_attention_forward(x, Wq, Wp, H, n_kv, tile), TP.llama_attention_backward, n,
        (x, TP.qkv_for_devices(W_qkv, H, n, n_kv), W_proj), (WHOLE, COLUMNS, ROWS), WHOLE, dy)
    got = [y, dx, TP.qkv_from_devices(dW_qkv, H, n, n_kv), dW_proj]
    assert_close(got, [want_y, *want], ["y", "dx", "dW_qkv", "dW_proj"])


def test_a_block_holds_two_all_reduces_of_BTC_forward_and_two_backward():
    """Megatron's count, read from the program: attention and MLP on 4 devices, forward and backward, hold exactly
    4 all-reduces, each of ``B·T·C`` numbers (the forward's outputs and the backward's ``dx``)."""
    B, T, C, H, n = 2, 8, 16, 4, 4
    k = jax.random.split(jax.random.key(0), 4)
    x = normal(k[0], B, T, C)

    def local(x, W_qkv, W_attproj, W_fc, W_fcproj):
        a, c_att = TP.attention_forward(x, W_qkv, None, W_attproj, None, n_head=H)
        m, c_mlp = TP.mlp_forward(a, W_fc, None, W_fcproj, None)
        da = TP.mlp_backward(jnp.cos(m), c_mlp)[0]
        return m, TP.attention_backward(da, c_att)[0]

    run = jax.shard_map(local, mesh=TP.model_mesh(n), in_specs=(WHOLE, COLUMNS, ROWS, COLUMNS, ROWS),
                        out_specs=(WHOLE, WHOLE))
    text = jax.jit(run).lower(x, normal(k[1], C, 3 * C), normal(k[2], C, C), normal(k[3], C, 4 * C),
                              normal(k[3], 4 * C, C)).as_text()
    # each op: "stablehlo.all_reduce"(%x) <{...}> ({ the sum region }) : (operand type) -> result type
    operands = re.findall(r'"stablehlo\.all_reduce".*?\}\) : \((tensor<[^>]*>)\)', text, flags=re.DOTALL)
    assert operands == [f"tensor<{B}x{T}x{C}xf64>"] * 4, operands


def test_a_split_that_does_not_divide_is_named():
    with pytest.raises(ValueError, match=r"n_head \(6\) must be divisible by the model axis \(4 devices\); it splits "
                                         r"over \[1, 2, 3, 6\]"):
        TP.qkv_for_devices(jnp.zeros((6, 18)), n_head=6, n=4)
    with pytest.raises(ValueError, match=r"n_kv_head \(2\) must be divisible by the model axis \(4 devices\)"):
        TP.qkv_for_devices(jnp.zeros((8, 16)), n_head=4, n=4, n_kv_head=2)
    with pytest.raises(ValueError, match="devices: the model axis needs 1 to 4 devices"):
        TP.model_mesh(5)


# ----------------------------------------------------------------------------------------------------------------------
# The whole GPT on a data × model mesh


SMALL_LLAMA = {"n_layer": 2, "n_embd": 16, "n_head": 4, "ffn_multiple": 4}  # SwiGLU 44 wide: 11 a device on 4


def gpt_problem(name="gpt", **over):
    from tests.test_parallel import float64_problem, model_and_data
    model, splits = model_and_data(name, **{"n_head": 4, **(SMALL_LLAMA if name == "llama" else {}), **over})
    params, state, x, y = float64_problem(model.with_gradients("manual"), splits)
    return model, params, x, y


@pytest.mark.parametrize("name,layout,data,model_axis", [
    ("gpt", {"tie": False, "bias": True}, 2, 2), ("gpt", {"tie": False, "bias": True}, 1, 4),
    ("gpt", {"tie": True, "bias": False}, 2, 2), ("gpt", {"tie": True, "bias": False}, 1, 4),
    ("llama", {"n_kv_head": 2, "tie": True}, 2, 2),  # grouped: each device 2 query heads and their 1 key/value head
    ("llama", {"n_kv_head": 4, "attention": "tiled", "tile": 4}, 1, 4),
], ids=["gpt-untied-biases-2x2", "gpt-untied-biases-1x4", "gpt-tied-2x2", "gpt-tied-1x4", "llama-gqa-tied-2x2",
        "llama-tiled-1x4"])
def test_the_split_step_on_a_data_by_model_mesh_equals_one_device_float64(name, layout, data, model_axis):
    """One AdamW step (weight decay, global-norm clipping) of the hand-written split model — rows along ``"data"``,
    heads and MLP columns along ``"model"``, the optimiser in the global view — against the same step of the unsplit
    model on one device: the loss, every new parameter and every Adam moment agree to 1e-12, per tensor; each device
    holds its ``1/M`` of every split weight. The GPT with and without biases and tying; the Llama grouped-query and
    tied, and with tiled attention."""
    from tests.test_parallel import rel_errors
    from jnnex.optim import TrainConfig, make_optimizer
    from jnnex.train import init_train_state, make_step

    model, params, x, y = gpt_problem(name, **layout)
    opt = make_optimizer(TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1, grad_clip=0.5))
    ts = init_train_state(model, opt, jax.random.key(0))
    ts = ts._replace(params=params, opt_state=jax.jit(opt.init)(params))
    one_step = jax.jit(make_step(model.with_gradients("manual"), opt))
    ts = one_step(ts, (x, y), None)[0]  # moments that are not zero
    want, m_want = one_step(ts, (x, y), None)

    mesh = TP.mesh_2d(data, model_axis)
    to_devices, to_host, layout_ = TP.train_layout(TP.split_of(model), opt, mesh, ts)
    step = jax.jit(TP.split_of(model).step(opt, mesh, ts.params), out_shardings=(layout_, None))
    from jnnex import parallel
    placed = parallel.place(to_devices(parallel.local(ts)), layout_)
    got, m_got = step(placed, jax.device_put((x, y), parallel.batch_sharded(mesh)), None)
    fc = got.params.blocks[0].fc.W
    assert {s.data.shape for s in fc.addressable_shards} == {(fc.shape[0], fc.shape[1] // model_axis)}
    got = to_host(parallel.local(got))
    np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=1e-12)
    assert max(rel_errors(got.params, want.params)) <= 1e-12
    assert max(rel_errors(got.opt_state, want.opt_state)) <= 1e-12


def test_the_split_gpt_step_all_reduces_megatrons_count():
    """Read from the lowered step on a 2 × 2 mesh: along ``"model"``, 4 all-reduces of the device's ``B_d·T·C`` per
    block (2 forward, 2 backward); along ``"data"``, the loss's and the gradients' sums. The same count as one
    block's test above, now for a whole model of 2 blocks."""
    model, params, x, y = gpt_problem()
    mesh = TP.mesh_2d(2, 2)
    f = TP.gpt_value_and_grad(model.cfg, mesh, params)
    text = jax.jit(f).lower(TP.gpt_for_devices(params, model.cfg, 2), x, y).as_text()
    operands = re.findall(r'"stablehlo\.all_reduce".*?\}\) : \((tensor<[^>]*>)\)', text, flags=re.DOTALL)
    B, T, C = x.shape[0] // 2, x.shape[1], model.cfg.n_embd
    assert operands.count(f"tensor<{B}x{T}x{C}xf64>") == 4 * model.cfg.n_layer, operands


def test_training_split_over_a_mesh_ends_where_one_device_does(tmp_path):
    """``fit(..., devices=4, model_parallel=2)`` for 20 steps (SGD with momentum: its state must move to the split
    layout and back), checkpointed, resumed to 40 on one device: where 40 steps on one device end — so the split
    steps were the unsplit ones, and the checkpoint holds the parameters (and momentum) in their own layout (a qkv
    momentum left in the devices' column order moves the resumed parameters by ~1e-2; float32 rounding of the
    split's other summation order, ~1e-6 after 40 steps)."""
    from tests.test_parallel import model_and_data, rel_errors
    from jnnex.optim import TrainConfig
    from jnnex.train import fit
    model, splits = model_and_data("gpt", n_head=4)
    short = TrainConfig(steps=20, eval_every=20, chunk=20, lr_boundaries=(), optimizer="momentum", lr=0.1)
    fit(model, splits.train, short, out=tmp_path / "r", progress=False, devices=4, model_parallel=2)
    resumed = fit(model, splits.train, short.with_steps(40), out=tmp_path / "r", resume=True, progress=False)
    whole = fit(model, splits.train, short.with_steps(40), progress=False)
    assert int(resumed.ts.step) == 40
    assert max(rel_errors(resumed.ts.params, whole.ts.params)) < 1e-5


def test_bad_tensor_parallel_settings_are_named():
    from tests.test_parallel import model_and_data
    from jnnex.optim import TrainConfig
    from jnnex.train import fit
    model, splits = model_and_data("gpt", n_head=2)
    tcfg = TrainConfig(steps=2, batch_size=8)
    with pytest.raises(ValueError, match=r"n_head \(2\) must be divisible by the model axis \(4 devices\)"):
        fit(model, splits.train, tcfg, progress=False, devices=4, model_parallel=4)
    rnn, rnn_splits = model_and_data("rnn")
    with pytest.raises(ValueError, match="model 'rnn' has no split across devices .* the models that have one: gpt, "
                                         "llama"):
        fit(rnn, rnn_splits.train, tcfg, progress=False, devices=4, model_parallel=2)
    with pytest.raises(ValueError, match=r"mesh: data 4 × model 2 = 8 devices, but only 4 exist"):
        fit(model, splits.train, tcfg, progress=False, devices=8, model_parallel=2)
    with pytest.raises(ValueError, match="give devices as a number that divides by it"):
        fit(model, splits.train, tcfg, progress=False, devices=3, model_parallel=2)
    with pytest.raises(ValueError, match="FSDP × tensor parallel"):
        fit(model, splits.train, tcfg, progress=False, devices=4, model_parallel=2, shard_params=True)
    odd, odd_splits = model_and_data("llama", **{**SMALL_LLAMA, "ffn_multiple": 2})  # SwiGLU 42 wide
    with pytest.raises(ValueError, match=r"the SwiGLU width \(42\) must be divisible by the model axis \(4 devices\)"):
        fit(odd, odd_splits.train, tcfg, progress=False, devices=4, model_parallel=4)
    dropout, d_splits = model_and_data("gpt", n_head=2, dropout=0.1)
    with pytest.raises(ValueError, match="trains without dropout"):
        fit(dropout, d_splits.train, tcfg, progress=False, devices=2, model_parallel=2)
