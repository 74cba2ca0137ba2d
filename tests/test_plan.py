"""The memory plan (:mod:`jnnex.plan`, ``jnnex plan``): its per-device bytes against the arrays' own sizes, against
:mod:`jnnex.memory`'s estimate of the unsplit model, and against XLA's memory analysis of the compiled step (the
parameters and AdamW's state, per device, to the byte); the command and its errors. The suite's processes have 4
CPU devices (``conftest.py``)."""

import json

import jax
import pytest

from jnnex import plan as PL
from jnnex.cli import main
from jnnex.lm import count_params
from jnnex.memory import training_estimate
from jnnex.optim import TrainConfig, make_optimizer


@pytest.fixture(scope="module")
def small():
    return PL.build_model("gpt", "shakespeare-cpu", vocab_size=64, block_size=32)  # 4 heads, n_embd 128


def test_the_plan_divides_what_each_scheme_splits(small):
    n = count_params(jax.eval_shape(lambda k: small.init(k)[0], jax.random.key(0)))
    dp, fsdp, tp = (PL.plan(small, s, 4) for s in ("dp", "fsdp", "tp"))
    assert dp.params == dp.grads == 4 * n and dp.gathered == 0
    assert 0 <= dp.optimizer - 8 * n <= 16  # AdamW's two float32 moments, and its step counts
    assert fsdp.params < dp.params / 3.9  # every tensor of this GPT but the 128-wide vectors splits by 4
    assert fsdp.gathered == 2 * (dp.params - fsdp.params)
    matrices = 4 * 12 * 128 * 128  # 4 blocks of qkv + attproj + fc + fcproj: 12 C² each (no biases in this preset)
    assert dp.params - tp.params == 4 * matrices * 3 // 4  # float32, each device keeping a quarter
    assert tp.activations < dp.activations and (tp.data, tp.model) == (1, 4)


def test_the_unsplit_activations_are_the_forwards_caches(small):
    """With one device on the model axis the plan's activations are :mod:`jnnex.memory`'s estimate of the model's
    forward to the byte, less the per-block outputs that forward also keeps (for diagnostics)."""
    est = training_estimate(small, make_optimizer(TrainConfig(optimizer="adamw")), 4, 10)
    cfg = small.cfg
    assert PL.plan(small, "dp", 1, batch=4).activations + 4 * cfg.n_layer * 4 * cfg.block_size * cfg.n_embd \
        == est.activations


@pytest.mark.parametrize("scheme,devices,optimizer", [  # (AdamW on dp, fsdp and tp over 4: the every-scheme test)
    ("tp", 2, "adamw"), ("fsdp", 4, "sgd"), ("tp", 2, "sgd"), ("fsdp", 4, "muon"), ("tp", 2, "muon"),
])
def test_the_resident_bytes_are_xlas_arguments(small, scheme, devices, optimizer):
    """The plan's parameters + optimiser state per device against XLA's argument bytes of the compiled step (which
    also hold the batch's tokens and the step counters): equal to within those — for AdamW (two moments), SGD (no
    state) and Muon (a momentum per matrix, AdamW's moments for the rest), the state read from each optimiser."""
    opt = make_optimizer(TrainConfig(optimizer=optimizer))
    p = PL.plan(small, scheme, devices, batch=2, optimizer=opt)
    xla = PL.xla_check(small, scheme, devices, batch=2, optimizer=opt)
    batch_bytes = 2 * 4 * 2 * p.data * small.block_size // p.data  # x and y, int32, this device's rows
    assert 0 <= xla["arguments"] - (p.params + p.optimizer) <= batch_bytes + 64
    assert xla["temporaries"] > 0
    if optimizer == "sgd":
        assert p.optimizer <= 16  # (a step count at most)


def test_a_collective_in_nested_loops_counts_each_time_it_runs():
    """A program's text by hand: an all-reduce in a loop of 3 inside a loop of 5 runs 15 times a call, one in a
    branch of the outer loop's body 5 times, one at the top once."""
    from jnnex.parallel import data_mesh
    text = """HloModule m, entry_computation_layout={()->f32[]}

%inner_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar.0 = f32[4]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
}

%branch (q: f32[2]) -> f32[2] {
  %ar.1 = f32[2]{0} all-reduce(%q), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
}

%outer_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %w.0 = (s32[], f32[4]) while(%p), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %c.0 = f32[2]{0} conditional(%i, %q), branch_computations={%branch, %other}
}

ENTRY %main (a: f32[8]) -> f32[] {
  %w.1 = (s32[], f32[4]) while(%t), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"5"}}
  %ar.2 = f32[8]{0} all-reduce(%a), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
}
"""
    found = PL.hlo_collectives(text, data_mesh(4))
    assert [(f["bytes"], f["times"]) for f in found] == [(16, 15), (8, 5), (32, 1)]
    assert PL.collective_bytes(found) == 16 * 15 + 8 * 5 + 32


def test_every_scheme_compiles_and_its_collectives_are_counted():
    """``plan --check`` on 4 devices for every scheme that trains: the step ``fit`` runs, compiled from shapes. Its
    resident bytes are the plan's; the bytes its collectives produce in one step (a loop's counted each tick) are the
    formula's for dp (a tied table's two gradients all-reduced apiece), tp, ep and pp (the sends of every tick, the
    gradients' all-reduces, and nothing for the optimiser, which updates each stage's own blocks). FSDP's global-view
    step all-reduces the gradients where the formula reduce-scatters them: more than its formula, never less (the
    loss's and counters' scalars aside, 1 kB)."""
    gpt = PL.build_model("gpt", "shakespeare-cpu", vocab_size=64, block_size=16, n_layer=2, tie=True)
    llama = PL.build_model("llama", "shakespeare-cpu", vocab_size=64, block_size=16, n_layer=1, n_expert=4,
                           expert_top_k=2)
    cases = [(gpt, "dp", {}), (gpt, "fsdp", {}), (gpt, "tp", {}), (gpt, "pp", {"stages": 2, "micro_batches": 2}),
             (gpt, "pp", {"stages": 2, "micro_batches": 4, "schedule": "alternating"}),
             (llama, "ep", {}), (llama, "tp", {"model_parallel": 2})]
    for model, scheme, kw in cases:
        p = PL.plan(model, scheme, 4, batch=4, **kw)
        xla = PL.xla_check(model, scheme, 4, batch=4, **kw)
        formula = p.comm_jnnex or p.comm
        assert xla["comm"] >= formula and 0 <= xla["arguments"] - (p.params + p.optimizer) <= 2 * 4 * 4 * 16 + 64
        if scheme != "fsdp":
            assert xla["comm"] - formula <= 1024, (scheme, xla["comm"], formula)


def test_the_planned_optimiser_state_is_the_optimisers_own(small):
    """SGD plans no state, Muon less than AdamW (one momentum for each matrix where AdamW keeps two moments),
    AdamW twice the parameters; the command names the optimiser it planned."""
    sizes = {name: PL.plan(small, "dp", 4, optimizer=make_optimizer(TrainConfig(optimizer=name))).optimizer
             for name in ("sgd", "adamw", "muon")}
    params = PL.plan(small, "dp", 4).params
    assert sizes["sgd"] <= 16 and params < sizes["muon"] < sizes["adamw"] and sizes["adamw"] >= 2 * params


def test_the_command_prints_the_schemes_asked_for_and_the_family(capsys):
    assert main(["plan", "--preset", "shakespeare-cpu", "--vocab-size", "64", "--devices", "4", "--json",
                 "--parallel", "fsdp", "--parallel", "fsdp+tp"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["scheme"] for r in out["rows"]] == ["fsdp", "fsdp+tp"]
    assert [r["mesh"] for r in out["rows"]] == ["4 x 1", "2 x 2"]
    assert all(r["total_GB"] > 0 for r in out["rows"])
    assert [r["scheme"] for r in out["family"]] == ["fsdp", "fsdp+tp"]


def test_the_command_plans_expert_parallelism_alone(capsys):
    """``--parallel ep`` alone: its table, and no family table (the family is dense GPTs; an empty one used to stop
    the command with "'int' object is not iterable")."""
    assert main(["plan", "--model", "llama", "--preset", "mixtral-8x7b", "--vocab-size", "64", "--block", "16",
                 "--devices", "4", "--parallel", "ep"]) == 0
    out = capsys.readouterr().out
    assert "| ep " in out and "The largest of the GPT-2/GPT-3 shapes" not in out


def test_the_llamas_tensor_parallel_split_divides_its_swiglu_width_too(capsys):
    """The Llama's CPU recipe (4 heads, SwiGLU 342 wide: 2 · 3² · 19) on 8 devices: its heads allow a model axis of
    4, its SwiGLU width only 2 — the default split of `jnnex plan` (every scheme) is 2, not an error for 4."""
    llama = PL.build_model("llama", "shakespeare-cpu", vocab_size=64)
    assert llama.cfg.hidden == 342 and PL.widest_split(llama, 8) == 2
    assert PL.widest_split(PL.build_model("gpt", "shakespeare-cpu", vocab_size=64), 8) == 4
    assert main(["plan", "--model", "llama", "--preset", "shakespeare-cpu", "--vocab-size", "64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["scheme"], r["mesh"]) for r in rows] == [("dp", "8 x 1"), ("fsdp", "8 x 1"), ("tp", "4 x 2"),
                                                        ("fsdp+tp", "4 x 2"), ("pp", "2 x 4 stages")]


def test_the_gpt2_plan_and_the_largest_that_fits():
    """GPT-2 small on 8 devices, data parallel: 124,475,904 float32 parameters each (0.498 GB), their gradients, two
    moments; the shape family's largest that fits is larger under FSDP than under plain data parallelism."""
    gpt2 = PL.build_model()
    dp = PL.plan(gpt2, "dp", 8)
    assert dp.params == 4 * 124_475_904 and 0 <= dp.optimizer - 2 * dp.params <= 16  # (and its step counts)
    names = list(PL.FAMILY)
    dp80, fsdp80 = (PL.largest_fitting(8, s, 80e9) for s in ("dp", "fsdp"))
    assert names.index(fsdp80) > names.index(dp80)


@pytest.mark.parametrize("argv,words", [
    (["--parallel", "tp", "--model-parallel", "3"], "--model-parallel 3 must divide --devices 4"),
    (["--parallel", "tp", "--model-parallel", "4", "--preset", "shakespeare-cpu", "--n-head-x"], "unrecognized"),
    (["--preset", "nope"], "model 'gpt' has no preset 'nope'"),
    (["--devices", "0"], "--devices must be >= 1"),
    (["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
    (["--model", "rnn"], "argument --model: invalid choice: 'rnn' (choose from 'gpt', 'llama')"),
    (["--parallel", "pp", "--stages", "3"], "pp needs --stages P dividing --devices 4, got 3"),
    (["--parallel", "pp", "--stages", "4", "--preset", "shakespeare-cpu", "--vocab-size", "64", "--batch-size", "3",
      "--micro-batches", "2"], "--micro-batches 2 must divide --batch-size 3"),
    (["--parallel", "ep"], "ep splits a mixture of experts' experts; model 'gpt' has none"),
    (["--stages", "0"], "--stages must be >= 1"),
    (["--parallel", "dp", "--stages", "2"], "--stages applies to pp, which is not planned here (dp): add --parallel pp"),
    (["--parallel", "tp", "--parallel", "dp", "--pipeline-schedule", "gpipe"],
     "--pipeline-schedule applies to pp, which is not planned here (tp, dp)"),
    (["--parallel", "pp", "--pipeline-schedule", "zigzag"],
     "argument --pipeline-schedule: expected 1f1b, gpipe or alternating, or 1f1b/J or gpipe/J for a backward in J "
     "ticks, got 'zigzag'"),
    (["--parallel", "pp", "--stages", "4", "--pipeline-schedule", "1f1b/2"],
     "a backward's ticks (2) must divide each stage's blocks (3 = n_layer 12 / 4 stages)"),
])
def test_bad_plans_are_named(argv, words, capsys):
    try:
        code = main(["plan", "--devices", "4", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and words in capsys.readouterr().err


def test_the_totals_count_every_part_by_name():
    """A plan's and an estimate's totals are the sums of every part: each part alone, set to one byte, makes a total
    of one byte — a total that leaves a part out names it."""
    from jnnex.memory import Estimate

    for cls, parts, rest in ((PL.Plan, PL.Plan.PARTS, {"scheme": "dp", "data": 1, "model": 1}),
                             (Estimate, Estimate._fields, {})):
        for part in parts:
            one = cls(**rest, **{p: int(p == part) for p in parts})
            assert one.total == 1, f"{cls.__name__}.total leaves out {part}"


def test_a_pipeline_stage_holds_its_blocks_and_sends_what_xla_compiles():
    """``pp`` on data 2 × stage 2, 4 micro-batches of one row: a stage's parameters are its two blocks and the
    embedding and head (to the byte); its collectives are the formula's — the two sends of a tick (an activation and
    a gradient of one micro-batch) on every one of the schedule's ticks, the blocks' gradients all-reduced over
    "data", the embedding's and head's over both axes — in the program XLA compiles (its few scalars aside)."""
    import jnnex.pipeline as PP
    from jnnex.memory import nbytes
    model = PL.build_model("gpt", "shakespeare-cpu", vocab_size=64, block_size=32)
    p = PL.plan(model, "pp", 4, batch=4, stages=2, micro_batches=4)
    params = jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0))
    assert p.params == nbytes(params._replace(blocks=params.blocks[:2])) and (p.data, p.stages) == (2, 2)
    mesh = PP.mesh_3d(2, 2, 1)
    sched = PP.schedule("1f1b", 2, 4)
    stacked = jax.eval_shape(PP.stack_blocks, params)
    x = jax.ShapeDtypeStruct((8, 32), jax.numpy.int32)
    text = jax.jit(PP.pipeline_value_and_grad(model, mesh, sched, params)).lower(stacked, x, x).compile().as_text()
    found = PL.hlo_collectives(text, mesh)
    boundary = 1 * 32 * 128 * 4  # one row of 32 tokens, n_embd 128, float32
    permutes = sum(f["bytes"] for f in found if f["op"] == "collective-permute")
    assert permutes == 2 * boundary  # per tick, in the scan's body: run once a tick
    assert {f["times"] for f in found if f["op"] == "collective-permute"} == {sched.ticks}
    assert {f["times"] for f in found if f["op"] == "all-reduce"} == {1}
    reduced = sum(f["bytes"] for f in found if f["op"] == "all-reduce")
    grads = p.comm - 2 * 4 * boundary
    assert 0 <= reduced - grads <= 64
    assert p.comm_jnnex - grads == sched.ticks * permutes and sched.ticks == 2 * (4 + 2 - 1)


def test_a_pipeline_stage_holds_what_its_schedule_holds():
    """``pp`` on data 2 × stage 2, 8 micro-batches of a row: the busiest stage's activations are the caches of the
    micro-batches its schedule holds at once (GPipe 8, alternating 3, 1F1B 2); jnnex's sends one each way a tick of
    the schedule (1F1B and GPipe 2 (8 + 1), alternating 2 (8 + 2)); and its lockstep program idles as the schedule's
    replay says."""
    import jnnex.pipeline as PP
    model = PL.build_model("gpt", "shakespeare-cpu", vocab_size=64, block_size=32)
    plans = {name: PL.plan(model, "pp", 4, batch=8, stages=2, micro_batches=8, schedule=name)
             for name in ("gpipe", "alternating", "1f1b")}
    one = PL.row_bytes(model, 32, 1, model.cfg.n_layer // 2, logits=False)  # one row's caches on a stage
    logits = PL.row_bytes(model, 32, 1, model.cfg.n_layer // 2) - one
    assert [p.activations for p in plans.values()] == [8 * one + logits, 3 * one, 2 * one]
    boundary = 32 * 128 * 4
    grads = plans["1f1b"].comm - 2 * 8 * boundary
    assert {name: (p.comm_jnnex - grads) // (2 * boundary) for name, p in plans.items()} == {
        name: PP.schedule(name, 2, 8).ticks for name in plans} == {"gpipe": 18, "alternating": 20, "1f1b": 18}
    # jnnex's lockstep program, a backward twice a forward: GPipe and alternating the formula's 1/9, 1F1B 1 - 48/68
    assert [round(p.bubble, 12) for p in plans.values()] == [round(1 / 9, 12)] * 2 + [round(1 - 48 / 68, 12)]


def test_expert_parallelism_holds_a_share_of_the_experts_and_its_all_to_alls_are_the_formulas():
    """``ep`` on 4 devices, the Llama with 4 experts top-2 (dropless): each device one expert of each block and the
    rest whole; its all-to-alls — four a block of ``E · cap · C``, ``cap`` the device's tokens — and its all-reduces
    (what is not an expert) in the program XLA compiles."""
    import jnnex.expert_parallel as EP
    from jnnex.memory import nbytes
    from jnnex.parallel import data_mesh
    model = PL.build_model("llama", "shakespeare-cpu", vocab_size=64, block_size=16, n_expert=4, expert_top_k=2)
    p = PL.plan(model, "ep", 4, batch=2)
    params = jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0))
    experts = sum(nbytes(b.experts.W1) + nbytes(b.experts.W2) for b in params.blocks)
    assert p.params == nbytes(params) - experts * 3 // 4
    mesh = data_mesh(4)
    x = jax.ShapeDtypeStruct((8, 16), jax.numpy.int32)
    f = jax.jit(EP.split_value_and_grad(model, mesh, params))
    text = f.lower(params, (), x, x, jax.random.key(0)).compile().as_text()
    found = PL.hlo_collectives(text, mesh)
    a2a = sum(f["bytes"] for f in found if f["op"] == "all-to-all")
    assert a2a == 4 * model.cfg.n_layer * 4 * (2 * 16) * 128 * 4  # 4 a block, E · cap · C float32, cap = 32 tokens
    reduced = sum(f["bytes"] for f in found if f["op"] == "all-reduce")
    assert 0 <= reduced - (p.comm - a2a) <= 256  # (the loss's, the counts' and the balancing loss's sums)
    with pytest.raises(ValueError, match="ep splits a mixture of experts' experts; model 'gpt' has none"):
        PL.plan(PL.build_model("gpt", "shakespeare-cpu", vocab_size=64), "ep", 4)


def test_tensor_parallelism_splits_each_expert_by_its_hidden_units():
    """``tp`` on data 2 × model 2, the Llama with 4 experts top-2: a device holds half of the attention and half of
    every expert's hidden units, the router whole (to the byte); along "model" the program XLA compiles all-reduces
    Megatron's four ``B_d·T·C`` a block and the gates' gradients, ``B_d·T·E``; along "data" the device's gradients
    (its few scalars aside); nothing else (no all-to-all: the tokens stay)."""
    from jnnex import tensor_parallel as TP
    from jnnex.memory import nbytes
    model = PL.build_model("llama", "shakespeare-cpu", vocab_size=64, block_size=16, n_expert=4, expert_top_k=2)
    p = PL.plan(model, "tp", 4, model_parallel=2, batch=2)
    params = jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0))
    experts = sum(nbytes((b.experts.W1, b.experts.W2)) for b in params.blocks)
    attention = sum(nbytes((b.qkv, b.attproj)) for b in params.blocks)
    assert p.params == nbytes(params) - attention // 2 - experts // 2
    mesh = TP.mesh_2d(2, 2)
    x = jax.ShapeDtypeStruct((4, 16), jax.numpy.int32)
    text = jax.jit(TP.split_value_and_grad(model, mesh, params)).lower(params, (), x, x, jax.random.key(0)) \
        .compile().as_text()
    found = PL.hlo_collectives(text, mesh)
    along = {axis: sum(f["bytes"] for f in found if f["op"] == "all-reduce" and f["axis"] == axis)
             for axis in ("model", "data")}
    megatron = model.cfg.n_layer * (4 * 2 * 16 * model.cfg.n_embd + 2 * 16 * 4) * 4
    assert PL.model_axis_bytes(model, 2, 16) == megatron and 0 <= along["model"] - megatron <= 64
    assert 0 <= along["data"] - (p.comm - megatron) <= 256 and p.comm - megatron == p.params
    assert {f["op"] for f in found} <= {"all-reduce"}


def test_a_mixture_of_experts_is_planned_under_every_scheme():
    """Every scheme the Llama with experts trains under (and fsdp+tp on paper) is in its plan by default, each
    holding the experts it keeps: tp and fsdp+tp's model axis none of them, pp a stage's blocks' share."""
    from jnnex.memory import nbytes
    model = PL.build_model("llama", "shakespeare-cpu", vocab_size=64, block_size=16, n_expert=4, expert_top_k=2)
    assert PL.schemes_for(model) == PL.SCHEMES
    assert "ep" not in PL.schemes_for(PL.build_model("gpt", "shakespeare-cpu", vocab_size=64))
    params = jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0))
    plans = {s: PL.plan(model, s, 4, batch=2, model_parallel=2 if "tp" in s else None, stages=2 if s == "pp" else
                        None) for s in PL.schemes_for(model)}
    assert plans["pp"].params == nbytes(params._replace(blocks=params.blocks[:model.cfg.n_layer // 2]))
    assert plans["fsdp+tp"].params * 2 == plans["tp"].params < plans["dp"].params  # (every tensor here halves)
