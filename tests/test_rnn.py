"""makemore.py's RNN and GRU: their sizes, and backprop through time by hand against jax.grad in float64 (drawn
shapes, padded words, sequences of length 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pairs
import jnnex.models.rnn as rnn_module
from jnnex import strategies
from pairs import f64
from jnnex.check import assert_model_gradients, randomise
from jnnex.lm import count_params
from jnnex.models.rnn import RNNConfig, rnn


def test_makemore_parameter_counts():
    assert count_params(rnn().init(jax.random.key(0))[0]) == 11_803  # 64·27 + (128·64 + 64) + 64 + (64·27 + 27)
    gru = rnn(RNNConfig(cell="gru"))
    assert gru.name == "gru" and count_params(gru.init(jax.random.key(0))[0]) == 28_315  # three (128, 64) gates


@st.composite
def problems(draw):
    """A drawn RNN (random start state and biases too), padded words with -1 targets after each end, T = 1 included."""
    T, B = draw(st.sampled_from([1, 2, 7])), draw(strategies.batch_sizes(min_size=1, max_size=8))
    cfg = RNNConfig(vocab_size=draw(st.sampled_from([5, 27])), block_size=T, n_embd=draw(st.sampled_from([2, 5])),
                    n_embd2=draw(st.sampled_from([3, 8])), cell=draw(st.sampled_from(["rnn", "gru"])))
    seed = draw(strategies.seeds())
    model = rnn(cfg)
    params, state = model.init(jax.random.key(seed))
    params = randomise(params, jax.random.key(seed + 1), jnp.float64)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    y[np.arange(T)[None, :] >= rng.integers(1, T + 1, B)[:, None]] = -1
    return model, params, state, jnp.asarray(x), jnp.asarray(y)


@given(problems())
def test_bptt_equals_jax_grad_float64(problem):
    model, params, state, x, y = problem
    assert_model_gradients(model, params, state, x, y)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_padding_after_the_end_gets_no_gradient(cell):
    """Inputs at ignored positions reach no valid prediction (the state only flows forward): changing them changes
    no gradient."""
    model = rnn(RNNConfig(vocab_size=5, block_size=6, n_embd=3, n_embd2=4, cell=cell))
    params = randomise(model.init(jax.random.key(0))[0], jax.random.key(1), jnp.float64)
    x = jnp.array([[0, 1, 2, 0, 0, 0], [0, 3, 4, 4, 1, 0]], jnp.int32)
    y = jnp.array([[1, 2, 0, -1, -1, -1], [3, 4, 4, 1, 0, -1]], jnp.int32)
    x_other = jnp.where(y == -1, (x + 2) % 5, x)
    grads = jax.jit(lambda x: model.value_and_grad_manual(params, (), x, y)[1])  # one program for both calls
    g1, g2 = grads(x), grads(x_other)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(a, b)


def test_gradient_through_time_is_dl_dh_and_shows_vanishing_and_carrying():
    """``diagnostics.gradient_through_time`` reads dL_last/dh_t off the hand-written BPTT; it equals autodiff's
    gradient with respect to an offset added to each h_t. A small-weight RNN's profile vanishes going back; a GRU
    with its update gate shut (z ≈ 0: h_t = h_{t-1}) carries the gradient back unchanged."""
    from jnnex.diagnostics import gradient_through_time
    from jnnex.layers import cross_entropy_forward, linear_forward
    from jnnex.models.rnn import rnn_cell_forward

    cfg = RNNConfig(vocab_size=5, block_size=6, n_embd=3, n_embd2=4)
    model = rnn(cfg)
    params = randomise(model.init(jax.random.key(0))[0], jax.random.key(1), jnp.float64)
    x = jax.random.randint(jax.random.key(2), (3, 6), 0, 5, dtype=jnp.int32)
    y_last = jnp.array([1, 4, 0], jnp.int32)
    profile = gradient_through_time(model, params, (), x, y_last)

    def last_loss(offsets):  # the same network, an offset added to every hidden state
        h = jnp.broadcast_to(params.start, (3, 4))
        for t in range(6):
            h = rnn_cell_forward(params.C[x[:, t]], h, params.cell[0].W, params.cell[0].b)[0] + offsets[:, t]
        return cross_entropy_forward(linear_forward(h, params.head.W, params.head.b)[0], y_last)[0]

    dh = jax.grad(last_loss)(jnp.zeros((3, 6, 4), jnp.float64))
    np.testing.assert_allclose(profile, jnp.linalg.norm(dh, axis=-1).mean(0), rtol=1e-10)

    small = params._replace(cell=(params.cell[0]._replace(W=params.cell[0].W * 0.05),))
    vanishing = gradient_through_time(model, small, (), x, y_last)
    assert vanishing[0] < 1e-6 * vanishing[-1]

    gru = rnn(RNNConfig(vocab_size=5, block_size=6, n_embd=3, n_embd2=4, cell="gru"))
    gp = randomise(gru.init(jax.random.key(3))[0], jax.random.key(4), jnp.float64)
    shut = gp._replace(cell=(gp.cell[0]._replace(b=jnp.full((4,), -40.0)), *gp.cell[1:]))  # z = σ(≈ -40) ≈ 0
    carried = gradient_through_time(gru, shut, (), x, y_last)
    np.testing.assert_allclose(carried, carried[-1], rtol=1e-6)


# The recurrent cells (jnnex/models/rnn.py, above the model)
FIXED = {
    "rnn_cell": (f64(4, 3), f64(4, 2), f64(5, 2), f64(2)),
    "gru_cell": (f64(4, 3), f64(4, 2), f64(5, 2), f64(2), f64(5, 2), f64(2), f64(5, 2), f64(2)),
}

test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared = \
    pairs.tests(rnn_module, FIXED)
