"""What the training loop does, step by step, checked against independent computations: the learning rate applied
before and after each boundary for every optimiser (weight decay and its mask included), BatchNorm's running
statistics after fit, the lr finder's i-th loss at the i-th rate, and the command line's flags reaching the model.
A wrong loop fails here as a wrong gradient fails the gradient checks."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnex import build, make_splits
from jnnex.cli import main
from jnnex.data import bigram_pairs, load_words, split_words
from jnnex.optim import TrainConfig, make_optimizer
from jnnex.train import TrainState, fit, lr_find, make_run, make_step

WORDS = load_words("census-first")[:200]
SPLITS = make_splits(WORDS, 3)


def _float64_state(model, optimizer, seed=0):
    params, state = model.init(jax.random.key(seed))
    params = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.05, params)  # nothing exactly zero
    with jax.numpy_dtype_promotion("standard"):
        return TrainState(params, state, optimizer.init(params), jnp.zeros((), jnp.int32))


OPTIMIZERS = {
    "sgd": dict(optimizer="sgd"),
    "momentum": dict(optimizer="momentum", sgd_momentum=0.8),
    "adam": dict(optimizer="adam", betas=(0.8, 0.95)),
    "adamw, all decayed": dict(optimizer="adamw", betas=(0.9, 0.99), weight_decay=0.3),
    "adamw, matrices decayed": dict(optimizer="adamw", betas=(0.9, 0.99), weight_decay=0.3, decay_mask="matrices"),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_rate_applied_before_and_after_each_boundary(name):
    """Five full-batch steps with boundaries at 2 and 4: every parameter after every step equals a plain numpy
    re-implementation of the optimiser at the rate the schedule gives that step (0.5, 0.5, 0.05, 0.05, 0.005)."""
    tcfg = TrainConfig(steps=5, batch_size=None, lr=0.5, lr_boundaries=(2, 4), lr_factor=0.1, **OPTIMIZERS[name])
    model = build("mlp", vocab_size=SPLITS.vocab.size, n_hidden=8)
    optimizer = make_optimizer(tcfg)
    run = make_run(make_step(model, optimizer), None)
    X, Y = (jnp.asarray(a) for a in SPLITS.train)
    grad = jax.jit(jax.grad(lambda p: model.objective(p, (), X, Y)[0]))
    ts = _float64_state(model, optimizer)
    p = {k: np.asarray(v) for k, v in ts.params._asdict().items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(w) for k, w in p.items()}
    b1, b2 = tcfg.betas
    for t in range(5):
        lr = 0.5 * 0.1 ** ((t >= 2) + (t >= 4))
        g = {k: np.asarray(w) for k, w in grad(type(ts.params)(**p))._asdict().items()}
        for k in p:
            if tcfg.optimizer == "sgd":
                step = g[k]
            elif tcfg.optimizer == "momentum":
                m[k] = g[k] + tcfg.sgd_momentum * m[k]
                step = m[k]
            else:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                step = (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + tcfg.adam_eps)
                if tcfg.optimizer == "adamw" and (tcfg.decay_mask == "all" or p[k].ndim >= 2):
                    step = step + tcfg.weight_decay * p[k]
            p[k] = p[k] - lr * step
        ts, _ = run(ts, X, Y, jax.random.key(0), n_steps=1)
        for k in p:
            np.testing.assert_allclose(getattr(ts.params, k), p[k], rtol=1e-10, atol=1e-13, err_msg=f"{k} at {t}")


@pytest.mark.slow
def test_fit_updates_batchnorm_running_statistics():
    """With momentum 1 the running statistics after one full-batch step are exactly that batch's: the mean and the
    unbiased variance of the first linear's output over the training set under the initial parameters."""
    model = build("bn-mlp", vocab_size=SPLITS.vocab.size, n_hidden=16, momentum=1.0)
    X, Y = SPLITS.train
    res = fit(model, SPLITS.train, TrainConfig(steps=1, batch_size=None, eval_every=1), evals={})
    params0, _ = model.init(jax.random.split(jax.random.key(0))[0])  # fit's initialisation key for seed 0
    C, (W1, b1) = np.asarray(params0.C, np.float64), params0.dense[0]
    pre = C[X].reshape(len(X), -1) @ np.asarray(W1, np.float64) + np.asarray(b1, np.float64)
    np.testing.assert_allclose(res.ts.state[0].mean, pre.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.ts.state[0].var, pre.var(0, ddof=1), rtol=1e-4, atol=1e-5)
    # and they keep moving with the default momentum: each step's state differs from the last
    model = build("bn-mlp", vocab_size=SPLITS.vocab.size, n_hidden=16)
    a = fit(model, SPLITS.train, TrainConfig(steps=2, eval_every=2), evals={})
    b = fit(model, SPLITS.train, TrainConfig(steps=3, eval_every=3), evals={})
    assert not np.array_equal(a.ts.state[0].mean, b.ts.state[0].mean)


@pytest.mark.slow
def test_lr_finder_takes_the_ith_loss_at_the_ith_rate():
    model = build("mlp", vocab_size=SPLITS.vocab.size, n_hidden=8)
    lrs, losses = lr_find(model, SPLITS.train, lo=0.01, hi=1.0, steps=4, batch_size=None, seed=3)
    np.testing.assert_allclose(lrs, np.geomspace(0.01, 1.0, 4), rtol=1e-6)
    X, Y = (jnp.asarray(a) for a in SPLITS.train)
    params, _ = model.init(jax.random.split(jax.random.key(3))[0])
    for i in range(4):  # loss i is measured before update i, which uses rate i
        loss, g = jax.value_and_grad(lambda p: model.objective(p, (), X, Y)[0])(params)
        np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
        params = jax.tree.map(lambda p, d: p - jnp.float32(lrs[i]) * d, params, g)


@pytest.mark.parametrize("smoothing", [0.0, 1.0])
def test_cli_smoothing_reaches_the_counting_bigram(tmp_path, capsys, smoothing):
    """The command line's --smoothing gives exactly the loss of add-k counts computed here from the words."""
    data = tmp_path / "w.txt"
    data.write_text("\n".join(WORDS) + "\n")
    assert main(["train", "--model", "bigram", "--data", str(data), "--smoothing", str(smoothing), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["train_loss"]
    xs, ys = bigram_pairs(WORDS, SPLITS.vocab)
    counts = np.zeros((SPLITS.vocab.size,) * 2)
    np.add.at(counts, (xs, ys), 1)
    P = (counts + smoothing) / (counts + smoothing).sum(1, keepdims=True)
    assert got == pytest.approx(-np.log(P[xs, ys]).mean(), rel=1e-6)


@pytest.mark.slow
def test_cli_train_equals_the_library(tmp_path, capsys):
    """`jnnex train` and `fit` with the same settings give the same losses to the last bit (flags reach the model,
    the schedule is the library's, the split is the documented one)."""
    code = main(["train", "--model", "bn-mlp", "--steps", "600", "--eval-every", "300", "--n-hidden", "32",
                 "--lr", "0.2", "--seed", "4", "--json"])
    cli = json.loads(capsys.readouterr().out)
    words = load_words("census-first")
    sp = make_splits(words, 3)
    assert [len(s) for s in split_words(words)] == [4130, 516, 517]
    model = build("bn-mlp", vocab_size=sp.vocab.size, n_hidden=32)
    res = fit(model, sp, TrainConfig(steps=600, eval_every=300, lr=0.2, seed=4))
    assert code == 0 and cli["steps"] == 600 and cli["params"] == 27 * 10 + 30 * 32 + 32 + 2 * 32 + 32 * 27 + 27
    assert cli["train_loss"] == res.evals[-1]["train_loss"] and cli["dev_loss"] == res.evals[-1]["dev_loss"]
    assert math.isfinite(cli["test_loss"])
