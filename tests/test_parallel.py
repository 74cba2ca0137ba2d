"""Data parallelism: the global view equals one device (every registered model, both gradients), the explicit
``shard_map`` form equals the global view, synchronised and per-device BatchNorm differ as they should, the
``pmean``-of-``jax.grad`` pitfall is N× off, checkpoints move between device counts, and two processes of two CPU
devices each train as one process of four. The suite's processes have 4 CPU devices (``conftest.py``)."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jnnex import parallel
from jnnex.check import randomise
from jnnex.data import Vocab, load_words, make_splits
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.optim import TrainConfig, make_optimizer
from jnnex.layout import Parallel
from jnnex.train import fit, init_train_state, make_step
from runfiles import fit_resumed, fit_saved, suite_compile_env

WORDS = load_words("census-first")[:400]
VOCAB = Vocab.from_words(WORDS)
SMALL = {"gpt": {"n_layer": 2, "n_embd": 8, "n_head": 2}}  # the GPT's code paths at a fraction of the compile time
TRAINED = [name for name, spec in REGISTRY.items() if spec.fit_fn is None]


def model_and_data(name, **over):
    model = build_for_words(REGISTRY[name], WORDS, VOCAB, **{**SMALL.get(name, {}), **over})
    return model, make_splits(WORDS, model.block_size, vocab=VOCAB, per_position=model.per_position)


def float64_problem(model, splits, B=8, seed=0):
    params, state = model.init(jax.random.key(seed))
    params = randomise(params, jax.random.key(seed + 1), jnp.float64)
    state = jax.tree.map(lambda s: s.astype(jnp.float64), state)
    x, y = (jnp.asarray(a[:B]) for a in splits.train)
    return params, state, x, y


def rel_errors(a_tree, b_tree):
    """Per tensor, ``max |a − b|`` over the tensor's scale ``max |b|`` — floored at 1e-3 of the largest entry of all
    of ``b``: a tensor whose exact value is 0 (a bias just before BatchNorm) holds rounding noise on both sides."""
    a_leaves, b_leaves = ([np.asarray(x) for x in jax.tree.leaves(t)] for t in (a_tree, b_tree))
    floor = 1e-3 * max((float(np.max(np.abs(b))) for b in b_leaves if b.size), default=0.0)
    return [float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), floor, 1e-300)
            for a, b in zip(a_leaves, b_leaves) if b.size]


def test_the_suite_has_four_cpu_devices():
    assert len(jax.devices()) == 4 and parallel.data_mesh(4).shape == {"data": 4}


@pytest.mark.parametrize("gradients", ["autodiff", "manual"])
@pytest.mark.parametrize("name", TRAINED)
def test_one_step_on_four_devices_equals_one_device_float64(name, gradients):
    """One AdamW step (weight decay and gradient clipping on: the clip's global norm spans every device's share;
    moments not zero) of the same jitted step, the batch of 8 split 2 + 2 + 2 + 2 over a mesh of 4: with the
    parameters and optimiser state replicated (data parallel), and split over the devices (FSDP: each device holds a
    quarter of every tensor that has an axis divisible by 4, the whole of the others). Both agree with one device
    to 1e-12 — the loss, every new parameter, every moment and the BatchNorm state."""

    model, splits = model_and_data(name)
    if gradients == "manual":
        if model.backward_fn is None or model.penalty_fn is not None:
            pytest.skip(f"{name} has no hand-written backward")
        model = model.with_gradients("manual")
    params, state, x, y = float64_problem(model, splits)
    opt = make_optimizer(TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1, grad_clip=0.5))
    ts = init_train_state(model, opt, jax.random.key(0))
    ts = ts._replace(params=params, state=state, opt_state=jax.jit(opt.init)(params))
    step = jax.jit(make_step(model, opt))
    ts = step(ts, (x, y), jax.random.key(2))[0]  # moments that are not zero
    one, m_one = step(ts, (x, y), jax.random.key(3))

    mesh = parallel.data_mesh(4)
    rep = parallel.replicated(mesh)
    batch = jax.device_put((x, y), parallel.batch_sharded(mesh))
    assert len(batch[0].sharding.device_set) == 4
    replicated, m_dp = step(jax.device_put(ts, rep), batch, jax.random.key(3))  # the same function, now on 4
    layout, step_shardings = parallel.fsdp_layout(ts, mesh)
    fsdp_step = jax.jit(make_step(model, opt, shardings=step_shardings), out_shardings=(layout, rep))
    split, m_fsdp = fsdp_step(parallel.place(parallel.local(ts), layout), batch, jax.random.key(3))
    for got, metrics in ((replicated, m_dp), (split, m_fsdp)):
        np.testing.assert_allclose(metrics["loss"], m_one["loss"], rtol=1e-12)
        assert max(rel_errors(got.params, one.params)) <= 1e-12
        assert max(rel_errors(got.opt_state, one.opt_state)) <= 1e-12
        assert max(rel_errors(got.state, one.state), default=0.0) <= 1e-12
    for a in jax.tree.leaves((split.params, split.opt_state)):  # split where an axis divides by 4, else whole
        divides = parallel.fsdp_spec(a.shape, 4) != P()
        assert {s.data.size for s in a.addressable_shards} == {a.size // 4 if divides else a.size}
    if name != "neural-bigram":  # (its one tensor, 27 × 27, has no axis that divides by 4)
        assert not all(a.sharding.is_fully_replicated for a in jax.tree.leaves(split.params))


def test_the_sharded_step_splits_the_batch():
    """Not replicated work: in the compiled data-parallel step each device multiplies its 8 of the 32 rows, and the
    gradient's sum over the batch is an all-reduce."""
    from jnnex.train import make_run

    model, splits = model_and_data("bn-mlp")
    mesh = parallel.data_mesh(4)
    opt = make_optimizer(TrainConfig())
    run = make_run(make_step(model, opt), 32, mesh=mesh)
    ts = parallel.replicate(parallel.local(init_train_state(model, opt, jax.random.key(0))), mesh)
    X, Y, k = parallel.replicate((*splits.train, np.asarray(jax.random.key_data(jax.random.key(1)))), mesh)
    hlo = run.lower(ts, X, Y, k, n_steps=2).compile().as_text()
    assert "all-reduce" in hlo
    assert "f32[8,30]" in hlo and "f32[32,30]" not in hlo  # (B/4, T·n_embd): the first layer's input, per device


@pytest.mark.slow
def test_a_1000_step_float32_run_on_four_devices_ends_where_one_device_does():
    model, splits = model_and_data("bn-mlp")
    tcfg = TrainConfig(steps=1000, eval_every=500, chunk=500, batch_size=32)
    one = fit(model, splits, tcfg)
    four = fit(model.with_gradients("manual"), splits, tcfg, parallel=Parallel("dp", 4))
    one_manual = fit(model.with_gradients("manual"), splits, tcfg)
    assert abs(four.evals[-1]["dev_loss"] - one_manual.evals[-1]["dev_loss"]) < 1e-4
    assert abs(four.evals[-1]["train_loss"] - one_manual.evals[-1]["train_loss"]) < 1e-4
    assert abs(one.evals[-1]["train_loss"] - one_manual.evals[-1]["train_loss"]) < 1e-4
    assert np.max(np.abs(four.losses - one_manual.losses)) < 1e-4


def test_bad_device_requests_are_clear_errors():
    model, splits = model_and_data("bn-mlp")
    with pytest.raises(ValueError, match=r"devices=8 asked for, but only 4 cpu device\(s\) exist"):
        fit(model, splits.train, TrainConfig(steps=2), parallel=Parallel("dp", 8))
    with pytest.raises(ValueError, match="batch_size 30 does not divide evenly over 4 devices"):
        fit(model, splits.train, TrainConfig(steps=2, batch_size=30), parallel=Parallel("dp", 4))
    with pytest.raises(ValueError, match="devices must be >= 1"):
        parallel.data_mesh(0)


def test_a_checkpoint_from_four_devices_resumes_on_two(tmp_path):
    """100 steps on 4 devices, saved; resumed to 200 on 2 devices: where 200 uninterrupted steps on 1 device end."""
    model, splits = model_and_data("bn-mlp")
    tcfg = TrainConfig(steps=200, eval_every=100, chunk=100, lr_boundaries=())
    fit_saved(model, splits.train, TrainConfig(steps=100, eval_every=100, chunk=100, lr_boundaries=()), tmp_path / "r",
              parallel=Parallel("dp", 4))
    resumed = fit_resumed(model, splits.train, tcfg, tmp_path / "r", parallel=Parallel("dp", 2))
    whole = fit(model, splits.train, tcfg)
    assert int(resumed.ts.step) == 200
    assert max(rel_errors(resumed.ts.params, whole.ts.params)) < 1e-5
    assert abs(resumed.evals[-1]["train_loss"] - whole.evals[-1]["train_loss"]) < 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# The explicit form


def explicit_vs_global(name, gradients, sync=True, B=8):
    model, splits = model_and_data(name)
    model = model.with_gradients(gradients)
    params, state, x, y = float64_problem(model, splits, B=B)
    opt = make_optimizer(TrainConfig(optimizer="sgd", lr=1.0))
    ts = init_train_state(model, opt, jax.random.key(0))._replace(params=params, state=state)
    mesh = parallel.data_mesh(4)
    explicit = jax.jit(parallel.explicit_step(model, opt, mesh, sync_batchnorm=sync))
    global_view = jax.jit(make_step(model, opt))
    return model, (ts, x, y), explicit(ts, (x, y), jax.random.key(1)), global_view(ts, (x, y), jax.random.key(1))


@pytest.mark.slow
def test_a_new_scheme_is_its_own_file_and_one_row_and_trains_from_the_cli(tmp_path, monkeypatch, capsys):
    """``tests/toy_scheme.py`` (explicit data parallel under ``shard_map``) added to the scheme table as one row:
    ``jnnex train --parallel dp-explicit --devices 4`` trains with it — nothing else in jnnex knows it — ends where one
    device does (float32: 1e-6 of the loss), records its scheme in ``metrics.json``, and resumes on one device."""
    import json

    from jnnex import layout
    from jnnex.cli import main
    from toy_scheme import ROW

    monkeypatch.setitem(layout.SCHEMES, *next(iter(ROW.items())))
    common = ["train", "--model", "mlp", "--steps", "200", "--eval-every", "100", "--no-progress", "--json"]
    assert main([*common, "--parallel", "dp-explicit", "--devices", "4", "--out", str(tmp_path / "x")]) == 0
    split = json.loads(capsys.readouterr().out)
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert split["parallel"] == "dp-explicit" and split["devices"] == 4 and "parallel" not in one
    for k in ("train_loss", "dev_loss", "test_loss"):
        assert abs(split[k] - one[k]) < 1e-6 * one[k], (k, split[k], one[k])
    assert json.loads((tmp_path / "x" / "metrics.json").read_text())["parallel"] == "dp-explicit"
    assert main(["train", "--resume", "--out", str(tmp_path / "x"), "--steps", "300", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 300


@pytest.mark.parametrize("gradients", ["autodiff", "manual"])
@pytest.mark.parametrize("name", ["bn-mlp", "bow", "wavenet-conv"])
def test_explicit_shard_map_step_equals_the_global_view(name, gradients):
    """``psum`` of the token-weighted local losses (or of the hand-written local gradients), BatchNorm synchronised by
    ``pmean``: the same update as the global view — for a window model with BatchNorm, a per-position model whose
    shards hold different numbers of targets, and one with both."""
    _, _, (ts_e, m_e), (ts_g, m_g) = explicit_vs_global(name, gradients)
    np.testing.assert_allclose(m_e["loss"], m_g["loss"], rtol=1e-12)
    assert max(rel_errors(ts_e.params, ts_g.params)) < 1e-12
    assert max(rel_errors(ts_e.state, ts_g.state), default=0.0) < 1e-12


@pytest.mark.parametrize("gradients", ["autodiff", "manual"])
def test_per_device_batchnorm_is_each_shard_on_its_own(gradients):
    """``sync_batchnorm=False``: each device normalises its 2 rows with their own statistics — a different model in
    training (the update differs from the global view's by far more than rounding), exactly the mean of 4
    single-device steps, one per shard."""
    model, (ts, x, y), (ts_e, m_e), (ts_g, _) = explicit_vs_global("bn-mlp", gradients, sync=False)
    assert max(rel_errors(ts_e.params, ts_g.params)) > 1e-3
    step = jax.jit(make_step(model, make_optimizer(TrainConfig(optimizer="sgd", lr=1.0))))
    shards = [step(ts, (x[2 * d:2 * d + 2], y[2 * d:2 * d + 2]), jax.random.key(1)) for d in range(4)]
    mean_params = jax.tree.map(lambda *p: sum(p) / 4, *(s[0].params for s in shards))
    assert max(rel_errors(ts_e.params, mean_params)) < 1e-12
    np.testing.assert_allclose(m_e["loss"], np.mean([s[1]["loss"] for s in shards]), rtol=1e-12)


def test_pmean_of_per_device_grads_is_n_times_too_large():
    """The pitfall: under ``shard_map`` the replicated parameters' gradient is already summed over the 4 devices; a
    ``pmean`` on top leaves 4× the true gradient. The explicit step's reduced-loss gradient is the true one."""
    model, splits = model_and_data("mlp")
    params, state, x, y = float64_problem(model, splits)
    mesh = parallel.data_mesh(4)
    true = jax.grad(lambda p: model.objective(p, state, x, y)[0])(params)
    wrong = jax.jit(parallel.pitfall_step_gradients(model, mesh))(params, state, x, y)
    for w, t in zip(jax.tree.leaves(wrong), jax.tree.leaves(true)):
        np.testing.assert_allclose(w, 4 * t, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------------------
# Many processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(cpu_devices: int) -> dict:
    """A `jnnex` child's environment: ``cpu_devices`` CPU devices, the suite's compile settings, no compilation cache,
    unbuffered output, and no distributed settings inherited (each child gets its own on the command line)."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(cpu_devices), "JNNEX_CACHE_DIR": "off", "PYTHONUNBUFFERED": "1",
           **suite_compile_env()}
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    return env


def train_cli(tmp_path, tag, cpu_devices, extra, model=("--model", "bn-mlp"), steps=300):
    """``jnnex train`` in a subprocess with ``cpu_devices`` CPU devices: a Popen, its stdout file."""
    env = child_env(cpu_devices)
    stdout = tmp_path / f"{tag}.out"
    args = [sys.executable, "-m", "jnnex", "train", *model, "--steps", str(steps), "--eval-every", str(steps // 3),
            "--chunk", str(steps // 3), "--devices", "4", "--json", "--out", str(tmp_path / tag), *extra]
    with stdout.open("w") as f:  # the child holds its own descriptor
        return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT), stdout


def final_json(path):
    """The JSON line of the output (gloo prints its connection lines to stdout too)."""
    return json.loads(next(line for line in reversed(path.read_text().splitlines()) if line.startswith("{")))


SPLIT_GPT = ("--model", "gpt", "--n-layer", "1", "--n-embd", "16", "--n-head", "4", "--batch-size", "8")


@pytest.mark.slow
def test_two_processes_of_two_devices_train_as_one_process_of_four(tmp_path):
    """Two runs of 2 processes × 2 CPU devices on 127.0.0.1 (JAX's distributed runtime, gloo collectives), each
    splitting a GPT its own way, against 1 process × 4 with the plain data-parallel layout: the same final losses;
    only process 0 writes its run directory. ``fsdp``: every parameter over the 4 devices (each process holds half of
    each, and gathers the whole to evaluate and save); ``tp``: the blocks over a 2 × 2 data × model mesh whose model
    axis lies within each process. (Plain data parallel over two processes: the SIGTERM test below.) Bounded by a
    timeout; killed on failure."""
    runs = {}
    for split, how in (("fsdp", ["--shard-params"]), ("tp", ["--model-parallel", "2"])):
        port = free_port()
        runs[split] = [train_cli(tmp_path, f"{split}{i}", 2, ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                                               "2", "--process-id", str(i), *how], model=SPLIT_GPT,
                                 steps=30)
                       for i in range(2)]
    single = train_cli(tmp_path, "single", 4, [], model=SPLIT_GPT, steps=30)
    every = [*runs["fsdp"], *runs["tp"], single]
    try:
        for proc, _ in every:
            assert proc.wait(timeout=300) == 0
    finally:
        for proc, _ in every:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    one = final_json(single[1])
    assert one["processes"] == 1 and one["devices"] == 4 and not one["shard_params"] and one["model_parallel"] == 1
    for split, expected in (("fsdp", (True, 1)), ("tp", (False, 2))):
        p0, p1 = (final_json(out) for _, out in runs[split])
        assert p0["processes"] == 2 and p0["devices"] == 4
        assert (p0["shard_params"], p0["model_parallel"]) == expected
        for key in ("train_loss", "dev_loss", "test_loss"):
            assert p0[key] == p1[key]  # every process ends with the same parameters
            assert abs(p0[key] - one[key]) < 1e-5, (split, key, p0[key], one[key])
        assert (tmp_path / f"{split}0" / "model.npz").is_file() and not (tmp_path / f"{split}1").exists()
    line = next(x for x in runs["fsdp"][0][1].read_text().splitlines() if "(FSDP)" in x)
    assert "parameters and optimiser state split over 4 devices (FSDP)" in line


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_chunk(tmp_path):
    """2 processes × 2 CPU devices training one run; SIGTERM to process 1 alone (a scheduler that stops one task
    first), sent once process 0 has written its first checkpoint (an event, not a timer): both finish the chunk in
    flight and stop at the same step (neither waits forever in the next step's collectives), process 0 saves it, both
    exit with 143. Bounded by timeouts; killed on failure."""
    import signal
    import time

    port = free_port()
    env = child_env(2)
    procs = []
    for i in range(2):
        args = [sys.executable, "-m", "jnnex", "train", "--model", "mlp", "--n-hidden", "16", "--steps", "10000000",
                "--eval-every", "100", "--chunk", "100", "--devices", "4", "--no-progress", "--out", str(tmp_path / "r"),
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "r" / "checkpoint.npz").is_file():
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [143, 143], errs
    steps = [int(e.split("stopped by SIGTERM at step ")[1].split()[0].rstrip(";")) for e in errs]
    assert steps[0] == steps[1] and steps[0] % 100 == 0, errs
    assert "saved to" in errs[0] and "process 1; process 0 saves the run" in errs[1]
    with np.load(tmp_path / "r" / "checkpoint.npz") as f:
        assert int(f[".step"]) == steps[0]


@pytest.mark.slow
def test_a_process_that_stops_early_leaves_the_others_a_named_error_not_a_hang(tmp_path):
    """Two 2-process runs where process 0 alone meets bad input: a data file that does not exist (refused before
    joining: process 1 is told it cannot reach the coordinator within --coordinator-timeout) and one that is not
    UTF-8 (found after joining: process 0 checks in at the barrier that starts the first run, and process 1 stops
    there at once, naming process 0 and its reason, exit 2). No traceback either way, and no wait beyond the first
    case's 5 s (the second case's 120 s bounds only a slow start)."""
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    env = child_env(2)
    procs = []
    # (the wait to join: 5 s where process 1 is to give up on a coordinator that never starts; 120 s where both must
    # join, however busy the machine — joining ends as soon as both are there)
    for case, data, wait in (("missing", str(tmp_path / "nope.txt"), "5"), ("not-utf8", str(tmp_path / "bad.txt"),
                                                                             "120")):
        port = free_port()
        for i in range(2):
            args = [sys.executable, "-m", "jnnex", "train", "--model", "mlp", "--n-hidden", "16", "--steps", "300",
                    "--devices", "4", "--no-progress", "--out", str(tmp_path / case), "--coordinator-timeout", wait,
                    "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                    *(["--data", data] if i == 0 else [])]
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    errs = [err for _, err in outs]
    assert [p.returncode for p in procs] == [2, 2, 2, 2], errs
    assert all("Traceback" not in e for e in errs), errs
    assert "--data: data file" in errs[0] and "does not exist" in errs[0]
    assert "cannot reach the coordinator" in errs[1]
    assert "is not valid UTF-8" in errs[2]
    assert "process 1 of 2: stopping, as process 0 stopped before training:" in errs[3]
    assert "is not valid UTF-8" in errs[3].split("process 0 stopped before training:")[1]
