"""The training machinery (:mod:`jnnex.train`): the step's gradients, one compile per chunk length, bit-identical
resume and chunking, non-finite losses, the schedule, lr-find, Ctrl-C, gradient clipping, dropout masks per step."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jnnex import rundir
from jnnex.run import RunWriter, load_checkpoint
from jnnex.data import Vocab, load_words, make_splits
from jnnex.lm import evaluate
from jnnex.models.mlp_lm import MLPConfig, mlp_lm
from jnnex.optim import TrainConfig, make_optimizer, muon_labels
from jnnex.train import (
    NonFiniteLossError, TrainState, ctrl_c_guard, fit, init_train_state, initial_params, lr_find, make_run, make_step,
)

WORDS = load_words("census-first")[:600]
SPLITS = make_splits(WORDS, 3)
V = SPLITS.vocab.size


@given(st.integers(0, 10_000), st.sampled_from([1, 2, 4]), st.sampled_from([2, 5]), st.sampled_from([3, 16]),
       st.sampled_from([1, 7, 32]))
def test_step_gradients_equal_jax_grad(seed, T, n_embd, n_hidden, B):
    """The machinery's step applies exactly -lr * jax.grad(loss) (plain SGD), in float64."""
    cfg = MLPConfig(vocab_size=V, block_size=T, n_embd=n_embd, n_hidden=n_hidden)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params, state = mlp_lm(cfg).init(k1)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    x = jax.random.randint(k2, (B, T), 0, V, dtype=jnp.int32)
    y = jax.random.randint(k3, (B,), 0, V, dtype=jnp.int32)
    new_ts, metrics, grads, ref_loss = step_and_reference(cfg, params, state, x, y)
    for p_new, p_old, g in zip(new_ts.params, params, grads):
        np.testing.assert_allclose((p_old - p_new) / LR, g, rtol=1e-10, atol=1e-12)
    assert float(metrics["loss"]) == pytest.approx(float(ref_loss), rel=1e-12)


LR = 0.37


@functools.partial(jax.jit, static_argnums=0)
def step_and_reference(cfg, params, state, x, y):
    """One compilation per shape: the machinery's SGD step, and jax.grad of the loss written out independently."""
    model = mlp_lm(cfg)
    optimizer = optax.sgd(LR)
    ts = TrainState(params, state, optimizer.init(params), jnp.zeros((), jnp.int32))
    new_ts, metrics = make_step(model, optimizer)(ts, (x, y), jax.random.key(0))

    def loss(p):
        logits = model.apply(p, state, x, train=True)[0]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), y])

    return new_ts, metrics, jax.grad(loss)(params), loss(params)


def test_second_call_does_not_recompile():
    model = mlp_lm(MLPConfig(vocab_size=V))
    tcfg = TrainConfig(steps=20)
    opt = make_optimizer(tcfg)
    run = make_run(make_step(model, opt), 8)
    ts = init_train_state(model, opt, jax.random.key(0))
    X, Y = (jnp.asarray(a) for a in SPLITS.train)
    ts, m1 = run(ts, X, Y, jax.random.key(1), n_steps=10)
    assert run._cache_size() == 1
    ts, m2 = run(ts, X, Y, jax.random.key(1), n_steps=10)
    assert run._cache_size() == 1
    assert int(ts.step) == 20 and m2["loss"].shape == (10,)
    assert not np.array_equal(m1["loss"], m2["loss"])  # different steps drew different batches


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    model = mlp_lm(MLPConfig(vocab_size=V, n_hidden=32))
    tcfg = TrainConfig(steps=120, eval_every=40, chunk=20, batch_size=16, lr_boundaries=(60,), seed=5,
                       optimizer="adam", lr=0.01)
    (tmp_path / "full").mkdir()
    full = fit(model, SPLITS, tcfg, hooks=[RunWriter(tmp_path / "full")])
    # An interrupted run: stopped after step 40 (its checkpoint), then a resume to the end.
    part = tmp_path / "part"

    def stop_at_40(step, metrics):
        if step == 40:
            raise KeyboardInterrupt

    part.mkdir()
    stopped = fit(model, SPLITS, tcfg, hooks=[RunWriter(part), stop_at_40])
    assert stopped.interrupted and int(stopped.ts.step) == 40
    rundir.truncate_metrics(part, 40)  # (what jnnex.run.resume does: nothing was written past the checkpoint here)
    resumed = fit(model, SPLITS, tcfg, resume_from=load_checkpoint(part, model, tcfg), hooks=[RunWriter(part, 40)])
    assert int(resumed.ts.step) == 120
    for a, b in zip(jax.tree.leaves(full.ts), jax.tree.leaves(resumed.ts)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(full.losses[40:], resumed.losses)
    # the resumed run's metric log has each chunk once, evaluations where they fall, all equal to the unbroken run's
    rows = rundir.read_metrics(part)
    assert [r["step"] for r in rows] == [20, 40, 60, 80, 100, 120]
    assert [r["step"] for r in rows if "train_loss" in r] == [40, 80, 120]
    full_rows = rundir.read_metrics(tmp_path / "full")
    for r, f in zip(rows, full_rows):
        assert {k: v for k, v in r.items() if k != "time"} == {k: v for k, v in f.items() if k != "time"}


@pytest.mark.slow
def test_chunking_does_not_change_the_result():
    model = mlp_lm(MLPConfig(vocab_size=V, n_hidden=16))
    a = fit(model, SPLITS.train, TrainConfig(steps=60, chunk=60, eval_every=60), evals={})
    b = fit(model, SPLITS.train, TrainConfig(steps=60, chunk=7, eval_every=60), evals={})
    np.testing.assert_array_equal(a.losses, b.losses)


@pytest.mark.slow
def test_non_finite_loss_names_the_step_and_keeps_checkpoint(tmp_path):
    """The loop names the first bad step and calls no hook's ``end`` (so the checkpoint on disk stays the last good
    one); the run driver names that checkpoint in the error."""
    from jnnex.run import RunConfig, train as train_run

    model = mlp_lm(MLPConfig(vocab_size=V))
    good = TrainConfig(steps=20, eval_every=20, chunk=10, lr_boundaries=())
    fit(model, SPLITS.train, good, evals={}, hooks=[RunWriter(tmp_path)])
    saved = (tmp_path / "checkpoint.npz").read_bytes()
    # Resumed with a learning rate that overflows float32 after one update: step 20 is finite, step 21 is not.
    bad = dataclasses.replace(good, steps=200, lr=1e38)
    with pytest.raises(NonFiniteLossError, match=r"at step 21\. Lower") as info:
        fit(model, SPLITS.train, bad, evals={}, resume_from=load_checkpoint(tmp_path, model, bad),
            hooks=[RunWriter(tmp_path, 20)])
    assert info.value.step == 21
    assert (tmp_path / "checkpoint.npz").read_bytes() == saved
    # A run whose rate becomes 1e38 at step 20 (the same overflow), through the driver: the checkpoint named.
    rc = RunConfig.new("mlp", "census-first", steps=200, eval_every=20, chunk=10, lr=1.0, lr_boundaries=(20,),
                       lr_factor=1e38)
    with pytest.raises(NonFiniteLossError, match=r"at step 21; the last good checkpoint \(step 20\) is kept"):
        train_run(rc, tmp_path / "run", progress=False)


def test_piecewise_schedule_matches_lecture():
    from jnnex.optim import lr_schedule

    s = lr_schedule(TrainConfig())
    assert float(s(0)) == pytest.approx(0.1) and float(s(99_999)) == pytest.approx(0.1)
    assert float(s(100_000)) == pytest.approx(0.01)


@pytest.mark.slow
def test_lr_find_sweeps_exponentially():
    model = mlp_lm(MLPConfig(vocab_size=V))
    lrs, losses = lr_find(model, SPLITS.train, steps=50)
    assert lrs.shape == losses.shape == (50,)
    np.testing.assert_allclose(lrs[[0, -1]], [1e-3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.diff(np.log(lrs)), np.log(1000) / 49, rtol=1e-4)
    assert np.isfinite(losses).all()


def test_evaluate_matches_direct_computation():
    model = mlp_lm(MLPConfig(vocab_size=V))
    params, state = model.init(jax.random.key(2))
    X, Y = SPLITS.dev
    logits = model.apply(params, state, jnp.asarray(X), train=False)[0]
    direct = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(len(Y)), Y])
    assert evaluate(model, params, state, X, Y, chunk=1000) == pytest.approx(direct, rel=1e-5)


def test_bad_train_config():
    for kwargs, msg in [({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"lr": float("nan")}, "lr"),
                        ({"optimizer": "lbfgs"}, "optimizer")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**kwargs)


@given(st.integers(0, 10_000), st.sampled_from([1, 3]), st.sampled_from([2, 32]))
def test_hand_written_gradient_path_through_the_machinery(seed, T, B):
    """A model on gradients="manual" trains on its hand-written backward: the manual MLP backward, as the training
    machinery calls it (``value_and_grad``), equals jax.grad (float64)."""

    cfg = MLPConfig(vocab_size=V, block_size=T, n_embd=3, n_hidden=8)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params, state = mlp_lm(cfg).init(k1)
    params = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.01, params)  # non-zero biases
    x = jax.random.randint(k2, (B, T), 0, V, dtype=jnp.int32)
    x = x.at[0].set(x[1 % B])  # a repeated context: the embedding scatter-add must accumulate
    y = jax.random.randint(k3, (B,), 0, V, dtype=jnp.int32)
    loss_m, grads_m, _ = jax.jit(mlp_lm(cfg).with_gradients("manual").value_and_grad)(params, state, x, y)
    loss_a, grads_a, _ = jax.jit(mlp_lm(cfg).value_and_grad)(params, state, x, y)
    assert float(loss_m) == pytest.approx(float(loss_a), rel=1e-12)
    for gm, ga in zip(grads_m, grads_a):
        np.testing.assert_allclose(gm, ga, rtol=1e-10, atol=1e-13)


@pytest.mark.slow
def test_manual_and_autodiff_training_runs_agree():

    cfg = MLPConfig(vocab_size=V)
    tcfg = TrainConfig(steps=300, eval_every=300, chunk=100)
    a = fit(mlp_lm(cfg), SPLITS.train, tcfg, evals={})
    m = fit(mlp_lm(cfg).with_gradients("manual"), SPLITS.train, tcfg, evals={})
    np.testing.assert_allclose(m.losses, a.losses, rtol=1e-4)  # float32, same key and batches


@pytest.mark.slow
def test_first_ctrl_c_finishes_the_chunk_and_returns(tmp_path, sigint_default):
    """In-process: one SIGINT mid-run ends fit() after the chunk in flight, saved, with no KeyboardInterrupt.

    The signal is sent from fit's own hook after the first chunk (an event, not a timer), so the guard is certainly
    in place however long compilation takes on a loaded machine, and the stopping step is exact."""
    import os
    import signal

    model = mlp_lm(MLPConfig(vocab_size=V))
    tcfg = TrainConfig(steps=10_000_000, eval_every=1000, chunk=500)
    sent = []

    def interrupt_once(step, metrics):
        if not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)

    res = fit(model, SPLITS.train, tcfg, evals={}, hooks=[RunWriter(tmp_path), interrupt_once])
    assert sent == [500] and res.interrupted and int(res.ts.step) == 500 and res.losses.shape == (500,)
    # Interrupted between evaluations: the chunk is saved all the same (model.npz is jnnex.run's to write).
    assert res.signal == signal.SIGINT
    saved = rundir.load_pytree(tmp_path / "checkpoint.npz", res.ts)
    assert int(saved.step) == 500
    np.testing.assert_array_equal(saved.params.W1, res.ts.params.W1)


def test_ctrl_c_guard_defers_the_first_and_raises_on_the_second(sigint_default):
    import os
    import signal

    # CPython runs a signal's Python handler in the main thread right after os.kill returns (the next bytecode), so
    # each check below follows the delivery it tests: no timer, no sleep.
    with ctrl_c_guard() as ctrl_c:
        os.kill(os.getpid(), signal.SIGINT)  # the first: no exception, a flag
        assert ctrl_c.pressed
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    # A process that ignores SIGINT keeps ignoring it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with ctrl_c_guard():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.parametrize("clip", [1e-3, 1e3])
def test_grad_clip_scales_the_update_to_the_global_norm(clip):
    """``grad_clip``: the update is the SGD step of the gradient rescaled to global norm ``clip`` when it is longer,
    untouched when it is shorter (the recurrent nets' guard against exploding gradients through time)."""
    from jnnex.models.rnn import RNNConfig, rnn
    from jnnex.optim import TrainConfig, make_optimizer
    from jnnex.train import TrainState, make_step

    model = rnn(RNNConfig(vocab_size=5, block_size=4, n_embd=3, n_embd2=4)).with_gradients("manual")
    tcfg = TrainConfig(lr=0.5, lr_boundaries=(), grad_clip=clip)
    opt = make_optimizer(tcfg)
    params, state = model.init(jax.random.key(0))
    x = jnp.array([[0, 1, 2, 3], [0, 4, 4, 1]], jnp.int32)
    y = jnp.array([[1, 2, 3, 0], [4, 4, 1, -1]], jnp.int32)
    _, grads, _ = model.value_and_grad_manual(params, state, x, y)
    norm = float(optax.tree.norm(grads))
    ts = TrainState(params, state, opt.init(params), jnp.zeros((), jnp.int32))
    new, _ = make_step(model, opt)(ts, (x, y), jax.random.key(1))
    scale = min(1.0, clip / norm)
    assert (scale < 1.0) == (clip < norm)  # the two cases really are one clipped, one not
    for p0, p1, g in zip(jax.tree.leaves(params), jax.tree.leaves(new.params), jax.tree.leaves(grads)):
        np.testing.assert_allclose(p1, p0 - 0.5 * scale * g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch_size", [None, 4], ids=["whole-set", "minibatch"])
@pytest.mark.parametrize("name", ["wavenet", "gpt"])
def test_consecutive_steps_draw_different_dropout_masks(name, batch_size):
    """With the learning rate 0 and the same batch every step — the whole set, or minibatches drawn from a set of one
    example repeated, so every draw is the same rows — a step's loss can change only through its dropout masks:
    consecutive steps differ (each step its own key, fold_in(key, step)); with dropout 0 they do not; and a step run
    after a resume (its own call) draws the mask it drew in the unbroken run."""
    import jnnex.models.registry as registry

    words = load_words("census-first")[:16]
    vocab = Vocab.from_words(words)
    spec = registry.REGISTRY[name]
    small = {"n_hidden": 8, "n_embd": 4} if name == "wavenet" else {"n_layer": 1, "n_embd": 8, "n_head": 2}
    losses = {}
    for dropout in (0.0, 0.5):
        model = registry.build_for_words(spec, words, vocab, dropout=dropout, **small)
        X, Y = (jnp.asarray(a) for a in make_splits(words, model.block_size, (1.0,), vocab=vocab,
                                                    per_position=model.per_position).train)
        if batch_size is not None:
            X, Y = jnp.repeat(X[:1], 8, axis=0), jnp.repeat(Y[:1], 8, axis=0)
        optimizer = optax.sgd(0.0)
        run = make_run(make_step(model, optimizer), batch_size)
        ts = init_train_state(model, optimizer, jax.random.key(0))
        _, m = run(ts, X, Y, jax.random.key(1), n_steps=3)
        losses[dropout] = np.asarray(m["loss"])
        if dropout:  # steps 1 and 2 again, after a "resume" at step 1: the same masks
            ts1, _ = run(ts, X, Y, jax.random.key(1), n_steps=1)
            _, again = run(ts1, X, Y, jax.random.key(1), n_steps=2)
            np.testing.assert_allclose(np.asarray(again["loss"]), losses[dropout][1:], rtol=1e-6)
    assert len(set(losses[0.0].tolist())) == 1, losses[0.0]  # nothing else changes between the steps
    assert len(set(losses[0.5].tolist())) == 3, losses[0.5]  # every step its own masks


def test_muon_orthogonalises_each_linear_matrix_and_adamw_trains_the_rest():
    """``optimizer="muon"``, one step on a small Llama: each linear layer's weight matrix moves by an orthogonalised
    matrix — the singular values of ``ΔW / (lr · 0.2 · √max(fan_in, fan_out))`` near 1 in every direction where the
    gradient is not negligible (over 1 % of its Frobenius norm; Newton–Schulz leaves the rest near 0), where the
    gradient's own are spread — and every other parameter (the embedding table, the head, the RMSNorm gains) moves
    exactly as under ``optimizer="adamw"`` with the same settings."""
    from jnnex.models.llama import LlamaConfig, llama

    model = llama(LlamaConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_kv_head=1, n_embd=16))
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.randint(k[1], (4, 8), 0, 11, jnp.int32)
    y = jax.random.randint(k[2], (4, 8), 0, 11, jnp.int32)
    lr = 0.01
    new = {}
    for name in ("muon", "adamw"):
        opt = make_optimizer(TrainConfig(optimizer=name, lr=lr, lr_boundaries=(), weight_decay=0.1))
        ts = init_train_state(model, opt, k[0])
        new[name], _ = jax.jit(make_step(model, opt))(ts, (x, y), jax.random.key(1))  # (eager: a compile an op)
    _, grads, _ = jax.jit(model.value_and_grad)(ts.params, ts.state, x, y)
    labels = jax.tree.leaves(muon_labels(ts.params))
    assert labels.count("muon") == 4 * 2  # qkv, attproj, fc, fcproj in each of the 2 blocks
    for label, p0, pm, pa, g in zip(labels, *(jax.tree.leaves(t) for t in (ts.params, new["muon"].params,
                                                                           new["adamw"].params, grads))):
        if label == "adamw":
            np.testing.assert_array_equal(pm, pa)
            continue
        # Muon's decay is decoupled as AdamW's: (1 - lr·wd) W, then the orthogonalised step.
        step = (np.asarray(pm) - (1 - lr * 0.1) * np.asarray(p0)) / (lr * 0.2 * np.sqrt(max(p0.shape)))
        sv = np.linalg.svd(step, compute_uv=False)  # both in descending order
        sg = np.linalg.svd(np.asarray(g), compute_uv=False)
        kept = sg > 0.01 * np.linalg.norm(sg)
        assert kept.sum() >= len(sg) // 2 and sg[0] / sg[kept][-1] > 3, sg  # far from orthogonal: the test can tell
        assert 0.5 < sv[kept].min() and sv.max() < 1.3, (p0.shape, sv, sg)


def test_muon_with_the_registrys_settings_decays_what_it_says_and_nothing_else():
    """The Llama ``improved`` preset's optimiser (Muon, lr 1e-3, weight decay 0.1 on the matrices), one step on a
    zero gradient: Muon's and Adam's steps are 0, so what moves is the decoupled decay alone — every matrix (the
    linear layers' under Muon, the embedding table under AdamW) becomes exactly ``(1 − lr·wd) W``; the vectors (the
    RMSNorm gains) stay where they were. Computed here, not by optax: a Muon without its decay, or its AdamW part
    without the mask, fails."""
    import optax

    from jnnex.models import registry
    from jnnex.run import RunConfig

    rc = RunConfig.new("llama", "census-first", preset="improved", n_embd=16, n_head=2, n_kv_head=1,
                        n_layer=2)
    tcfg = rc.train
    assert (tcfg.optimizer, tcfg.weight_decay, tcfg.decay_mask) == ("muon", 0.1, "matrices")  # the registry's
    params, _ = registry.REGISTRY["llama"].build(rc.model_config).init(jax.random.key(0))
    opt = make_optimizer(tcfg)
    zero = jax.tree.map(jnp.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):  # (optax mixes integer counts with float constants, as in the step)
        updates, _ = opt.update(zero, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    labels = jax.tree.leaves(muon_labels(params))
    kinds = set()
    for label, p0, p1 in zip(labels, jax.tree.leaves(params), jax.tree.leaves(new), strict=True):
        p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
        if p0.ndim >= 2:
            np.testing.assert_allclose(p1, (1 - tcfg.lr * tcfg.weight_decay) * p0, rtol=1e-6, atol=0)
        else:
            np.testing.assert_array_equal(p1, p0)
        kinds.add((label, p0.ndim >= 2))
    assert kinds == {("muon", True), ("adamw", True), ("adamw", False)}, kinds  # each case seen


def test_initial_params_are_where_fit_starts():
    """`initial_params(model, seed)` (what `jnnex diagnose` profiles as the initialisation) is the run's own start:
    a step at learning rate 1e-30 leaves them where they began (to 1e-25: zero-initialised biases move by ~1e-31)."""
    model = mlp_lm(MLPConfig(vocab_size=V, n_hidden=16))
    res = fit(model, SPLITS.train, TrainConfig(steps=1, lr=1e-30, lr_boundaries=(), eval_every=1, seed=7),
              evals={})
    start, _ = initial_params(model, 7)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(res.ts.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-25)
    assert not np.array_equal(jax.tree.leaves(initial_params(model, 8)[0])[0], jax.tree.leaves(start)[0])
