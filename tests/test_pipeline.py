"""Pipeline parallelism (jnnex.pipeline): the schedules as tables, and the pipelined gradients equal to one device's,
per tensor, in float64 — on the stage axis alone and with data and tensor parallelism beside it."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jnnex.pipeline as PP
import jnnex.tensor_parallel as TP
from jnnex.layout import Parallel
from jnnex.lm import grouped_objective, manual_gradients
from jnnex.memory import nbytes
from jnnex.models import gpt as G, llama as L


# ----------------------------------------------------------------------------------------------------------------------
# The schedules


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["gpipe", "1f1b", "alternating"]), P=st.integers(1, 6), M=st.integers(1, 12),
       parts=st.sampled_from([1, 1, 2, 3]))
def test_a_schedule_does_each_forward_and_backward_once_in_order_with_the_bubble_of_the_formula(name, P, M, parts):
    """Each forward once and each backward in ``parts`` ticks (its parts in order, on its stage), after what it
    needs; the ticks and the bubble of the formula (a backward's part one tick); 1F1B holds at most P − s."""
    parts = 1 if name == "alternating" else parts  # (its backward is one tick: refused otherwise, below)
    sched = PP.schedule(name, P, M, parts)
    first, last = {}, {}  # (action, stage): its first tick, its last
    seen: dict = {}
    for t, row in enumerate(sched.table):
        for s, action in enumerate(row):
            if action is None:
                continue
            seen[(action, s)] = seen.get((action, s), 0) + 1
            assert seen[(action, s)] <= (parts if action[0] == "B" else 1), f"stage {s} did {action} too often"
            first.setdefault((action, s), t)
            last[(action, s)] = t
    assert all(n == (parts if a[0] == "B" else 1) for (a, _), n in seen.items()) and len(seen) == 2 * P * M
    for s in range(P):
        for m in range(M):
            F, B = first[(("F", m), s)], first[(("B", m), s)]
            assert F < B
            if s > 0:
                assert last[(("F", m), s - 1)] < F, "a forward before its input arrived"
            if s < P - 1:
                assert last[(("B", m), s + 1)] < B, "a backward before its gradient arrived"
            assert sched.tick_of("B", s, m) == B and sched.end_of("B", s, m) == last[(("B", m), s)]
    held = [sched.held(s) for s in range(P)]
    if name == "alternating":  # forwards at even ticks, backwards at odd; 2 (P - 1 - s) + 1 in flight
        assert all(a is None or (a[0] == "F") == (t % 2 == 0) for t, row in enumerate(sched.table) for a in row)
        assert sched.ticks == 2 * (M + 2 * P - 2) and held == [min(2 * (P - 1 - s) + 1, M) for s in range(P)]
    else:
        assert sched.ticks == (1 + parts) * (M + P - 1)
        assert sched.bubble == pytest.approx((P - 1) / (M + P - 1), abs=1e-12)
    if name == "gpipe":
        assert held[0] == M
    elif name == "1f1b":
        assert all(h <= min(P - s, M) for s, h in enumerate(held)), held
    assert sched.slots[0] == max(held)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["gpipe", "1f1b", "alternating"]), P=st.integers(1, 5), M=st.integers(1, 10),
       F=st.floats(0.1, 10), B=st.floats(0.1, 10), extra=st.floats(0, 5), parts=st.sampled_from([1, 1, 2]))
def test_the_replays_bubbles_in_lockstep_and_not(name, P, M, F, B, extra, parts):
    """With equal stages, a schedule replayed as devices that each run their own program (no lockstep) idles the
    formula's fraction, whatever the forward and backward take; so does jnnex's lockstep program (a tick as long as
    the slowest of a stage and its neighbours) running GPipe or the alternating schedule — but not 1F1B, whose ticks
    pair one stage's forward with its neighbour's backward (or its backward's part). A lockstep replay is never
    faster, and a slower last stage (the head, ``extra``) never shortens either."""
    parts = 1 if name == "alternating" else parts
    sched, formula = PP.schedule(name, P, M, parts), (P - 1) / (M + P - 1)
    bubble = {}
    for lockstep in (False, True):
        makespan, busy = sched.replay([F] * P, [B] * P, lockstep=lockstep)
        assert busy == pytest.approx([M * (F + B)] * P)
        bubble[lockstep] = 1 - sum(busy) / (P * makespan)
        uneven = sched.replay([F] * (P - 1) + [F + extra], [B] * P, lockstep=lockstep)[0]
        assert uneven >= makespan - 1e-9
    assert bubble[False] == pytest.approx(formula, abs=1e-9)
    assert bubble[True] >= bubble[False] - 1e-9
    if name != "1f1b":
        assert bubble[True] == pytest.approx(formula, abs=1e-9)
    elif parts == 1 and P > 1 and abs(F - B) > 0.1 and (M > 2 or (M == 2 and B > F)):
        assert bubble[True] > formula + 1e-6  # (M = 2 with a forward the longer: no steady state to pay for it)


@pytest.mark.parametrize("P, M", [(2, 8), (4, 4), (4, 8), (3, 7)])
def test_1f1b_with_its_backward_in_two_ticks_keeps_the_formulas_bubble_in_lockstep_and_holds_p(P, M):
    """A backward twice a forward, cut into two ticks of a forward's length: jnnex's lockstep program runs 1F1B at
    the formula's bubble (in one tick, 1 − 8·3 / (2 + 16·2) at P = 2, M = 8) and still holds P − s micro-batches."""
    whole, halves = PP.schedule("1f1b", P, M), PP.schedule("1f1b", P, M, parts=2)
    formula = (P - 1) / (M + P - 1)
    for sched, want in ((whole, None), (halves, formula)):
        makespan, busy = sched.replay([1.0] * P, [2.0] * P, lockstep=True)
        if want is not None:
            assert 1 - sum(busy) / (P * makespan) == pytest.approx(want, abs=1e-12)
        else:
            assert 1 - sum(busy) / (P * makespan) > formula + 0.05
    assert [halves.held(s) for s in range(P)] == [whole.held(s) for s in range(P)] == [min(P - s, M) for s in range(P)]
    assert halves.slots == whole.slots and halves.label == "1f1b/2" and whole.label == "1f1b"


def test_a_backward_cut_in_ticks_is_refused_where_it_cannot_be():
    with pytest.raises(ValueError, match=r"the alternating schedule's backward takes one tick .* got parts 2"):
        PP.schedule("alternating", 2, 4, 2)
    with pytest.raises(ValueError, match=r"a backward's ticks \(parts\) must be an integer >= 1, got 0"):
        PP.schedule("1f1b", 2, 4, 0)
    model = tiny_gpt()  # 4 blocks on 2 stages: 2 a stage, which 3 ticks cannot share
    with pytest.raises(ValueError, match=re.escape("a backward's ticks (3) must divide each stage's blocks (2 = "
                                                   "n_layer 4 / 2 stages)")):
        PP.pipeline_value_and_grad(model, PP.mesh_3d(1, 2), PP.schedule("1f1b", 2, 2, 3), model.init(
            jax.random.key(0))[0])


def test_jnnex_s_lockstep_program_idles_in_1f1b_where_the_alternating_schedule_does_not():
    """P = 2, M = 8, a backward twice a forward: 1F1B's lockstep ticks last a backward each in the steady state
    (a bubble of 1 - 8·3 / (2 + 16·2), not 1/9); the alternating schedule's last the forward or the backward."""
    f1b, alt = PP.schedule("1f1b", 2, 8), PP.schedule("alternating", 2, 8)
    makespan, busy = f1b.replay([1.0, 1.0], [2.0, 2.0], lockstep=True)
    assert makespan == 2 * 1 + 16 * 2 and 1 - sum(busy) / (2 * makespan) == pytest.approx(1 - 48 / 68)
    assert alt.replay([1.0, 1.0], [2.0, 2.0], lockstep=True)[0] == (8 + 1) * 3
    assert [alt.held(s) for s in range(2)] == [3, 1] and alt.slots[0] == 3


def test_1f1b_holds_p_micro_batches_where_gpipe_holds_m():
    gpipe, f1b = PP.schedule("gpipe", 4, 8), PP.schedule("1f1b", 4, 8)
    assert [gpipe.held(s) for s in range(4)] == [8, 8, 8, 8]
    assert [f1b.held(s) for s in range(4)] == [4, 3, 2, 1]
    assert gpipe.slots[0] == 8 and f1b.slots[0] == 4
    assert f1b.draw().splitlines()[3].split()[2:6] == ["·", "·", "·", "F0"]
    assert f1b.draw().splitlines()[3].split()[6:8] == ["B0", "F1"]  # the last stage: one forward, one backward


# ----------------------------------------------------------------------------------------------------------------------
# The pipelined gradients against one device's


def f64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def pipelined(model, params, x, y, name, data, stages, model_axis, micro, parts=1):
    mesh = PP.mesh_3d(data, stages, model_axis)
    host = params
    if model_axis > 1:
        host = jax.tree.map(lambda fn, a: fn(a), TP.layout(model, params, model_axis), params)
    vg = jax.jit(PP.pipeline_value_and_grad(model, mesh, PP.schedule(name, stages, micro, parts), params))
    loss, grads = vg(PP.stack_blocks(host), x, y)
    grads = PP.unstack_blocks(grads, model.cfg.n_layer)
    if model_axis > 1:
        grads = jax.tree.map(lambda fn, a: fn(a), TP.layout(model, params, model_axis, inverse=True), grads)
    return loss, grads


def assert_equal_per_tensor(got, want, atol=1e-12):
    paths = jax.tree_util.tree_leaves_with_path(want)
    for (path, w), g in zip(paths, jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))
    assert len(jax.tree.leaves(got)) == len(paths)


def tiny_gpt(**kw):
    return G.gpt(G.GPTConfig(**{"vocab_size": 11, "block_size": 8, "n_layer": 4, "n_head": 2, "n_embd": 16, **kw}))


def tiny_llama(**kw):
    return L.llama(L.LlamaConfig(**{"vocab_size": 11, "block_size": 8, "n_layer": 4, "n_head": 4, "n_kv_head": 2,
                                    "n_embd": 16, **kw}))


def batch(B=8, T=8, V=11):
    x = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    y = jax.random.randint(jax.random.key(2), (B, T), -1, V)  # some ignored targets: micro-batches count unequally
    return x, y


@pytest.mark.parametrize("model_name, kw, name, mesh, micro", [
    ("gpt", {"tie": True}, "gpipe", (1, 4, 1), 4),  # a tied table: its gradient from the first and last stage, added
    ("gpt", {"bias": False}, "1f1b", (2, 2, 1), 2),
    ("llama", {}, "1f1b", (1, 2, 2), 4),  # stages × tensor parallel
    ("llama", {"recompute": "blocks"}, "gpipe", (1, 2, 1), 2),
    ("gpt", {}, "alternating", (1, 4, 1), 8),  # stage 0 holding 7 micro-batches, forwards and backwards in turn
    ("gpt", {"tie": True, "n_layer": 8, "parts": 2}, "1f1b", (2, 2, 1), 2),  # each backward in 2 ticks of 2 blocks
    ("llama", {"parts": 2}, "gpipe", (1, 2, 2), 4),  # the backward's halves × tensor parallel
])
def test_the_pipelined_gradients_equal_one_devices_per_tensor_in_float64(model_name, kw, name, mesh, micro):
    kw = dict(kw)
    parts = kw.pop("parts", 1)
    model = (tiny_gpt if model_name == "gpt" else tiny_llama)(**kw)
    params = f64(model.init(jax.random.key(0))[0])
    x, y = batch()
    want = jax.jit(lambda p: manual_gradients(model, p, (), x, y))(params)  # (one program, not op by op)
    loss, grads = pipelined(model, params, x, y, name, *mesh, micro, parts)
    np.testing.assert_allclose(loss, want.loss, rtol=0, atol=1e-13)
    assert_equal_per_tensor(grads, want.grads)


@pytest.mark.parametrize("kw, name, mesh, micro", [
    ({}, "1f1b", (2, 2, 1), 2),  # dropless: data 2 × stage 2, 4 row groups
    ({"expert_capacity": 0.5, "expert_top_k": 1, "tie": True}, "gpipe", (1, 4, 1), 4),  # tokens dropped in each group
    ({"recompute": "blocks"}, "1f1b", (1, 2, 1), 4),
    ({}, "1f1b", (1, 2, 2), 2),  # stages × tensor parallel: the attention split, the experts replicated on the axis
])
def test_a_pipelined_mixture_of_experts_equals_one_device_running_each_micro_batch(kw, name, mesh, micro):
    """With experts, a pipeline trains each (data shard, micro-batch)'s routing, capacity and balancing loss, the
    balancing losses averaged (Megatron-LM's objective: under 1F1B a backward starts before the batch's last forward):
    equal, per tensor in float64, to ``jax.grad`` of :func:`jnnex.lm.grouped_objective` on one device."""
    model = tiny_llama(n_expert=4, aux_weight=0.5, **kw)
    params = f64(model.init(jax.random.key(0))[0])
    x, y = batch()
    groups = mesh[0] * micro
    # (the one-device references each compiled as one program, not run an eager op at a time)
    want_loss, want = jax.jit(jax.value_and_grad(lambda p: grouped_objective(model, p, (), x, y, groups)))(params)
    loss, grads = pipelined(model, params, x, y, name, *mesh, micro)
    np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-13)
    assert_equal_per_tensor(grads, want)
    whole = jax.jit(lambda p: model.objective(p, (), x, y)[0])(params)  # (the whole batch's loss: another objective)
    assert abs(float(whole) - float(want_loss)) > 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# The host-driven runtime: each stage's programs on its own device


@pytest.mark.parametrize("model_name, kw, name, P, M", [
    ("gpt", {"tie": True}, "1f1b", 2, 4),  # a tied table: the embedding's sum (device 0) and the head's (device 1)
    ("gpt", {}, "gpipe", 4, 2),
    ("llama", {"n_expert": 4, "aux_weight": 0.5, "expert_capacity": 0.5, "expert_top_k": 1, "recompute": "blocks"},
     "alternating", 2, 4),  # each micro-batch's routing, dropped tokens and balancing loss; the blocks recomputed
])
def test_the_host_driven_runtime_equals_one_device_per_tensor_and_holds_what_its_schedule_holds(model_name, kw, name,
                                                                                                P, M):
    """Each stage's programs on its own device, dispatched by the host in the schedule's order: the loss and every
    gradient equal one device's in float64 (with experts: :func:`jnnex.lm.grouped_objective` over the micro-batches);
    after each action a stage holds the caches of the micro-batches it has run forward and not yet backward — its
    own arrays, summed — and at most what the schedule says (1F1B: P − s)."""
    model = (tiny_gpt if model_name == "gpt" else tiny_llama)(**kw)
    params = f64(model.init(jax.random.key(0))[0])
    x, y = batch()
    if "n_expert" in kw:
        want_loss, want = jax.jit(jax.value_and_grad(lambda p: grouped_objective(model, p, (), x, y, M)))(params)
    else:
        manual = jax.jit(lambda p: manual_gradients(model, p, (), x, y))(params)
        want_loss, want = manual.loss, manual.grads
    sched, trace = PP.schedule(name, P, M), []
    loss, grads = PP.host_value_and_grad(model, sched)(params, x, y, trace=trace)
    np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-13)
    assert_equal_per_tensor(grads, want)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    # what one micro-batch's caches of a stage's blocks weigh, from shapes (the runtime's arrays are summed below)
    Lp, h = model.cfg.n_layer // P, jax.ShapeDtypeStruct((x.shape[0] // M, x.shape[1], model.cfg.n_embd), jnp.float64)
    blocks = PP.stack_blocks(params._replace(blocks=params.blocks[:Lp])).blocks
    one = nbytes(jax.eval_shape(lambda b, h: PP.run_stage(model.pipe, model.cfg, b, h, 0)[1][0], blocks, h))
    assert [r["stage"] for r in trace] == [s for row in sched.table for s, a in enumerate(row) if a is not None]
    open_ = [0] * P
    for r in trace:
        open_[r["stage"]] += 1 if r["kind"] == "F" else -1
        assert r["held_bytes"] == open_[r["stage"]] * one and r["seconds"] > 0
    assert [max(r["held_bytes"] for r in trace if r["stage"] == s) for s in range(P)] == [
        sched.held(s) * one for s in range(P)]


def test_the_host_driven_runtime_refuses_what_it_cannot_run():
    model = tiny_gpt()
    params, _ = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"the host-driven runtime runs each backward whole, got 1f1b/2"):
        PP.host_value_and_grad(model, PP.schedule("1f1b", 2, 2, 2))
    with pytest.raises(ValueError, match=r"4 stages need 4 devices, got 2 .*JAX_NUM_CPU_DEVICES=4"):
        PP.host_value_and_grad(model, PP.schedule("1f1b", 4, 2), jax.devices()[:2])
    with pytest.raises(ValueError, match=r"the stages \(3\) must divide the blocks \(n_layer 4\)"):
        PP.host_value_and_grad(model, PP.schedule("1f1b", 3, 2))
    with pytest.raises(ValueError, match=r"the micro-batches \(3\) must divide the batch's rows \(8\)"):
        PP.host_value_and_grad(model, PP.schedule("1f1b", 2, 3))(params, *batch())
    with pytest.raises(ValueError, match=r"takes the parameters' own tree .* got stacked blocks"):
        PP.host_value_and_grad(model, PP.schedule("1f1b", 2, 2))(PP.stack_blocks(params), *batch())


def test_layout_moves_a_training_state_to_the_stages_and_back_unchanged():
    from jnnex.step import init_train_state
    model = tiny_llama()
    opt = optax.adamw(1e-3)
    ts = init_train_state(model, opt, jax.random.key(0))
    to_devices, to_host, shardings = PP.train_layout(model, opt, PP.mesh_3d(1, 2, 2), ts)
    dev = to_devices(ts)
    assert dev.params.blocks.qkv.W.shape[0] == 4  # stacked: (n_layer, C, q + k + v)
    assert jax.tree.structure(dev) == jax.tree.structure(shardings)
    back = to_host(dev)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ts)):
        np.testing.assert_array_equal(a, b)


def test_the_optimiser_sees_each_block_as_on_one_device():
    """Per block: a weight-decay mask by rank (gains stacked are matrices, and must not decay) and a global-norm clip
    give the one-device update."""
    from jnnex.optim import matrices_only
    model = tiny_gpt()
    params = model.init(jax.random.key(0))[0]
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.5, mask=matrices_only))
    wrapped = PP.per_block(opt, model.cfg.n_layer)
    stacked = PP.stack_blocks(params)

    @jax.jit  # (each update one compiled program, not an eager op at a time)
    def both(grads, params, stacked):
        with jax.numpy_dtype_promotion("standard"):  # (optax's, as the step runs it)
            want, _ = opt.update(grads, opt.init(params), params)
            got, _ = wrapped.update(PP.stack_blocks(grads), wrapped.init(stacked), stacked)
        return want, got

    want, got = both(grads, params, stacked)
    assert_equal_per_tensor(PP.unstack_blocks(got, model.cfg.n_layer), want, atol=0)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_each_stage_updates_its_own_blocks_as_one_device_updates_them(optimizer):
    """The step's optimiser on data 2 × stage 2, each device on its stage's blocks (:func:`jnnex.pipeline.stage_update`):
    a global-norm clip that bites (the norm summed over the stages), AdamW's weight decay masked by rank, Muon's
    per-matrix step — the one-device update and state, per tensor, in float64; and XLA's program sends nothing but
    the clip's one number."""
    from jnnex.optim import TrainConfig, make_optimizer
    from jnnex.plan import hlo_collectives
    model = tiny_gpt()
    params = f64(model.init(jax.random.key(0))[0])
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape, p.dtype), params)
    opt = make_optimizer(TrainConfig(optimizer=optimizer, lr=1e-2, grad_clip=0.5))

    @jax.jit
    def one_device(grads, params):
        with jax.numpy_dtype_promotion("standard"):
            state = opt.update(grads, opt.init(params), params)[1]  # (a second step: moments that are not zero)
            return state, opt.update(grads, state, params)

    state, (want, want_state) = one_device(grads, params)
    mesh = PP.mesh_3d(2, 2, 1)
    stacked = [PP.stack_blocks(t) for t in (grads, state, params)]
    update = jax.jit(PP.stage_update(model, opt, mesh, params)).lower(*stacked).compile()
    got, got_state = update(*stacked)
    assert_equal_per_tensor(PP.unstack_blocks(got, model.cfg.n_layer), want, atol=1e-15)
    assert_equal_per_tensor(PP.unstack_blocks(got_state, model.cfg.n_layer), want_state, atol=1e-15)
    assert [(f["op"], f["bytes"]) for f in hlo_collectives(update.as_text(), mesh)] == [("all-reduce", 8)]


def test_a_pipelined_run_checkpoints_and_resumes_where_one_device_ends(tmp_path):
    """``fit(..., parallel=Parallel("pp", 4, stages=2, micro_batches=2))`` (data 2 × stage 2) for 20 steps with
    momentum (its state must go to the stacked layout and back), checkpointed, resumed to 40 on one device: where 40
    steps on one device end (float32 rounding of the micro-batches' other summation order, ~1e-6)."""
    from tests.runfiles import fit_resumed, fit_saved
    from tests.test_parallel import model_and_data, rel_errors
    from jnnex.optim import TrainConfig
    from jnnex.train import fit
    model, splits = model_and_data("gpt", n_head=4)
    short = TrainConfig(steps=20, eval_every=20, chunk=20, lr_boundaries=(), optimizer="momentum", lr=0.1)
    fit_saved(model, splits.train, short, tmp_path / "r", parallel=Parallel("pp", 4, stages=2, micro_batches=2))
    resumed = fit_resumed(model, splits.train, short.with_steps(40), tmp_path / "r")
    whole = fit(model, splits.train, short.with_steps(40))
    assert int(resumed.ts.step) == 40
    assert max(rel_errors(resumed.ts.params, whole.ts.params)) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Named errors


@pytest.mark.parametrize("kwargs, message", [
    ({"stages": 3, "micro_batches": 2}, "the stages (3) must divide the blocks (n_layer 4)"),
    ({"stages": 2, "micro_batches": 0}, "micro-batches must be an integer >= 1, got 0"),
    ({"stages": 2, "micro_batches": 2, "schedule": "zigzag"},
     "the schedule must be one of gpipe, 1f1b, alternating, got 'zigzag'"),
    ({"stages": 2}, "give both"),
    ({"stages": 4, "micro_batches": 2, "model_parallel": 2}, "devices (4) must be a number that divides by stages × "
                                                             "model_parallel (4 × 2)"),
])
def test_bad_pipelines_are_named(kwargs, message):
    from jnnex.layout import make_layout
    model = tiny_gpt()
    with pytest.raises(ValueError, match=re.escape(message)):
        par = Parallel("pp", 4, **kwargs)
        make_layout(par, model, optax.sgd(0.1), init_state(model))


def init_state(model):
    from jnnex.step import init_train_state
    return init_train_state(model, optax.sgd(0.1), jax.random.key(0))


def test_a_pipeline_refuses_dropout_a_model_without_stages_and_a_batch_its_micro_batches_do_not_divide():
    from jnnex.layout import make_layout
    from jnnex.models.registry import build
    with pytest.raises(ValueError, match=r"dropout \(0.1\) is not pipelined yet"):
        make_layout(Parallel("pp", 2, stages=2, micro_batches=2), tiny_gpt(dropout=0.1), optax.sgd(0.1),
                    init_state(tiny_gpt()))
    mlp = build("mlp", vocab_size=27)
    with pytest.raises(ValueError, match="model 'mlp' is not cut into stages"):
        make_layout(Parallel("pp", 2, stages=2, micro_batches=2), mlp, optax.sgd(0.1), init_state(mlp))
    model = tiny_gpt()
    layout = make_layout(Parallel("pp", 4, stages=2, micro_batches=4), model, optax.sgd(0.1), init_state(model))
    with pytest.raises(ValueError, match=r"the micro-batches \(4\) must divide each data shard's rows \(6 of the "
                                         r"batch_size's 12\).*data 2 × micro-batches 4 = 8"):
        layout.check(init_state(model), 12, 1000, "training")
    with pytest.raises(ValueError, match="--shard-params and --stages together"):
        Parallel.from_flags(devices=4, shard_params=True, stages=2, micro_batches=2)
    with pytest.raises(ValueError, match="--parallel tp and --stages"):
        Parallel.from_flags(devices=4, model_parallel=2, scheme="tp", stages=2, micro_batches=2)
    with pytest.raises(ValueError, match="stages, micro_batches belong to the pipeline"):
        Parallel("dp", 4, stages=2, micro_batches=2)


def test_a_run_on_a_data_x_stage_x_model_mesh_of_8_devices_ends_where_one_device_does(tmp_path):
    """``jnnex train --devices 8 --stages 2 --model-parallel 2 --micro-batches 2`` (data 2 × stage 2 × model 2, in a
    child with 8 CPU devices: the suite's processes have 4) against the same run on one device: the same parameters,
    tensor for tensor, to float32's rounding of the other summation order. SGD with momentum, as the tensor-parallel
    test: under Adam a key bias (its exact gradient is 0: softmax ignores a shift of every score) moves by the
    rounding noise normalised to a full step: 7e-4 of its size after 30 steps."""
    import subprocess
    import sys

    from tests.test_parallel import child_env, rel_errors
    common = ["--model", "gpt", "--n-layer", "4", "--steps", "30", "--eval-every", "30", "--batch-size", "16",
              "--backward", "manual", "--optimizer", "momentum", "--lr", "0.1", "--json"]
    runs = {"one": [], "mesh": ["--devices", "8", "--stages", "2", "--model-parallel", "2", "--micro-batches", "2"]}
    procs = {tag: subprocess.Popen([sys.executable, "-m", "jnnex", "train", *common, *extra, "--out",
                                    str(tmp_path / tag)], env=child_env(8 if extra else 1), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for tag, extra in runs.items()}
    for tag, proc in procs.items():
        out, _ = proc.communicate()
        assert proc.returncode == 0, out
    meta = json.loads((tmp_path / "mesh" / "metrics.json").read_text())
    assert {k: meta[k] for k in ("parallel", "devices", "stages", "model_parallel", "micro_batches",
                                 "pipeline_schedule")} == {"parallel": "pp", "devices": 8, "stages": 2,
                                                           "model_parallel": 2, "micro_batches": 2,
                                                           "pipeline_schedule": "1f1b"}
    one, mesh = (np.load(tmp_path / tag / "model.npz") for tag in runs)
    assert sorted(one.files) == sorted(mesh.files)
    assert max(rel_errors([mesh[k] for k in one.files], [one[k] for k in one.files])) < 1e-5
