"""Bad input, by entry point: every case a clear error naming what was wrong — an exit code of 2 (or 1) and a message
on the command line, a ValueError/TypeError from the library — never a traceback, an XLA error or a silent NaN."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnex import build, evaluate, fit, generate, make_splits, parallel
from jnnex.cli import main
from jnnex.data import Vocab, build_sequences, build_windows, load_words, read_words, split_words
from jnnex.layers import cross_entropy_forward
from jnnex.rundir import load_pytree
from jnnex import run as run_module
from jnnex.run import RunConfig
from jnnex.layout import Parallel
from jnnex.optim import TrainConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data files and run directories to break: a fitted bigram run (fast), and copies of it damaged one way each."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "bin.txt").write_bytes(b"\xff\xfe\x00")
    (d / "dots.txt").write_text("a.b\n")
    (d / "other.txt").write_text("zoë\n" * 30)
    (d / "words.txt").write_text("\n".join(load_words("census-first")[:200]) + "\n")
    (d / "a-file").write_text("not a directory\n")
    assert main(["train", "--model", "bigram", "--data", str(d / "words.txt"), "--out", str(d / "run")]) == 0
    assert main(["train", "--model", "mlp", "--steps", "20", "--data", str(d / "words.txt"),
                 "--out", str(d / "mlp")]) == 0
    for name, damage in {"truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
                         "random": lambda p: p.write_bytes(np.random.default_rng(0).bytes(500))}.items():
        shutil.copytree(d / "run", d / name)
        damage(d / name / "model.npz")
    shutil.copytree(d / "run", d / "badjson")
    (d / "badjson" / "config.json").write_text('{"model": ')
    shutil.copytree(d / "mlp", d / "changed")
    (d / "a-dir").mkdir()
    (d / "long.txt").write_text("\n".join(load_words("census-first")[:100] + ["a" * 10_000]) + "\n")
    good = json.loads((d / "mlp" / "config.json").read_text())
    for name, edit in {  # hand-edited config.json files, one fault each
        "no-model-config": lambda c: c.pop("model_config"),
        "wrong-model": lambda c: c.update(model="transformer"),
        "vocab-list": lambda c: c.update(vocab=list(c["vocab"])),
        "config-list": lambda c: c.update(model_config=[3, 10]),
        "hidden-text": lambda c: c["model_config"].update(n_hidden="many"),
        "unknown-field": lambda c: c["train_config"].update(learning_rate=0.1),
        "bad-lr": lambda c: c["train_config"].update(lr=-1),
        "split-sum": lambda c: c.update(split=[0.5, 0.1]),
        "vocab-size": lambda c: c["model_config"].update(vocab_size=c["model_config"]["vocab_size"] + 1),
        "bn-axis": lambda c: c.update(model="bn-mlp", model_config={"vocab_size": c["model_config"]["vocab_size"],
                                                                    "batch_axis": "data"}),
    }.items():
        shutil.copytree(d / "mlp", d / name)
        c = json.loads(json.dumps(good))
        edit(c)
        (d / name / "config.json").write_text(json.dumps(c))
    (d / "top-list").mkdir()
    shutil.copy(d / "mlp" / "model.npz", d / "top-list" / "model.npz")
    (d / "top-list" / "config.json").write_text("[1, 2]")
    (d / "words.txt").rename(d / "words.orig")
    (d / "words.txt").write_text((d / "words.orig").read_text() + "zzz\n")  # the data of run 'changed' changed
    return d


CLI = [
    # argv (with {d} for the fixture's directory), exit code, words of the message
    (["train", "--data", "{d}/nope.txt"], 2, "does not exist"),
    (["train", "--data", "{d}/empty.txt"], 2, "empty.txt' is empty"),
    (["train", "--data", "{d}/bin.txt"], 2, "not valid UTF-8"),
    (["train", "--data", "{d}/dots.txt"], 2, "boundary token"),
    (["train", "--data", "{d}/a-dir"], 2, "a-dir' is a directory"),
    (["train", "--block-size", "0", "--steps", "5"], 2, "block_size must be an integer >= 1"),
    (["train", "--split", "0.5,0.1", "--steps", "5"], 2, "sum to 1"),
    (["train", "--split", "a,b"], 2, "expected comma-separated fractions"),
    (["train", "--model", "gpt", "--model-parallel", "2", "--steps", "5"], 2, "--model-parallel splits each block "
                                                                              "over devices: give --devices N too"),
    (["train", "--model", "rnn", "--devices", "2", "--model-parallel", "2", "--steps", "5"], 2,
     "--model-parallel: model 'rnn' has no split across devices (its layers are not Megatron's column/row pairs); the "
     "models that have one: gpt, llama"),
    (["train", "--shard-params", "--steps", "5"], 2, "--shard-params splits the parameters over devices: give "
                                                     "--devices N too"),
    (["train", "--parallel", "dp", "--steps", "5"], 2, "parallel: dp splits over devices: give devices too "
                                                       "(--devices N)"),
    (["train", "--parallel", "fsdp", "--devices", "4", "--model-parallel", "2", "--steps", "5"], 2,
     "--parallel fsdp and --model-parallel name two schemes: give one"),
    (["train", "--parallel", "pipeline", "--steps", "5"], 2, "argument --parallel: invalid choice: 'pipeline'"),
    (["train", "--model", "gpt", "--stages", "2", "--micro-batches", "2", "--steps", "5"], 2,
     "--stages cuts the blocks over devices: give --devices N too"),
    (["train", "--model", "gpt", "--devices", "4", "--stages", "3", "--micro-batches", "2", "--steps", "5"], 2,
     "pipeline: the stages (3) must divide the blocks (n_layer 4); it divides by [1, 2, 4]"),
    (["train", "--model", "gpt", "--devices", "4", "--stages", "2", "--micro-batches", "3", "--batch-size", "32",
      "--steps", "5"], 2, "the micro-batches (3) must divide each data shard's rows (16 of the batch_size's 32)"),
    (["train", "--model", "gpt", "--devices", "4", "--stages", "2", "--steps", "5"], 2,
     "pp cuts the blocks into stages and the batch into micro-batches: give both"),
    (["train", "--model", "gpt", "--devices", "2", "--stages", "2", "--micro-batches", "2", "--dropout", "0.1",
      "--steps", "5"], 2, "pipeline: dropout (0.1) is not pipelined yet"),
    (["train", "--model", "rnn", "--devices", "2", "--stages", "2", "--micro-batches", "2", "--steps", "5"], 2,
     "pipeline: model 'rnn' is not cut into stages"),
    (["train", "--model", "gpt", "--devices", "4", "--stages", "2", "--micro-batches", "2", "--shard-params",
      "--steps", "5"], 2, "--shard-params and --stages together (FSDP × pipeline) are not a training mode yet"),
    (["train", "--model", "gpt", "--devices", "4", "--stages", "2", "--micro-batches", "2", "--pipeline-schedule",
      "zigzag"], 2, "argument --pipeline-schedule: expected 1f1b, gpipe or alternating, or 1f1b/J or gpipe/J for "
                    "a backward in J ticks, got 'zigzag'"),
    (["train", "--model", "gpt", "--devices", "4", "--stages", "2", "--micro-batches", "2", "--pipeline-schedule",
      "alternating/2"], 2, "the alternating schedule's backward takes one tick"),
    (["train", "--model", "gpt", "--devices", "2", "--stages", "2", "--micro-batches", "2", "--pipeline-schedule",
      "1f1b/3", "--steps", "5"], 2,
     "a backward's ticks (3) must divide each stage's blocks (2 = n_layer 4 / 2 stages)"),
    (["train", "--model", "bigram", "--n-hidden", "5"], 2, "--n-hidden does not apply to model 'bigram'"),
    (["train", "--model", "mlp", "--smoothing", "0"], 2, "--smoothing does not apply to model 'mlp'"),
    (["train", "--model", "nope"], 2, "invalid choice: 'nope'"),
    (["train", "--preset", "nope"], 2, "no preset 'nope'"),
    (["train", "--lr", "-1"], 2, "lr must be a finite number > 0"),
    (["train", "--steps", "0"], 2, "steps must be an integer >= 1"),
    (["train", "--betas", "0.9"], 2, "betas must be two numbers"),
    (["train", "--optimizer", "rmsprop"], 2, "invalid choice: 'rmsprop'"),
    (["train", "--model", "bigram", "--backward", "manual"], 2, "no hand-written backward"),
    (["train", "--engine", "scalar"], 2, "unrecognized arguments: --engine"),
    (["train", "--out", "{d}/a-file"], 2, "is a file"),
    (["train", "--model", "bigram", "--data", "{d}/words.orig", "--out", "{d}/run"], 2, "already holds a run"),
    (["train", "--resume", "--out", "{d}/nowhere"], 2, "no run in"),
    (["train", "--resume", "--force", "--out", "{d}/mlp"], 2, "give one of them"),
    (["train", "--resume", "--out", "{d}/run"], 2, "fitted in closed form"),
    (["train", "--resume", "--out", "{d}/mlp", "--steps", "10"], 2, "--steps 10 conflicts with the run's 20"),
    (["train", "--resume", "--out", "{d}/mlp", "--model", "bn-mlp"], 2, "--model 'bn-mlp' conflicts"),
    (["train", "--resume", "--out", "{d}/mlp", "--batch-size", "none"], 2, "--batch-size None conflicts with the "
                                                                          "run's 32"),
    (["train", "--lr-decay-steps", "none"], 2, "argument --lr-decay-steps: invalid int value: 'none'"),
    (["train", "--resume", "--out", "{d}/mlp", "--n-layers", "2"], 2, "--n-layers does not apply to model 'mlp'"),
    (["train", "--resume", "--out", "{d}/changed"], 2, "changed since the run started"),
    (["train", "--resume", "--out", "{d}/mlp", "--steps", "10"], 2, "never shortened"),
    (["train", "--model", "bigram", "--steps", "5"], 2, "--steps does not apply to model 'bigram': it is fitted"),
    (["train", "--model", "wavenet", "--steps", "20", "--lr-boundaries", "150000"], 2,
     "lr_boundaries (150000,) must lie in [0, steps) = [0, 20)"),
    (["train", "--model", "gpt", "--n-embd", "1000000"], 2, "about the largest that fit, each with the others as they are: "
                                                           "n_embd"),
    (["train", "--model", "gpt", "--n-embd", "16384", "--n-layer", "8"], 2, "needs about"),
    (["train", "--model", "gpt", "--data", "{d}/long.txt"], 2, "with block_size=10,001 needs about"),
    (["sample", "--from", "{d}/mlp", "-n", "100000000"], 2, "sequences at once need about"),
    (["train", "--model", "llama", "--n-kv-head", "3"], 2, "n_head (4) must be divisible by n_kv_head (3)"),
    (["train", "--model", "llama", "--n-embd", "12"], 2, "the head size n_embd / n_head must be even, got 3"),
    (["train", "--model", "llama", "--attention", "tiled", "--tile", "0"], 2, "tile must be a positive integer"),
    (["train", "--model", "bigram", "--precision", "bfloat16"], 2, "--precision does not apply to model 'bigram'"),
    (["moons", "--engine", "scalar", "--precision", "bfloat16"], 2, "unrecognized arguments: --precision"),
    (["train", "--model", "mlp", "--optimizer", "muon"], 2, "optimizer muon: it trains the weight matrices of linear "
                                                            "layers (jnnex.layers.Linear), and model 'mlp' has none"),
    (["train", "--model", "llama", "--optimizer", "muon", "--muon-beta", "1"], 2, "muon_beta must be in [0, 1)"),
    (["train", "--coordinator", "localhost", "--num-processes", "2", "--process-id", "1"], 2,
     "the coordinator address must be host:port"),
    (["train", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1", "--coordinator-timeout",
      "0.3"], 2, "cannot reach the coordinator at 127.0.0.1:1 within 0.3 s"),
    (["train", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1", "--coordinator-timeout",
      "0"], 2, "the timeout must be > 0 seconds"),
    (["train", "--resume", "--out", "{d}/no-model-config"], 2, "no-model-config/config.json has no field "
                                                               "'model_config'"),
    (["sample", "--from", "{d}/wrong-model"], 2, "wrong-model/config.json: model 'transformer' is not a registered"),
    (["sample", "--from", "{d}/vocab-list"], 2, "vocab-list/config.json: vocab must be a string, got ['a'"),
    (["sample", "--from", "{d}/config-list"], 2, "config-list/config.json: model_config must be an object"),
    (["eval", "--from", "{d}/hidden-text"], 2, "hidden-text/config.json: model_config.n_hidden must be int, got 'many'"),
    (["train", "--resume", "--out", "{d}/unknown-field"], 2, "unknown-field/config.json: train_config has unknown "
                                                             "field(s) ['learning_rate']"),
    (["train", "--resume", "--out", "{d}/bad-lr"], 2, "bad-lr/config.json: train_config: lr must be a finite number"),
    (["sample", "--from", "{d}/vocab-size"], 2, "vocab-size/config.json: model_config.vocab_size 27 does not match "
                                                 "the vocabulary's 26 tokens"),
    (["eval", "--from", "{d}/split-sum"], 2, "split-sum/config.json: split must be a list of fractions that sum to 1"),
    (["sample", "--from", "{d}/top-list"], 2, "top-list/config.json must hold a JSON object"),
    (["sample", "--from", "{d}/bn-axis"], 2, "bn-axis/config.json: model_config.batch_axis is set by code at run time"),
    (["train", "--resume", "--out", "{d}/mlp", "--data", "census-last"], 2, "--data 'census-last' conflicts with the "
                                                                          "run's"),
    (["sample", "--from", "{d}"], 2, "not a finished jnnex run"),
    (["sample", "--from", "{d}/truncated"], 2, "model.npz' is not a jnnex .npz file"),
    (["sample", "--from", "{d}/random"], 2, "neither a zip archive nor a .npy array"),
    (["eval", "--from", "{d}/badjson"], 2, "config.json' is not valid JSON"),
    (["eval", "--from", "{d}/run", "--data", "{d}/other.txt"], 2, "outside the vocabulary"),
    (["sample", "--from", "{d}/run", "-n", "0"], 2, "-n must be an integer >= 1"),
    (["sample", "--from", "{d}/run", "--temperature", "0"], 2, "--temperature must be > 0"),
    (["sample", "--from", "{d}/run", "--top-k", "99"], 2,
     "--top-k must be an integer in [1, 26] or left out (None), got 99"),
    (["diagnose", "--model", "bigram"], 2, "invalid choice: 'bigram'"),
    (["moons", "--steps", "0"], 2, "--steps must be >= 1"),
    (["lr-find", "--lo", "1", "--hi", "0.1", "--steps", "5"], 2, "need 0 < lo < hi"),
    (["plan", "--check", "--block", "100000000", "--parallel", "dp", "--devices", "4"], 2,
     "GB per device (the plan), more than XLA's memory analysis can count (its temporaries ran to ~3x"),
    (["scale", "transfer", "--widths", "32", "--lrs", "1e-3", "--out", "{d}/sc"], 2,
     "--widths: give at least two widths, got [32]"),
    (["scale", "transfer", "--widths", "32,64", "--out", "{d}/sc"], 2, "--lrs: a transfer sweep needs the learning "
                                                                      "rates"),
    (["scale", "transfer", "--widths", "32,64", "--lrs", "1e-3", "--lr", "1e-3", "--out", "{d}/sc"], 2,
     "--lr: a transfer sweep takes its rates from --lrs"),
    (["scale", "transfer", "--widths", "32,64", "--lrs", "1e-3", "--param", "mup", "--out", "{d}/sc"], 2,
     "--param: a coord or transfer sweep takes --params"),
    (["scale", "transfer", "--widths", "30,64", "--lrs", "1e-3", "--out", "{d}/sc"], 2,
     "--widths: width 30 (standard): n_embd (30) must be divisible by n_head (4)"),
    (["scale", "transfer", "--widths", "32,8192", "--lrs", "1e-3", "--n-layer", "4", "--out", "{d}/sc"], 2,
     "sweep: the run standard width 8192 needs about 48.84 GiB"),
    (["scale", "transfer", "--widths", "32,64", "--lrs", "2^-4:-8", "--out", "{d}/sc"], 2,
     "--lrs: expected the lower exponent first"),
    (["scale", "coord", "--widths", "32,64", "--params", "mup,muP", "--out", "{d}/sc"], 2,
     "--params: expected standard, mup or standard,mup, got 'mup,muP'"),
    (["scale", "coord", "--widths", "32,64", "--param", "muq", "--out", "{d}/sc"], 2,
     "argument --param: invalid choice: 'muq'"),
    (["scale", "coord", "--widths", "32,64", "--lrs", "1e-3", "--out", "{d}/sc"], 2,
     "--lrs does not apply to a coord sweep"),
    (["scale", "transfer", "--widths", "32,64", "--lrs", "1e-3", "--budgets", "1e11", "--out", "{d}/sc"], 2,
     "--budgets does not apply to a transfer sweep"),
    (["scale", "law", "--widths", "32,64,96", "--step-counts", "10,20", "--params", "mup", "--out", "{d}/sc"], 2,
     "--params does not apply to a law sweep"),
    (["scale", "law", "--widths", "32,64", "--step-counts", "10,20", "--out", "{d}/sc"], 2,
     "--step-counts: a law needs at least 5 runs (widths × (step counts + budgets)), got 2 × (2 + 0)"),
    (["scale", "law", "--widths", "32,64,96", "--step-counts", "10,20", "--steps", "5", "--out", "{d}/sc"], 2,
     "--steps: a law sweep takes its lengths from --step-counts"),
    (["scale", "law", "--widths", "32,64,96", "--step-counts", "10,20", "--predict", "30:100", "--out", "{d}/sc"], 2,
     "--predict: width 30 (standard): n_embd (30) must be divisible by n_head (4)"),
]


@pytest.mark.parametrize("argv, code, words", CLI, ids=[" ".join(c[0])[:60] for c in CLI])
def test_cli_bad_input(files, capsys, monkeypatch, argv, code, words):
    monkeypatch.setenv("JNNEX_MEMORY_LIMIT", "8G")  # what counts as available: the same on every machine
    argv = [a.replace("{d}", str(files)) for a in argv]
    try:
        got = main(argv)
    except SystemExit as e:  # argparse's own errors (unknown flag or choice) exit with 2
        got = e.code
    err = capsys.readouterr().err
    assert got == code and words in err and "Traceback" not in err, (argv, got, err)
    assert not (files / "nowhere").exists()  # a failed --resume makes nothing


def _data():
    return make_splits(load_words("census-first")[:300], 3)


LIBRARY = [
    # (call, exception type, words)
    (lambda: fit(build("mlp", vocab_size=5), _data().train, TrainConfig(steps=5)), ValueError,
     "has a vocabulary of 5"),
    (lambda: fit(build("mlp", vocab_size=27), (_data().train[0][:, :2], _data().train[1]), TrainConfig(steps=5)),
     ValueError, "expects X (N, 3) and Y (N,)"),
    (lambda: fit(build("mlp", vocab_size=27), (_data().train[0], _data().train[1] + 30), TrainConfig(steps=5)),
     ValueError, "token ids in [0, 27) or -1"),
    (lambda: evaluate(build("mlp", vocab_size=27), *build("mlp", vocab_size=27).init(jax.random.key(0)),
                      _data().dev[0].astype(np.float32), _data().dev[1]), ValueError, "must be integer token ids"),
    (lambda: cross_entropy_forward(jnp.zeros((2, 5)), jnp.array([1, 5])), ValueError, "found 5"),
    (lambda: cross_entropy_forward(jnp.zeros((2, 5)), jnp.array([1, -2])), ValueError, "found -2"),
    (lambda: cross_entropy_forward(jnp.zeros((2, 5)), jnp.zeros((3,), jnp.int32)), ValueError, "same leading shape"),
    (lambda: cross_entropy_forward(jnp.zeros((2, 5)), jnp.zeros((2,))), TypeError, "y must be an integer array"),
    (lambda: build("mlp", vocab_size=27, n_layers=2), ValueError, "has no config field(s) ['n_layers']"),
    (lambda: build("transformer"), ValueError, "unknown model 'transformer'"),
    (lambda: build("gpt", n_embd=10), ValueError, "n_embd (10) must be divisible by n_head (4)"),
    (lambda: fit(build("mlp", vocab_size=27), _data().train, TrainConfig(steps=2, batch_size=30),
                 parallel=Parallel("dp", 4)), ValueError, "batch_size 30 does not divide evenly over 4 devices"),
    (lambda: Parallel("fsdp"), ValueError, "parallel: fsdp splits over devices: give devices too"),
    (lambda: Parallel("single", 4), ValueError, "parallel: single is one device, but devices 4 were given"),
    (lambda: Parallel("tp", 4), ValueError, "parallel: tp splits each block over a model axis: give its size too"),
    (lambda: Parallel("pipeline", 4), ValueError, "parallel: the scheme must be one of single, dp, fsdp, tp, pp, "
                                                  "ep, got 'pipeline'"),
    (lambda: fit(build("mlp", vocab_size=27), _data().train, TrainConfig(steps=2), parallel=Parallel("dp", 5)),
     ValueError, "devices=5 asked for, but only 4 cpu device(s) exist"),
    (lambda: parallel.initialize("127.0.0.1:1", process_id=0), ValueError, "missing ['num_processes']"),
    (lambda: parallel.initialize("127.0.0.1:1", 2, 5), ValueError, "process_id must be in [0, 2)"),
    (lambda: TrainConfig(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
    (lambda: TrainConfig(decay_mask="odd"), ValueError, "decay_mask must be one of"),
    (lambda: TrainConfig(lr_boundaries=(5, 1)), ValueError, "lr_boundaries must be increasing"),
    (lambda: build("mlp").with_gradients("numeric"), ValueError, "gradients must be one of"),
    (lambda: build("neural-bigram").with_gradients("manual"), ValueError, "no hand-written backward"),
    (lambda: split_words(["a", "b"], (0.5, 0.5, 0.0)), ValueError, "would be empty"),
    (lambda: build_windows(["ab"], Vocab.from_words(["ab"]), 0), ValueError, "block_size must be"),
    (lambda: build_sequences(["abc"], Vocab.from_words(["abc"]), 3), ValueError, "too short for a word of 3"),
    (lambda: Vocab.from_words(["ab"]).encode("ac"), ValueError, "outside the vocabulary: ['c']"),
    (lambda: generate(build("mlp"), *build("mlp").init(jax.random.key(0)), jax.random.key(0), 0), ValueError,
     "n must be an integer >= 1"),
    (lambda: load_pytree("/nonexistent/model.npz", {}), ValueError, "does not exist"),
    (lambda: TrainConfig(steps=10, lr_boundaries=(20,)), ValueError, "must lie in [0, steps) = [0, 10)"),
    (lambda: TrainConfig(steps=10).continued(5), ValueError, "can be continued to more steps, not to 5"),
    (lambda: TrainConfig(steps=10).with_steps(0), ValueError, "steps must be an integer >= 1"),
    (lambda: RunConfig.from_json({}, "x/config.json"), ValueError, "x/config.json has no field 'model'"),
    (lambda: RunConfig.from_json({**RunConfig.new("mlp").to_json(), "split_seed": "7"}, "y.json"), ValueError,
     "y.json: split_seed must be an integer, got '7'"),
    (lambda: RunConfig.new("mlp", data="census-first", n_layer=3), ValueError,
     "--n-layer does not apply to model 'mlp'"),
    (lambda: RunConfig.new("mlp", gradients="numeric"), ValueError, "gradients must be one of"),
    (lambda: RunConfig.new("neural-bigram", gradients="manual"), ValueError, "has no hand-written backward"),
    (lambda: run_module._check_agrees(RunConfig.new("mlp"), None, {"data": "census-last"}), ValueError,
     "--data 'census-last' conflicts with the run's 'census-first'"),
    (lambda: parallel.initialize("localhost", 2, 1), ValueError, "must be host:port"),
    (lambda: parallel.initialize("127.0.0.1:1", 2, 1, timeout=0.2), ValueError,
     "cannot reach the coordinator at 127.0.0.1:1"),
    (lambda: read_words("/"), ValueError, "'/' is a directory"),
]


@pytest.mark.parametrize("call, kind, words", LIBRARY, ids=[f"library-{i}" for i in range(len(LIBRARY))])
def test_library_bad_input(call, kind, words):
    with pytest.raises(kind) as e:
        call()
    assert words in str(e.value), str(e.value)


def test_diagnose_without_matplotlib_fails_before_training(monkeypatch, capsys, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    import jnnex.cli

    trained = []
    monkeypatch.setattr(jnnex.cli, "fit", lambda *a, **k: trained.append(1))
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code = main(["diagnose", "--model", "mlp", "--out", str(tmp_path)])
    assert code == 2 and "pip install 'jnnex[plot]'" in capsys.readouterr().err and not trained


def test_a_missing_data_file_says_where_one_of_that_name_is(tmp_path, monkeypatch, capsys):
    """`--data names.txt` typed in the project's root, where the file is not: the error says where the workplace's
    copy is (beside the project, ../shared/data), for train and for every reader of a data file."""
    import jnnex.data

    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "names.txt").write_text("emma\nolivia\n")
    monkeypatch.setattr(jnnex.data, "SHARED_DATA", shared)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "names.txt"]) == 2
    assert "'names.txt' does not exist" in (err := capsys.readouterr().err) and \
        "a file of that name is at shared/data/names.txt: give that path" in err, err
    with pytest.raises(ValueError, match="a file of that name is at shared/data/names.txt"):
        read_words("names.txt")
    with pytest.raises(ValueError, match=r"'other.txt' does not exist \(expected a UTF-8 text file, one word per "
                                         r"line\)$"):
        read_words("other.txt")  # no such file there either: nothing suggested
