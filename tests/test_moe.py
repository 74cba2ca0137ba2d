"""The mixture-of-experts MLP (:mod:`jnnex.models.moe`): its hand-written backward against ``jax.vjp`` in float64
over drawn problems (every top-k, logits that tie exactly), the load-balancing loss against its values worked out by
hand, the gates' sparsity, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pairs
import jnnex.models.moe as M
from jnnex.check import compare
from pairs import f64

FIXED = {"moe": (f64(2, 3, 4), f64(4, 3) * 0.5, f64(3, 4, 2) * 0.5, f64(3, 2, 4) * 0.5, 2)}

test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared = \
    pairs.tests(M, FIXED)


def test_gates_are_the_softmax_of_the_chosen_logits_and_zero_elsewhere():
    x, Wr, W1, W2, _ = FIXED["moe"]
    _, cache = M.moe_forward(x, Wr, W1, W2, 2)
    gates = np.asarray(cache[2])
    logits = np.asarray(x.reshape(-1, 4) @ Wr)
    for n in range(len(logits)):
        top = np.argsort(-logits[n], kind="stable")[:2]
        want = np.zeros(3)
        want[top] = np.exp(logits[n, top]) / np.exp(logits[n, top]).sum()
        np.testing.assert_allclose(gates[n], want, rtol=1e-12)
    # top_k = every expert: the gates are the full softmax; top_k = 1: the output is one expert's alone
    _, c_all = M.moe_forward(x, Wr, W1, W2, 3)
    np.testing.assert_allclose(np.asarray(c_all[2]), np.asarray(jax.nn.softmax(logits, -1)), rtol=1e-12)
    _, c1 = M.moe_forward(x, Wr, W1, W2, 1)
    assert set(np.unique(np.asarray(c1[2]))) == {0.0, 1.0}


def test_the_balancing_loss_is_one_when_uniform_and_e_when_one_expert_takes_all():
    """A zero router: every token's probabilities uniform, ties everywhere going to experts 0..k-1 — aux = E · Σ f_e
    /E = 1. A router that sends every token to expert 1 with probability → 1: aux → E (here 3), top-1."""
    x, _, W1, W2, _ = FIXED["moe"]
    (_, aux), _ = M.moe_forward(x, jnp.zeros((4, 3), jnp.float64), W1, W2, 2)
    assert float(aux) == pytest.approx(1.0, rel=1e-12)
    Wr = jnp.zeros((4, 3), jnp.float64).at[:, 1].set(50.0)
    xs = jnp.abs(x) + 1.0  # every token's logit for expert 1 is large
    (_, aux), _ = M.moe_forward(xs, Wr, W1, W2, 1)
    assert float(aux) == pytest.approx(3.0, rel=1e-6)


def test_ties_and_every_top_k_against_vjp():
    """Two router columns equal (exact ties for every token) and every top-k: the backward is jax.vjp's, to 1e-10
    in float64, the router's gradient included (the balancing loss reaches it through the full softmax)."""
    x, Wr, W1, W2, _ = FIXED["moe"]
    Wr = Wr.at[:, 2].set(Wr[:, 0])
    for k in (1, 2, 3):
        rows = compare(M.moe_forward, M.moe_backward, x, Wr, W1, W2, k, names=["dx", "dWr", "dW1", "dW2", "k"])
        assert all(r.approx for r in rows), (k, rows)
        assert float(np.abs(np.asarray(rows[1].maxdiff))) < 1e-12


@pytest.mark.parametrize("args, message", [
    ((f64(2, 4), f64(3, 3), f64(3, 4, 2), f64(3, 2, 4), 1), r"W_router must be \(C, E\) = \(4, E\)"),
    ((f64(2, 4), f64(4, 3), f64(2, 4, 2), f64(3, 2, 4), 1), r"with 3 experts and C = 4, W1 must be \(E, C, H\)"),
    ((f64(2, 4), f64(4, 3), f64(3, 4, 2), f64(3, 2, 4), 4), r"top_k must be an integer in \[1, 3\]"),
    ((f64(2, 4), f64(4, 3), f64(3, 4, 2), f64(3, 2, 4), 0), r"top_k must be an integer in \[1, 3\]"),
])
def test_bad_shapes_and_top_k_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        M.moe_forward(*args)
