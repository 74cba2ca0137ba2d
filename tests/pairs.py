"""The two checks every forward/backward pair gets, in the test file of the module that holds it: the backward equals
``jax.vjp`` in float64 over Hypothesis-drawn arguments (random upstream gradients, through the public checker), and a
wrongly shaped upstream gradient is a clear error. A pair is ``(forward, backward, strategy, argument names, fixed
arguments)``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnex.check import check_backward


def equals_vjp(pair) -> None:
    forward, backward, strategy, names, _ = pair
    check_backward(forward, backward, strategy, names=names, rtol=1e-10, atol=1e-12)


def rejects_a_wrongly_shaped_gradient(pair) -> None:
    forward, backward, _, _, fixed = pair
    out, cache = forward(*fixed)
    bad = jax.tree.map(lambda o: jnp.ones(jnp.shape(o) + (2,), jnp.result_type(o)), out)
    with pytest.raises(ValueError, match="must have shape"):
        backward(bad, cache)


def tests(pairs: dict):
    """The two tests of a module's pairs, parametrized by name; bind them in the test file:
    ``test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient = pairs.tests(PAIRS)``."""

    @pytest.mark.parametrize("name", pairs)
    def test_pair_backward_equals_vjp_float64(name):
        equals_vjp(pairs[name])

    @pytest.mark.parametrize("name", pairs)
    def test_pair_rejects_a_wrongly_shaped_gradient(name):
        rejects_a_wrongly_shaped_gradient(pairs[name])

    return test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient


def f64(*shape):
    """A fixed float64 array of normals (drawn by numpy: made at import, an eager ``jax.random.normal`` would compile a
    program for every shape)."""
    return jax.device_put(np.random.default_rng(len(shape)).standard_normal(shape))
