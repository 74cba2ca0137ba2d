import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jnnex.models.bn_mlp import BN_MLP_SMALL, BNMLPConfig, bn_mlp, calibrate, fold_batchnorm
from jnnex.layers import BatchNormParams, BatchNormState, batchnorm, batchnorm_init


def test_batchnorm_3x2_by_hand():
    x = jnp.array([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]], jnp.float64)
    params = BatchNormParams(jnp.array([2.0, 0.5], jnp.float64), jnp.array([0.1, -1.0], jnp.float64))
    state = BatchNormState(jnp.array([0.0, 1.0], jnp.float64), jnp.array([1.0, 4.0], jnp.float64))
    eps = 1e-5
    y, new = batchnorm(params, state, x, train=True, momentum=0.1, eps=eps)
    # column 0: mean 3, biased var (4 + 0 + 4)/3 = 8/3; column 1: mean 4, biased var (4 + 4 + 16)/3 = 8
    x0 = np.array([-2.0, 0.0, 2.0]) / np.sqrt(8 / 3 + eps)
    x1 = np.array([-2.0, -2.0, 4.0]) / np.sqrt(8 + eps)
    np.testing.assert_allclose(y, np.stack([2.0 * x0 + 0.1, 0.5 * x1 - 1.0], 1), rtol=1e-12)
    # running: 0.9·old + 0.1·batch, with the unbiased variances 4 and 12
    np.testing.assert_allclose(new.mean, [0.9 * 0 + 0.1 * 3, 0.9 * 1 + 0.1 * 4], rtol=1e-12)
    np.testing.assert_allclose(new.var, [0.9 * 1 + 0.1 * 4, 0.9 * 4 + 0.1 * 12], rtol=1e-12)
    # eval mode: the running statistics, state unchanged, deterministic
    y_eval, same = batchnorm(params, new, x, train=False, eps=eps)
    expected = (np.asarray(x) - np.asarray(new.mean)) / np.sqrt(np.asarray(new.var) + eps) * [2.0, 0.5] + [0.1, -1.0]
    np.testing.assert_allclose(y_eval, expected, rtol=1e-12)
    assert same is new
    np.testing.assert_array_equal(batchnorm(params, new, x, train=False)[0], batchnorm(params, new, x, train=False)[0])


def test_running_statistics_converge_to_the_true_ones():
    params, state = batchnorm_init(3, jnp.float64)
    key = jax.random.key(0)
    true_mean, true_std = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 2.0, 3.0])

    @jax.jit
    def step(state, k):
        x = true_mean[None] + true_std[None] * jax.random.normal(k, (256, 3), jnp.float64)
        return batchnorm(params, state, x, train=True, momentum=0.05)[1], None

    state, _ = jax.lax.scan(step, state, jax.random.split(key, 2000))
    np.testing.assert_allclose(state.mean, true_mean, atol=0.05)
    np.testing.assert_allclose(jnp.sqrt(state.var), true_std, rtol=0.05)


@given(st.integers(0, 10_000), st.sampled_from([(8, 3), (4, 5, 3), (2, 3), (16, 2, 4)]), st.floats(0.01, 1.0))
def test_train_mode_output_has_mean_beta_and_std_gamma(seed, shape, momentum):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    C = shape[-1]
    x = 3.0 + 2.0 * jax.random.normal(k1, shape, jnp.float64)
    params = BatchNormParams(jax.random.uniform(k2, (C,), jnp.float64, 0.5, 2.0), jax.random.normal(k3, (C,), jnp.float64))
    state = BatchNormState(jax.random.normal(k4, (C,), jnp.float64), jnp.ones((C,), jnp.float64))
    y, new = batchnorm(params, state, x, train=True, momentum=momentum, eps=1e-12)
    axes = tuple(range(len(shape) - 1))
    np.testing.assert_allclose(y.mean(axes), params.beta, atol=1e-9)
    np.testing.assert_allclose(y.std(axes), params.gamma, rtol=1e-6)
    np.testing.assert_allclose(new.mean, (1 - momentum) * state.mean + momentum * x.mean(axes), rtol=1e-10)


@given(st.sampled_from([(4, 3), (2, 3, 3)]))
def test_constant_column_gives_finite_output_and_gradient(shape):
    x = jax.random.normal(jax.random.key(1), shape, jnp.float64).at[..., 1].set(7.0)
    params, state = batchnorm_init(3, jnp.float64)
    y, _ = batchnorm(params, state, x, train=True)
    assert jnp.isfinite(y).all() and jnp.allclose(y[..., 1], 0.0)
    g = jax.grad(lambda x: jnp.sum(batchnorm(params, state, x, train=True)[0] ** 3))(x)
    assert jnp.isfinite(g).all()


def test_bad_batchnorm_inputs():
    params, state = batchnorm_init(3)
    with pytest.raises(ValueError, match="at least 2 rows"):
        batchnorm(params, state, jnp.ones((1, 3), jnp.float32), train=True)
    with pytest.raises(ValueError, match="channels"):
        batchnorm(params, state, jnp.ones((4, 5), jnp.float32), train=True)
    with pytest.raises(ValueError, match="channels"):
        batchnorm(params, state, jnp.ones((4, 5), jnp.float32), train=False)
    with pytest.raises(TypeError, match="train must be a Python bool"):
        batchnorm(params, state, jnp.ones((4, 3), jnp.float32), train=jnp.array(True))


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
