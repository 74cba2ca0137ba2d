"""The BatchNorm MLPs of makemore parts 3-4 (:mod:`jnnex.models.bn_mlp`): the hand-written backward against jax.grad
(float64, drawn nets and batches), in float32, training on it; initial loss and eval mode; exact-statistics
calibration and folding BatchNorm into the linear layers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given

from jnnex import strategies
from jnnex.layers import BatchNormParams, batchnorm
from jnnex.models.bn_mlp import BN_MLP_SMALL, BNMLPConfig, bn_mlp, calibrate, fold_batchnorm
from jnnex.data import load_words, make_splits
from jnnex.optim import TrainConfig
from jnnex.train import fit


def value_and_grad(cfg, params, state, x, y):
    """The BatchNorm net's hand-written loss and gradients (bn_mlp.forward, cross-entropy, bn_mlp.backward)."""
    return bn_mlp(cfg).value_and_grad_manual(params, state, x, y)


@functools.partial(jax.jit, static_argnums=0)
def manual_and_autodiff(cfg, params, state, x, y):
    """One compilation per shape for both sides."""
    return value_and_grad(cfg, params, state, x, y), jax.value_and_grad(bn_mlp(cfg).objective, has_aux=True)(
        params, state, x, y)


@given(strategies.lm_problems())
def test_compact_backward_equals_jax_grad_float64(problem):
    cfg, params, state, x, y = problem
    # With 2 rows BatchNorm maps each column to about ±1 whatever its input, so each BatchNorm backward cancels the
    # gradient by ~1e-5; through a *stack* of them the true gradient of the first layers falls to the size of float64
    # round-off in those cancellations (both sides then agree only to a few percent of a 1e-9 value). B = 2 is kept for
    # the single-BatchNorm net (the lecture's) and the net without BatchNorm; stacked BatchNorm is checked from B = 3.
    n_bn = cfg.batchnorm * (cfg.n_layers + cfg.final_batchnorm)
    assume(not (x.shape[0] == 2 and n_bn > 1))
    (loss, grads, new_state), ((ref_loss, ref_state), ref) = manual_and_autodiff(cfg, params, state, x, y)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    assert jax.tree.structure(grads) == jax.tree.structure(ref)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    unseen = np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(x))
    assert (np.asarray(grads.C)[unseen] == 0).all()  # characters absent from the batch get no gradient


@pytest.mark.slow
def test_float32_matches_float64_reference():
    cfg = BNMLPConfig(**BN_MLP_SMALL)
    params, state = bn_mlp(cfg).init(jax.random.key(0))
    p64 = strategies.randomise(params, jax.random.key(1))
    p32 = jax.tree.map(lambda p: p.astype(jnp.float32), p64)
    x = jax.random.randint(jax.random.key(2), (32, 3), 0, 27, dtype=jnp.int32)
    y = jax.random.randint(jax.random.key(3), (32,), 0, 27, dtype=jnp.int32)
    _, g32, _ = value_and_grad(cfg, p32, state, x, y)
    s64 = jax.tree.map(lambda s: s.astype(jnp.float64), state)
    _, g64, _ = value_and_grad(cfg, p64, s64, x, y)
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g64)):  # stated float32 tolerance
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_training_on_hand_written_gradients_tracks_autodiff():
    sp = make_splits(load_words("census-first"), 3)
    cfg = BNMLPConfig(vocab_size=sp.vocab.size, **BN_MLP_SMALL)
    tcfg = TrainConfig(steps=1000, eval_every=1000, chunk=250)
    manual = fit(bn_mlp(cfg, "bn-mlp").with_gradients("manual"), sp.train, tcfg, evals={})
    auto = fit(bn_mlp(cfg, "bn-mlp"), sp.train, tcfg, evals={})
    # float32, same key and batches: step-by-step agreement over the first 1,000 steps.
    np.testing.assert_allclose(manual.losses, auto.losses, rtol=2e-3)
    assert manual.losses[-50:].mean() < manual.losses[:50].mean() - 0.5


@pytest.mark.parametrize("overrides", [{}, BN_MLP_SMALL, {"batchnorm": False, "final_batchnorm": False}])
def test_bn_models_initial_loss_and_eval_mode(overrides):
    V = 27
    model = bn_mlp(BNMLPConfig(vocab_size=V, **overrides))
    params, state = model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (256, 3), 0, V, dtype=jnp.int32)
    y = jax.random.randint(jax.random.key(2), (256,), 0, V, dtype=jnp.int32)
    loss, new_state = model.loss(params, state, x, y)
    assert abs(float(loss) - np.log(V)) < 0.05
    _, same = model.apply(params, new_state, x, train=False)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(new_state)):  # eval mode changes no statistic
        np.testing.assert_array_equal(a, b)
    assert len(jax.tree.leaves(new_state)) == 2 * model.cfg.batchnorm * (model.cfg.n_layers + model.cfg.final_batchnorm)


def test_calibrate_and_fold():
    V, T = 27, 3
    cfg = BNMLPConfig(vocab_size=V, n_layers=2, n_hidden=16)
    model = bn_mlp(cfg)
    params, _ = model.init(jax.random.key(0))
    # Perturb γ/β away from 1/0 so folding is really tested.
    params = params._replace(bn=tuple(BatchNormParams(p.gamma * 1.7 + 0.1, p.beta + 0.3) for p in params.bn))
    X = jax.random.randint(jax.random.key(1), (3000, T), 0, V, dtype=jnp.int32)
    state = calibrate(cfg, params, X, chunk=1000)
    # Calibrated statistics are the exact ones: the first BatchNorm's input statistics over all of X.
    pre0 = params.C[X].reshape(3000, -1) @ params.dense[0].W
    np.testing.assert_allclose(state[0].mean, pre0.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state[0].var, pre0.var(0, ddof=1), rtol=1e-4)
    # The second BatchNorm is calibrated on activations that went through the calibrated first one, as in eval mode.
    h1 = jnp.tanh(batchnorm(params.bn[0], state[0], pre0, train=False)[0])
    pre1 = h1 @ params.dense[1].W
    np.testing.assert_allclose(state[1].mean, pre1.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state[1].var, pre1.var(0, ddof=1), rtol=1e-4)
    logits, _ = model.apply(params, state, X[:100], train=False)
    folded_cfg, folded = fold_batchnorm(cfg, params, state)
    folded_logits, _ = bn_mlp(folded_cfg).apply(folded, (), X[:100], train=False)
    np.testing.assert_allclose(folded_logits, logits, rtol=2e-4, atol=2e-5)
