"""Sharded parameters (ZeRO-3 / FSDP) in the global view: where each tensor splits, the compiled step gathering and
scattering, checkpoints moving between layouts and device counts, and the errors. One step with the parameters and
optimiser state split over 4 devices equals one device for every trained model and both gradients, in float64:
``tests/test_parallel.py::test_one_step_on_four_devices_equals_one_device_float64`` (beside the replicated layout,
sharing its one-device reference). The suite's processes have 4 CPU devices (``conftest.py``)."""

import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jnnex import parallel, rundir
from jnnex.optim import TrainConfig, make_optimizer
from jnnex.train import fit, init_train_state, make_run, make_step
from jnnex.layout import Parallel
from tests.runfiles import fit_resumed, fit_saved
from tests.test_parallel import model_and_data, rel_errors


def test_fsdp_splits_the_largest_axis_that_divides():
    assert parallel.fsdp_spec((27, 64), 4) == P(None, "data")  # 27 does not divide: the other axis
    assert parallel.fsdp_spec((64, 256), 4) == P(None, "data")  # the larger of two that divide
    assert parallel.fsdp_spec((256, 64), 4) == P("data")
    assert parallel.fsdp_spec((8, 8), 4) == P("data")  # equals: the first
    assert parallel.fsdp_spec((27,), 4) == P() and parallel.fsdp_spec((), 4) == P()  # nothing divides: replicated
    assert parallel.fsdp_spec((2, 3), 4) == P()  # smaller than the device count
    assert parallel.fsdp_spec((64, 256), 1) == P()
    tree = {"W": np.zeros((8, 27)), "b": np.zeros((27,)), "count": np.zeros(())}
    assert parallel.unsplit(tree, 4) == ["['b']"]  # the scalar is not worth listing


def test_the_compiled_fsdp_step_gathers_the_weights_and_scatters_their_gradients():
    """In the compiled program each device receives a quarter of every split weight (its argument shapes), gathers it
    whole for the step and reduces the gradient back to its quarter (a reduce-scatter, or an all-reduce and a slice:
    XLA's choice on CPU); the state that comes out is still split."""
    model, splits = model_and_data("gpt", n_embd=16)
    opt = make_optimizer(TrainConfig(optimizer="adamw"))
    ts = init_train_state(model, opt, jax.random.key(0))
    mesh = parallel.data_mesh(4)
    layout, step_shardings = parallel.fsdp_layout(ts, mesh)
    run = make_run(make_step(model, opt, shardings=step_shardings), 8, mesh=mesh, state_shardings=layout)
    ts4 = parallel.place(parallel.local(ts), layout)
    X, Y, k = parallel.replicate((*splits.train, np.asarray(jax.random.key_data(jax.random.key(1)))), mesh)
    hlo = run.lower(ts4, X, Y, k, n_steps=1).compile().as_text()
    assert "all-gather" in hlo
    assert "reduce-scatter" in hlo or "all-reduce" in hlo
    out, _ = run(ts4, X, Y, k, n_steps=1)
    assert not out.params.blocks[0].fc.W.sharding.is_fully_replicated  # the carry stays split


def _constraints(jaxpr):
    """The ``sharding_constraint`` equations of a jaxpr, inner jaxprs included, in program order."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            yield eqn
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None:
                yield from _constraints(getattr(inner, "jaxpr", inner))


def test_fsdp_gathers_for_the_step_and_each_device_keeps_and_updates_its_shard_only():
    """What FSDP promises, read from the step and the state it leaves. The step asks for each parameter whole for
    the forward and backward and for its gradient back on the parameter's own split (a reduce-scatter), in that
    order, leaf for leaf — a step that keeps the gradient whole (all-reduced, then sliced) or swaps the two fails
    here, though it trains the same numbers. After the step each device holds a quarter of every split tensor, and
    of the state no more than a quarter plus what FSDP leaves whole."""
    model, splits = model_and_data("gpt", n_embd=16)
    opt = make_optimizer(TrainConfig(optimizer="adamw"))
    ts = init_train_state(model, opt, jax.random.key(0))
    mesh = parallel.data_mesh(4)
    layout, (gathered, split) = parallel.fsdp_layout(ts, mesh)
    X, Y = splits.train
    step = make_step(model, opt, shardings=(gathered, split))
    specs = [e.params["sharding"].spec for e in _constraints(jax.make_jaxpr(step)(ts, (X[:8], Y[:8]),
                                                                                  jax.random.key(1)).jaxpr)]
    n = len(jax.tree.leaves(ts.params))
    want_split = [s.spec for s in jax.tree.leaves(parallel.fsdp_shardings(ts.params, mesh))]  # each parameter's own
    assert sum(s != P() for s in want_split) >= n // 2  # most parameters split: the test can tell
    assert specs[:n] == [P()] * n, f"the parameters are not gathered whole for the step: {specs[:n]}"
    assert specs[n:] == want_split, f"the gradients are not split as their parameters (reduce-scattered): " \
                                    f"{specs[n:]} against {want_split}"

    run = make_run(step, 8, mesh=mesh, state_shardings=layout)
    ts4 = parallel.place(parallel.local(ts), layout)
    Xr, Yr, k = parallel.replicate((X, Y, np.asarray(jax.random.key_data(jax.random.key(1)))), mesh)
    out, _ = run(ts4, Xr, Yr, k, n_steps=2)
    whole = sum(np.asarray(a).nbytes for a in jax.tree.leaves((ts.params, ts.opt_state)))
    left_whole = sum(np.asarray(a).nbytes for a, s in zip(jax.tree.leaves((ts.params, ts.opt_state)),
                                                          jax.tree.leaves(parallel.fsdp_shardings(
                                                              (ts.params, ts.opt_state), mesh)))
                     if s.is_fully_replicated)
    held = parallel.bytes_per_device((out.params, out.opt_state))
    assert len(held) == 4 and max(held.values()) <= (whole - left_whole) / 4 + left_whole, (held, whole, left_whole)
    for a, s in zip(jax.tree.leaves(out.params), want_split):
        if s != P():
            assert {sh.data.size for sh in a.addressable_shards} == {a.size // 4}


def test_a_sharded_checkpoint_from_four_devices_resumes_on_one_and_on_two(tmp_path):
    """20 steps with the parameters split over 4 devices, saved (plain whole arrays); resumed to 40 on 1 device
    unsplit and on 2 devices split: both end where 40 uninterrupted steps on 1 device do."""
    model, splits = model_and_data("gpt")
    # SGD with momentum: a state tensor per parameter that must come back, and no Adam to magnify float32 rounding
    # (AdamW on 4 devices against 1 differs by 1e-3 after 200 steps, split or not: dividing by tiny √v)
    short = TrainConfig(steps=20, eval_every=20, chunk=20, lr_boundaries=(), optimizer="momentum", lr=0.1)
    tcfg = short.with_steps(40)
    fit_saved(model, splits.train, short, tmp_path / "r", parallel=Parallel("fsdp", 4))
    saved = dict(np.load(tmp_path / "r" / rundir.CHECKPOINT))
    whole_fc = model.init(jax.random.key(0))[0].blocks[0].fc.W.shape
    assert any(v.shape == whole_fc for v in saved.values())  # whole arrays, not a device's slice
    shutil.copytree(tmp_path / "r", tmp_path / "r2")
    on_one = fit_resumed(model, splits.train, tcfg, tmp_path / "r")
    on_two = fit_resumed(model, splits.train, tcfg, tmp_path / "r2", parallel=Parallel("fsdp", 2))
    whole = fit(model, splits.train, tcfg)
    for resumed in (on_one, on_two):
        assert int(resumed.ts.step) == 40
        assert max(rel_errors(resumed.ts.params, whole.ts.params)) < 1e-5
        assert abs(resumed.evals[-1]["train_loss"] - whole.evals[-1]["train_loss"]) < 1e-5


def test_the_run_names_the_tensors_fsdp_leaves_whole():
    """What ``jnnex train --shard-params`` prints: the bn-mlp on 4 devices keeps its 27 x 10 table and the 27-wide
    output bias whole (no axis divides by 4); a GPT of widths that divide splits every tensor."""
    from jnnex.run import fsdp_summary

    model, _ = model_and_data("bn-mlp")
    line = fsdp_summary(model, 4)
    assert line.startswith("parameters and optimiser state split over 4 devices (FSDP); whole on each device (no axis "
                           "divides by 4): ") and ".C" in line and ".dense[1].b" in line
    gpt, _ = model_and_data("gpt", n_layer=1, n_embd=16, n_head=4)
    assert fsdp_summary(gpt, 4).endswith("every tensor split")
    one = fsdp_summary(gpt, 1)  # `--devices 1 --shard-params`: said plainly (it read "no axis divides by 1")
    assert one.startswith("FSDP on one device: nothing to split the parameters over") and "divides" not in one


def test_shard_params_needs_devices():
    with pytest.raises(ValueError, match="parallel: fsdp splits over devices: give devices too"):
        Parallel("fsdp")
    with pytest.raises(ValueError, match="--shard-params splits the parameters over devices: give --devices N too"):
        Parallel.from_flags(shard_params=True)


def test_a_state_the_devices_cannot_hold_is_named(tmp_path, monkeypatch):
    """Resuming a split run where the devices cannot hold its parameters and optimiser state stops before placing
    anything, with the figures and what would work: on CPU, that splitting over forced devices does not help (they
    share the host); on accelerators, how many devices would hold it."""
    model, splits = model_and_data("gpt")
    tcfg = TrainConfig(steps=20, eval_every=20, chunk=20, batch_size=8)
    (tmp_path / "r").mkdir()  # a run's checkpoint (its state at step 0: nothing needs training to be resumed)
    rundir.save_pytree(tmp_path / "r" / rundir.CHECKPOINT,
                       init_train_state(model, make_optimizer(tcfg), jax.random.key(0)))
    monkeypatch.setenv("JNNEX_MEMORY_LIMIT", "1K")  # the state: ~6 KiB a device
    with pytest.raises(ValueError, match=r"resuming on 2 device\(s\): the parameters and optimiser state take .* per "
                                         r"device .* CPU devices share this machine's memory"):
        fit_resumed(model, splits.train, tcfg.with_steps(40), tmp_path / "r", parallel=Parallel("fsdp", 2))

    class Device:  # an accelerator, as the check sees one
        platform, process_index = "gpu", 0

    class Mesh:
        devices, size = np.array([Device(), Device()]), 2

    ts = {"W": jax.ShapeDtypeStruct((1024, 1024), np.float32)}  # 4 MiB whole on each device
    with pytest.raises(ValueError, match=r"split them over 4 devices or more \(--devices 4 --shard-params"):
        parallel.check_state_fits(ts, None, Mesh(), available=1_100_000)
    parallel.check_state_fits(ts, None, Mesh(), available=5_000_000)  # fits: no error
