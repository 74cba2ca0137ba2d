"""Per-layer diagnostics (:mod:`jnnex.diagnostics`): the in-step figures equal the same figures computed outside
the step; fit collects them for the deep net."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jnnex.models.bn_mlp import BNMLPConfig, bn_mlp
from jnnex.data import load_words, make_splits
from jnnex.diagnostics import SATURATION, table, weight_names
from jnnex.models.bigram import BigramConfig, neural_bigram
from jnnex.models.mlp_lm import MLPConfig, mlp_lm
from jnnex.optim import TrainConfig
from jnnex.train import TrainState, fit, make_step


def test_in_step_diagnostics_equal_the_same_figures_computed_outside():
    """One SGD step of the MLP LM: every in-step figure against an independent computation on the same batch."""
    V, B, lr = 27, 64, 0.3
    cfg = MLPConfig(vocab_size=V, n_hidden=40)
    model = mlp_lm(cfg)
    params, state = model.init(jax.random.key(0))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    x = jax.random.randint(jax.random.key(1), (B, 3), 0, V, dtype=jnp.int32)
    y = jax.random.randint(jax.random.key(2), (B,), 0, V, dtype=jnp.int32)
    opt = optax.sgd(lr)
    ts = TrainState(params, state, opt.init(params), jnp.zeros((), jnp.int32))
    new_ts, m = jax.jit(make_step(model, opt, diagnostics=True))(ts, (x, y), jax.random.key(3))

    # Outside: the forward by hand, dloss/dh in closed form, weight gradients from jax.grad of the plain loss.
    h = np.tanh(np.asarray(params.C)[np.asarray(x)].reshape(B, -1) @ np.asarray(params.W1) + np.asarray(params.b1))
    logits = h @ np.asarray(params.W2) + np.asarray(params.b2)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    dh = ((probs - np.eye(V)[np.asarray(y)]) / B) @ np.asarray(params.W2).T
    grads = jax.grad(lambda p: model.loss(p, state, x, y)[0])(params)
    np.testing.assert_allclose(m["act_mean"], [h.mean()], rtol=1e-10)
    np.testing.assert_allclose(m["act_std"], [h.std()], rtol=1e-10)
    np.testing.assert_allclose(m["act_saturation"], [(np.abs(h) > SATURATION).mean()], rtol=1e-12)
    np.testing.assert_allclose(m["act_grad_mean"], [dh.mean()], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(m["act_grad_std"], [dh.std()], rtol=1e-9)
    Ws = [params.C, params.W1, params.W2]
    Gs = [grads.C, grads.W1, grads.W2]
    assert weight_names(params) == [".C", ".W1", ".W2"]
    np.testing.assert_allclose(m["grad_std"], [np.std(g) for g in Gs], rtol=1e-10)
    np.testing.assert_allclose(m["grad_data"], [np.std(g) / np.std(w) for g, w in zip(Gs, Ws)], rtol=1e-10)
    np.testing.assert_allclose(m["update_data"], [np.log10(lr * np.std(g) / np.std(w)) for g, w in zip(Gs, Ws)],
                               rtol=1e-9)
    # and the step itself is the ordinary SGD step
    np.testing.assert_allclose(new_ts.params.W1, params.W1 - lr * grads.W1, rtol=1e-12)


@pytest.mark.slow
def test_fit_collects_diagnostics_for_the_deep_net():
    sp = make_splits(load_words("census-first")[:800], 3)
    model = bn_mlp(BNMLPConfig(vocab_size=sp.vocab.size, n_layers=3, n_hidden=32))
    res = fit(model, sp.train, TrainConfig(steps=40, eval_every=40, chunk=20), evals={},
              diagnostics=True)
    assert res.metrics["act_std"].shape == (40, 3) and res.metrics["update_data"].shape == (40, 5)
    assert np.isfinite(res.metrics["update_data"]).all()
    # BatchNorm keeps each tanh layer's input at unit scale: the outputs are far from saturated at init.
    assert (res.metrics["act_saturation"][0] < 0.2).all() and (res.metrics["act_std"][0] > 0.4).all()
    text = table(res.metrics, weight_names(res.ts.params))
    assert "act 2" in text and ".dense[3].W" in text
    with pytest.raises(ValueError, match="no hand-written backward"):
        make_step(neural_bigram(BigramConfig()), optax.sgd(0.1), diagnostics=True)
