"""The contract every registered model keeps, checked the day it is registered (parametrised over the registry, plus
a toy per-position model registered here the way a user would add one)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnex import rundir
from jnnex.check import assert_model_gradients, randomise
from jnnex.cli import main
from jnnex.data import Vocab, load_words, make_splits
from jnnex.lm import evaluate, generate
from jnnex.models.registry import REGISTRY, ModelSpec, build_for_words, has_manual_backward
from jnnex.optim import TrainConfig

import toy_model

WORDS = load_words("census-first")[:300]
VOCAB = Vocab.from_words(WORDS)
TOY = ModelSpec(toy_model.toy, toy_model.ToyConfig, TrainConfig(steps=200, lr=1.0, lr_boundaries=(), eval_every=100),
                per_position=True, summary="toy per-position bigram (a test's own model)")


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", TOY)


NAMES = [*REGISTRY, "toy"]


def spec_of(name, monkeypatch):
    if name == "toy":
        monkeypatch.setitem(REGISTRY, "toy", TOY)
    return REGISTRY[name]


def model_and_data(name, monkeypatch, **over):
    model = build_for_words(spec_of(name, monkeypatch), WORDS, VOCAB, **over)
    return model, make_splits(WORDS, model.block_size, vocab=VOCAB, per_position=model.per_position)


@pytest.mark.parametrize("name", NAMES)
def test_the_registry_entry_says_what_the_model_is(name, monkeypatch):
    """What the run reads off the entry without building the model — per position or not, trained or fitted —
    is what the model says."""
    spec = spec_of(name, monkeypatch)
    model = spec.build(spec.config())
    assert spec.per_position == model.per_position
    assert (spec.train is None) == (spec.fit_fn is not None)
    assert model.name == name


def direct_nll(model, params, state, X, Y):
    """The mean NLL over the valid targets, in float64 numpy, from one apply on the whole split."""
    logits = np.asarray(model.apply(params, state, jnp.asarray(X), train=False)[0], np.float64)
    logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    valid = Y >= 0
    picked = np.take_along_axis(logprobs, np.where(valid, Y, 0)[..., None], axis=-1)[..., 0]
    return -picked[valid].sum() / valid.sum()


@pytest.mark.parametrize("name", NAMES)
def test_initial_loss_is_about_ln_V(name, monkeypatch):
    model, splits = model_and_data(name, monkeypatch)
    params, state = model.init(jax.random.key(0))
    loss = evaluate(model, params, state, *splits.train)
    assert abs(loss - math.log(VOCAB.size)) < 0.1, (name, loss)


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_equals_a_direct_computation(name, monkeypatch):
    model, splits = model_and_data(name, monkeypatch)
    params, state = model.init(jax.random.key(1))
    params = randomise(params, jax.random.key(2), jnp.float32, scale=0.5)  # not the near-uniform init
    X, Y = splits.dev
    assert evaluate(model, params, state, X, Y, chunk=37) == pytest.approx(direct_nll(model, params, state, X, Y),
                                                                           rel=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if n == "toy" or has_manual_backward(n)])
def test_manual_gradients_equal_jax_grad_float64(name, monkeypatch):
    model, splits = model_and_data(name, monkeypatch)
    params, state = model.init(jax.random.key(3))
    params = randomise(params, jax.random.key(4), jnp.float64)
    state = jax.tree.map(lambda s: s.astype(jnp.float64), state)
    x, y = (jnp.asarray(a[:16]) for a in splits.train)
    assert_model_gradients(model, params, state, x, y, jax.random.key(5))


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, monkeypatch, tmp_path):
    model, _ = model_and_data(name, monkeypatch)
    params, state = model.init(jax.random.key(5))
    rundir.save_pytree(tmp_path / "m.npz", (params, state))
    loaded = rundir.load_pytree(tmp_path / "m.npz", model.init(jax.random.key(6)))
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_sampling_shapes_and_determinism(name, monkeypatch):
    model, _ = model_and_data(name, monkeypatch, **({"scale": 1.0} if name == "toy" else {}))
    params, state = model.init(jax.random.key(7))
    toks = generate(model, params, state, jax.random.key(8), 6, max_len=20)
    assert toks.shape == (6, 20) and toks.dtype == np.int32 and ((0 <= toks) & (toks < VOCAB.size)).all()
    np.testing.assert_array_equal(toks, generate(model, params, state, jax.random.key(8), 6, max_len=20))
    assert not np.array_equal(toks, generate(model, params, state, jax.random.key(9), 6, max_len=20))
    for row in toks:  # once the boundary token is drawn, the rest is padding
        ends = np.flatnonzero(row == 0)
        assert ends.size == 0 or (row[ends[0]:] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_cli_train_sample_eval(name, monkeypatch, tmp_path, capsys):
    spec_of(name, monkeypatch)
    data = tmp_path / "words.txt"
    data.write_text("\n".join(WORDS) + "\n")
    out = tmp_path / "run"
    manual = name == "toy" or has_manual_backward(name)  # trained on the hand-written backward where there is one
    steps = [] if REGISTRY[name].fit_fn is not None else ["--steps", "20"]  # closed form: no training settings
    code = main(["train", "--model", name, "--data", str(data), *steps, "--out", str(out), "--json",
                 *(["--backward", "manual"] if manual else [])])
    metrics = json.loads(capsys.readouterr().out)
    assert code == 0 and metrics["model"] == name and np.isfinite(metrics["train_loss"])
    assert (out / "model.npz").is_file() and (out / "config.json").is_file()
    assert main(["sample", "--from", str(out), "-n", "3"]) == 0 and len(capsys.readouterr().out.splitlines()) == 3
    assert main(["eval", "--from", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-6)


def test_a_registered_toy_model_is_benchmarked(toy_registered):
    """The manual-vs-autodiff benchmark picks the toy up from its registry entry and its three contenders agree."""
    from jnnex.bench import backward

    case = next(c for c in backward.cases(widths=()) if c.name == "toy")
    args, fns = case.make(8, jnp.float64, 0)
    grads = {k: jax.jit(f)(*args) for k, f in fns.items()}
    for k in ("jax.grad", "jax.vjp"):
        for a, b in zip(jax.tree.leaves(grads["manual"]), jax.tree.leaves(grads[k])):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_per_position_padding_gets_no_gradient(monkeypatch):
    """Ignored targets (-1 after a word's end) contribute nothing: changing what the model predicts there changes
    neither the loss nor any gradient."""
    model, splits = model_and_data("toy", monkeypatch)
    params, state = model.init(jax.random.key(0))
    params = randomise(params, jax.random.key(1), jnp.float64, scale=1.0)
    params = params._replace(W=params.W + jax.random.normal(jax.random.key(2), params.W.shape, jnp.float64))
    x, y = (jnp.asarray(a[:4]) for a in splits.train)
    assert (y == -1).any()
    x_other = jnp.where(y == -1, (x + 1) % VOCAB.size, x)  # other inputs exactly where nothing is predicted
    loss, grads, _ = model.value_and_grad_manual(params, state, x, y)
    loss2, grads2, _ = model.value_and_grad_manual(params, state, x_other, y)
    assert float(loss) == float(loss2)
    np.testing.assert_array_equal(grads.W, grads2.W)


def test_every_registered_language_model_starts_near_ln_V():
    """Built with its defaults, every language model's initial loss is within 0.05 of ln V."""
    V = 27
    x1 = jax.random.randint(jax.random.key(1), (512, 16), 0, V, dtype=jnp.int32)
    y1 = jax.random.randint(jax.random.key(2), (512, 16), 0, V, dtype=jnp.int32)
    for name, spec in REGISTRY.items():
        model = spec.build(spec.config(vocab_size=V))
        params, state = jax.jit(model.init)(jax.random.key(0))  # (one program each: eager, a compile an op)
        T = model.block_size
        y = y1[:, :T] if model.per_position else y1[:, 0]  # (512, T) per position, (512,) for a window
        loss, _ = jax.jit(model.loss)(params, state, x1[:, :T], y)
        assert abs(float(loss) - math.log(V)) < 0.05, name


def test_a_new_model_is_its_file_plus_one_registry_entry(tmp_path, capsys, monkeypatch):
    """tests/toy_model.py is a model as a user adds one: that file, and one ModelSpec (TOY, above) in REGISTRY. Nothing
    else is edited, and the command line, the run and the hand-written backward all take it up: its config field is
    a flag (--scale, with the models it applies to), it trains on its backward, samples and evaluates."""
    monkeypatch.setitem(REGISTRY, "toy", TOY)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "[toy]" in " ".join(capsys.readouterr().out.split())
    data = tmp_path / "words.txt"
    data.write_text("\n".join(WORDS) + "\n")
    assert main(["train", "--model", "toy", "--scale", "0.5", "--backward", "manual", "--steps", "20", "--data",
                 str(data), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    cfg = rundir.read_json(tmp_path / "run" / "config.json")
    assert cfg["model"] == "toy" and cfg["model_config"]["scale"] == 0.5 and cfg["backward"] == "manual"
    assert main(["sample", "--from", str(tmp_path / "run"), "-n", "2"]) == 0
    assert main(["eval", "--from", str(tmp_path / "run")]) == 0
    capsys.readouterr()
