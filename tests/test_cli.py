"""The ``jnnex`` command (:mod:`jnnex.cli`): train / sample / eval end to end, every flag with help, the bigram models,
moons, lr-find, diagnose, ladder, the compilation cache, Ctrl-C then resume, --backward manual really manual."""

import json
import re

import jax
import numpy as np
import pytest

from jnnex.cli import main
from jnnex.data import load_words


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_train_sample_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--model", "mlp", "--data", "census-first", "--steps", "600",
                          "--eval-every", "300", "--out", str(out), "--json", "--seed", "3")
    assert code == 0
    metrics = json.loads(stdout)
    assert metrics["steps"] == 600 and metrics["params"] == 11897 and metrics["seed"] == 3
    assert 1.5 < metrics["dev_loss"] < 3.2  # learned something from ln(27) = 3.30
    for f in ("config.json", "model.npz", "checkpoint.npz", "metrics.jsonl", "metrics.json"):
        assert (out / f).is_file()
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporaries
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [300, 600]
    with np.load(out / "model.npz", allow_pickle=False) as f:
        assert len(f.files) == 5
    code, stdout, _ = run(capsys, "sample", "--from", str(out), "-n", "7", "--seed", "1")
    words = stdout.split()
    assert code == 0 and len(stdout.splitlines()) == 7 and all(w.isalpha() and w.islower() for w in words if w)
    assert run(capsys, "sample", "--from", str(out), "-n", "7", "--seed", "1")[1] == stdout  # deterministic
    code, stdout, _ = run(capsys, "eval", "--from", str(out), "--json")
    ev = json.loads(stdout)
    assert code == 0 and ev["dev_loss"] == pytest.approx(metrics["dev_loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bigram", "neural-bigram"])
def test_bigram_models_through_cli(tmp_path, capsys, model):
    out = tmp_path / model
    steps = [] if model == "bigram" else ["--steps", "50"]  # the counting bigram has no training settings
    code, stdout, _ = run(capsys, "train", "--model", model, "--data", "census-first", *steps, "--out", str(out),
                          "--json")
    assert code == 0
    m = json.loads(stdout)
    assert set(m) >= {"train_loss"} and "dev_loss" not in m  # bigram models train on all words by default
    assert 2.0 < m["train_loss"] < 3.3
    code, stdout, _ = run(capsys, "sample", "--from", str(out), "-n", "3")
    assert code == 0 and len(stdout.splitlines()) == 3


def test_eval_rejects_characters_outside_the_vocabulary(tmp_path, capsys):
    out = tmp_path / "b"
    assert run(capsys, "train", "--model", "bigram", "--out", str(out))[0] == 0
    other = tmp_path / "other.txt"
    other.write_text("zoë\n" * 30)
    code, _, err = run(capsys, "eval", "--from", str(out), "--data", str(other))
    assert code == 2 and "outside the vocabulary" in err


def test_help_explains_every_flag(capsys):
    """Every flag of every command has help text; model flags say which models they apply to."""
    from jnnex.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and name != "bench":
                assert action.help, (name, action.option_strings)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--seed", "--steps", "--out", "--json", "--no-progress", "--resume", "--preset",
                 "--n-hidden", "--betas", "--decay-mask", "--grad-clip"):
        assert flag in text
    assert "[mlp, bn-mlp, deep-mlp, wavenet, wavenet-conv]" in " ".join(text.split())  # e.g. --n-hidden's models, from the config classes that have it


@pytest.mark.slow
def test_version_and_python_m(capsys):
    import subprocess
    import sys

    import jnnex

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"jnnex {jnnex.__version__}"
    proc = subprocess.run([sys.executable, "-m", "jnnex", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"jnnex {jnnex.__version__}"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["scalar", "tensor", "autodiff"])
def test_moons_mlp_engines(capsys, engine):
    steps = "12" if engine == "scalar" else "100"
    code, stdout, _ = run(capsys, "moons", "--engine", engine, "--steps", steps, "--json")
    m = json.loads(stdout)
    assert code == 0 and m["engine"] == engine and m["steps"] == int(steps)
    assert 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0
    if engine != "scalar":
        assert m["accuracy"] == 1.0


@pytest.mark.slow
def test_lr_find_cli(capsys):
    code, stdout, _ = run(capsys, "lr-find", "--model", "mlp", "--steps", "40", "--json")
    data = json.loads(stdout)
    assert code == 0 and len(data["lrs"]) == len(data["losses"]) == 40
    code, stdout, _ = run(capsys, "lr-find", "--model", "mlp", "--steps", "40")
    assert code == 0 and "lowest smoothed loss at lr" in stdout


@pytest.mark.slow
def test_lr_find_sweeps_a_text_with_the_model_flags_and_names_no_rate_past_an_overflow(tmp_path, capsys):
    """lr-find trains what `jnnex train` would: a text's stream (rows drawn from it) and the model flags given (one
    that does not apply to the model is refused); the rate it names is one that trains (its loss below the first
    step's), not the last before the loss overflowed (a NaN in the smoothing window once made that window the
    "lowest")."""
    words = load_words("census-first")[:4000]
    text = tmp_path / "text.txt"  # eight names a line: a text, not a word list
    text.write_text("\n".join(" ".join(words[i : i + 8]) for i in range(0, len(words), 8)) + "\n")
    flags = ["--model", "gpt", "--data", str(text), "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
             "--block-size", "16", "--steps", "60", "--lo", "1e-3", "--hi", "1e4"]
    code, stdout, err = run(capsys, "lr-find", *flags, "--json")
    assert code == 0, err
    lrs, losses = (np.array(v) for v in json.loads(stdout).values())
    overflowed = np.flatnonzero(~np.isfinite(losses))
    assert overflowed.size and np.isfinite(losses[: overflowed[0]]).all()  # the sweep went past the overflow
    code, stdout, _ = run(capsys, "lr-find", *flags)
    named = float(re.search(r"lowest smoothed loss at lr ≈ (\S+);", stdout).group(1))
    at = int(np.argmin(np.abs(np.log(lrs / named))))  # its step
    assert code == 0 and at < overflowed[0] and losses[at] < losses[0], (named, losses[at - 2 : at + 3])
    code, _, err = run(capsys, "lr-find", "--model", "mlp", "--n-layer", "3", "--steps", "5")
    assert code == 2 and "--n-layer does not apply to model 'mlp'" in err


@pytest.mark.slow
def test_diagnose_prints_tables_and_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, stdout, _ = run(capsys, "diagnose", "--model", "deep-mlp", "--steps", "30", "--out", str(tmp_path))
    assert code == 0
    assert "-- step 0 (initialisation)" in stdout and "act 4" in stdout and "log10 update:data" in stdout
    for name in ("activations.png", "gradients.png", "update_ratio.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    code, stdout, _ = run(capsys, "diagnose", "--model", "deep-mlp", "--steps", "5", "--no-batchnorm")
    assert code == 0 and "{'batchnorm': False}" in stdout and "act 4" in stdout  # the net without any BatchNorm
    code, _, err = run(capsys, "diagnose", "--model", "mlp", "--gain", "1")
    assert code == 2 and "--gain does not apply to model 'mlp'" in err


@pytest.mark.slow
def test_ladder_runs_every_rung(capsys):
    code, stdout, _ = run(capsys, "ladder", "--steps", "200", "--json")
    rows = json.loads(stdout)
    assert code == 0 and [r["rung"] for r in rows] == ["original", "softmax fixed", "tanh fixed", "kaiming",
                                                       "+ batchnorm"]
    assert rows[0]["initial_loss"] > 2 * rows[3]["initial_loss"]  # the hockey stick the fixes remove
    assert all(1.5 < r["val"] < 4.0 for r in rows[1:])


@pytest.mark.slow
def test_backward_manual_really_trains_on_the_hand_written_backward(tmp_path, capsys):
    """`jnnex train --backward manual` ends with the parameters of the library's hand-written run bit for bit, and
    not with autodiff's (the two differ in the last bits after 300 steps), while the losses agree to 2e-3."""
    from jnnex import run as runs
    from runfiles import arrays

    cli = {}
    for backward in ("autodiff", "manual"):
        code, stdout, _ = run(capsys, "train", "--model", "bn-mlp", "--steps", "300", "--backward", backward, "--json",
                              "--out", str(tmp_path / backward))
        assert code == 0
        cli[backward] = json.loads(stdout)
    runs.train(runs.RunConfig.new("bn-mlp", steps=300, gradients="manual"), tmp_path / "library", progress=False)
    manual, library, autodiff = (arrays(tmp_path / d / "model.npz") for d in ("manual", "library", "autodiff"))
    assert all(np.array_equal(manual[k], library[k]) for k in manual)
    assert not all(np.array_equal(manual[k], autodiff[k]) for k in manual), "manual and autodiff runs are identical"
    assert cli["manual"]["backward"] == "manual"
    assert cli["manual"]["dev_loss"] == pytest.approx(cli["autodiff"]["dev_loss"], abs=2e-3)
    code, _, err = run(capsys, "train", "--model", "bigram", "--backward", "manual")
    assert code == 2 and "no hand-written backward" in err


def test_bench_subcommand_forwards_to_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--only", "no-such-suite"])
    assert e.value.code == 2 and "invalid choice: 'no-such-suite'" in capsys.readouterr().err


@pytest.mark.slow
def test_persistent_compilation_cache(tmp_path):
    """A run fills $JNNEX_CACHE_DIR; a second run of the same model reads it and prints the same result; `off`
    writes nothing."""
    import os
    import subprocess
    import sys

    from runfiles import suite_compile_env

    def train(cache):  # (compiled as the suite compiles: what is checked is what is cached and read back)
        env = {**os.environ, **suite_compile_env(), "JNNEX_CACHE_DIR": str(cache)}
        proc = subprocess.run([sys.executable, "-m", "jnnex", "train", "--model", "bn-mlp", "--steps", "200", "--json"],
                              capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    cache = tmp_path / "xla"
    first = train(cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) >= 3  # at least init, the scanned run and the evaluation chunk
    second = train(cache)
    assert {k: v for k, v in second.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new compiled: every program came from disk
    train("off")  # relative to the run's directory: a cache there would be tmp_path/off
    assert not (tmp_path / "off").exists() and sorted(p.name for p in cache.iterdir()) == entries


@pytest.mark.slow
def test_ctrl_c_then_resume_equals_an_unbroken_run(tmp_path, sigint_default):
    """A real SIGINT to `jnnex train`, twice: each saves the chunk in flight and exits 130; `--resume` (no other
    flag: config.json holds the settings) continues from the checkpoint; the result is bit-identical to an unbroken
    run stopped at the same step. Every wait is on an event (a checkpoint appearing), not on a timer."""
    import os
    import signal
    import sys

    from jnnex import rundir
    from jnnex.run import load_config, prepare
    from jnnex.train import fit
    from runfiles import checkpoint_step, signal_after_checkpoint, suite_compile_env

    out = tmp_path / "run"
    # The child handles SIGINT the Python way even when this suite runs as a background job of a non-interactive
    # shell, which starts every process with SIGINT ignored.
    child = [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from jnnex.cli import main; sys.exit(main(sys.argv[1:]))"]

    # The child compiles as this process does (conftest: XLA's costlier passes and its CPU fusion emitters off), so
    # the in-process unbroken run below is the same program, bit for bit.
    env = {**os.environ, **suite_compile_env()}

    def interrupt_after_checkpoint(argv, after: int) -> int:
        code, stderr = signal_after_checkpoint(child + argv, out / "checkpoint.npz", signal.SIGINT, after=after,
                                               env=env)
        assert code == 130 and "interrupted at step" in stderr and "--resume" in stderr, stderr
        assert "Traceback" not in stderr
        return checkpoint_step(out / "checkpoint.npz")

    first = interrupt_after_checkpoint(["train", "--model", "mlp", "--n-hidden", "64", "--steps", "2000000",
                                        "--eval-every", "500", "--chunk", "500", "--out", str(out),
                                        "--no-progress"], after=-1)
    second = interrupt_after_checkpoint(["train", "--resume", "--out", str(out), "--no-progress"], after=first)
    assert 500 <= first < second and second % 500 == 0

    # The unbroken run: the same settings in-process, stopped by its own hook at `second`.
    rc = load_config(out)
    model, splits = prepare(rc)
    tcfg, train = rc.train, splits.train

    def stop_at_second(step, metrics):
        if step == second:
            os.kill(os.getpid(), signal.SIGINT)

    unbroken = fit(model, train, tcfg, evals={}, hooks=[stop_at_second])
    assert int(unbroken.ts.step) == second
    saved = rundir.load_pytree(out / "checkpoint.npz", unbroken.ts)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(unbroken.ts)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("text, expected", [("19000", (19000,)), ("100,300", (100, 300)), ("none", ()), ("", ())])
def test_optional_tuple_flags_parse_to_tuples(text, expected):
    """``--lr-boundaries none`` is "never" (as its help says), not "the default" (half of the steps)."""
    from jnnex.cli import build_parser

    assert build_parser().parse_args(["train", "--lr-boundaries", text]).lr_boundaries == expected


def test_an_explicit_none_is_what_runs_and_what_config_json_records(tmp_path, capsys):
    """``--grad-clip none`` switches off the preset's clipping at 1.0, ``--batch-size none`` trains on the whole set
    and ``--lr-boundaries none`` never decays: each is what the run's config holds, ``config.json`` records it, and
    resuming with another value is a conflict. A flag left out takes the preset's value."""
    from jnnex import run as jrun
    from jnnex.cli import build_parser
    from jnnex.settings import given

    names = [*jrun.model_fields(), *jrun.TRAIN_FIELDS]
    args = build_parser().parse_args(["train", "--grad-clip", "none", "--batch-size", "none"])
    assert given(args, names) == {"grad_clip": None, "batch_size": None}
    rc = jrun.RunConfig.new("gpt", "census-first", preset="shakespeare-cpu", **given(args, names))
    assert rc.train.grad_clip is None and rc.train.batch_size is None
    preset = jrun.RunConfig.new("gpt", "census-first", preset="shakespeare-cpu",
                                **given(build_parser().parse_args(["train"]), names))
    assert preset.train.grad_clip == 1.0 and preset.train.batch_size == 12
    with pytest.raises(SystemExit):  # a setting whose None means "the default" takes no none
        build_parser().parse_args(["train", "--lr-decay-steps", "none"])
    capsys.readouterr()

    out = tmp_path / "run"
    code, _, _ = run(capsys, "train", "--model", "mlp", "--steps", "10", "--eval-every", "10", "--chunk", "10",
                     "--grad-clip", "none", "--batch-size", "none", "--lr-boundaries", "none", "--out", str(out),
                     "--no-progress")
    assert code == 0
    recorded = json.loads((out / "config.json").read_text())["train_config"]
    assert (recorded["grad_clip"], recorded["batch_size"], recorded["lr_boundaries"]) == (None, None, [])
    code, _, err = run(capsys, "train", "--resume", "--out", str(out), "--batch-size", "32")
    assert code == 2 and "--batch-size 32 conflicts with the run's None" in err
    code, _, err = run(capsys, "train", "--model", "mlp", "--steps", "10", "--eval-every", "10", "--chunk", "10",
                       "--out", str(tmp_path / "b"), "--no-progress")
    code, _, err = run(capsys, "train", "--resume", "--out", str(tmp_path / "b"), "--batch-size", "none")
    assert code == 2 and "--batch-size None conflicts with the run's 32" in err


def test_diagnose_wavenet_per_level(tmp_path, capsys):
    """Activations of shape (B, T', H): statistics per level, pictures drawn."""
    pytest.importorskip("matplotlib")
    code, stdout, _ = run(capsys, "diagnose", "--model", "wavenet", "--steps", "5", "--out", str(tmp_path))
    assert code == 0 and "act 2" in stdout and "act 3" not in stdout
    assert (tmp_path / "activations.png").read_bytes()[:4] == b"\x89PNG"


def test_diagnose_rnn_prints_the_gradient_through_time(capsys):
    code, stdout, _ = run(capsys, "diagnose", "--model", "rnn", "--steps", "5")
    assert code == 0 and "|dL_last/dh_t| for t = 0.." in stdout and "(initialisation)" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("model, shown", [("gpt", True), ("wavenet-conv", False)])
def test_diagnose_shows_the_gradient_through_time_where_there_is_a_state_per_position(capsys, model, shown):
    """The profile is printed for a per-position model whose first activation has one state per position (the GPT's
    residual stream), not for one whose first level also spans the left padding (the convolution's): read off the
    activation's shape, not the model's name. (A 2-block GPT: what is read off is the same at any size.)"""
    small = ["--n-layer", "2", "--n-embd", "16", "--n-head", "2"] if model == "gpt" else []
    code, stdout, _ = run(capsys, "diagnose", "--model", model, "--steps", "3", *small)
    assert code == 0 and ("|dL_last/dh_t| for t = 0.." in stdout) == shown


def test_only_the_training_commands_hold_back_sigterm(monkeypatch, capsys):
    """`jnnex eval` (and sample, plan, lr-find) run with the process's own SIGTERM and Ctrl-C handlers: a scheduler's
    SIGTERM ends them at once, not after an evaluation that ignores it. `train`, `diagnose` and `ladder` install the
    guard that stops after the chunk in flight. Read inside each command, as it runs."""
    import signal

    from jnnex import cli

    before = signal.getsignal(signal.SIGTERM)
    seen = {}
    for name in ("train", "diagnose", "ladder", "eval", "sample", "plan", "lr-find"):
        monkeypatch.setitem(cli.COMMANDS, name, lambda args, name=name: seen.update({name: signal.getsignal(
            signal.SIGTERM)}) or 0)
    for argv in (["train"], ["diagnose"], ["ladder"], ["eval", "--from", "r"], ["sample", "--from", "r"], ["plan"],
                 ["lr-find"]):
        assert main(argv) == 0
    assert all(seen[n] is before for n in ("eval", "sample", "plan", "lr-find")), seen
    assert all(seen[n] is not before and callable(seen[n]) for n in ("train", "diagnose", "ladder")), seen
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_run_without_out_says_its_model_is_not_kept(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--model", "bigram")
    assert code == 0 and "no --out: the trained model was not saved" in err
    code, _, err = run(capsys, "train", "--model", "bigram", "--out", str(tmp_path / "b"))
    assert code == 0 and "not saved" not in err


def test_sample_and_eval_say_when_a_run_stopped_early_or_the_data_is_not_its_own(tmp_path, capsys):
    """A run interrupted at step 10 of 30 (a second Ctrl-C's KeyboardInterrupt, raised here by a hook: no signal,
    whose disposition a background shell may have set to "ignore"; its model is saved as it was): `sample` and
    `eval` say so and how to finish it; `eval --data` on another corpus says the losses are that corpus's, in the
    line and in the JSON."""
    from jnnex import run as jrun

    out = tmp_path / "r"
    rc = jrun.RunConfig.new("mlp", n_hidden=8, steps=30, chunk=10, eval_every=30)

    def ctrl_c_at_10(step, metrics):
        if step == 10:
            raise KeyboardInterrupt

    assert jrun.train(rc, out, progress=False, on_chunk=ctrl_c_at_10).interrupted
    note = f"this run stopped at step 10 of 30: its model is the one it had then (finish it with: jnnex train " \
           f"--resume --out {out})"
    for argv in (["sample", "--from", str(out), "-n", "2"], ["eval", "--from", str(out)]):
        code, _, err = run(capsys, *argv)
        assert code == 0 and note in err, err
    assert jrun.resume(out, progress=False).steps == 30
    code, stdout, err = run(capsys, "eval", "--from", str(out), "--data", "census-last")
    assert code == 0 and "stopped at step" not in err
    assert "evaluated on census-last, not the run's data (census-first)" in err and stdout.startswith("on census-last:")
    code, stdout, err = run(capsys, "eval", "--from", str(out), "--json")
    assert json.loads(stdout)["runs_data"] is True and "note" not in err
