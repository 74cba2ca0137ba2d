"""The checks every forward/backward pair a module declares (its ``PAIRS``) gets, in the test file of that module: the
backward equals ``jax.vjp`` in float64 over Hypothesis-drawn arguments (:data:`jnnex.strategies.PAIR_ARGS`, random
upstream gradients, through the public checker), and a wrongly shaped upstream gradient is a clear error. A pair
added to a module's ``PAIRS`` is picked up here by itself; without a strategy or a fixed example it fails, named."""

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


def declared(module, fixed: dict) -> dict:
    """The table of ``module``'s declared pairs (``module.PAIRS``, :class:`jnnex.layers.Pair`): ``{name: (forward,
    backward, strategy, argument names, fixed arguments)}``, the strategy :data:`jnnex.strategies.PAIR_ARGS`'s for it
    (made when the test runs: a declared pair without one fails its test, naming it), ``fixed`` a small argument tuple
    per pair for the wrong-shape check."""
    from jnnex import strategies

    def strategy(name):  # made when the test runs: a missing one fails that test, not the collection
        return lambda: strategies.pair_args(module.__name__, name)

    return {name: (pair.forward, pair.backward, strategy(name), list(pair.args), fixed.get(name))
            for name, pair in module.PAIRS.items()}


def tests(module, fixed: dict):
    """The tests of every pair ``module`` declares, parametrized by name; bind them in the test file:
    ``test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared =
    pairs.tests(module, FIXED)``. ``fixed``: a small argument tuple for each declared pair (one that names a pair the
    module does not declare, or a declared pair without one, fails ``test_pairs_are_declared``)."""
    table = declared(module, fixed)

    @pytest.mark.parametrize("name", table)
    def test_pair_backward_equals_vjp_float64(name):
        forward, backward, strategy, names, example = table[name]
        equals_vjp((forward, backward, strategy(), names, example))

    @pytest.mark.parametrize("name", table)
    def test_pair_rejects_a_wrongly_shaped_gradient(name):
        assert table[name][4] is not None, f"pair {name!r} of {module.__name__} has no fixed example in its test file"
        rejects_a_wrongly_shaped_gradient(table[name])

    def test_pairs_are_declared():
        assert set(fixed) == set(module.PAIRS), (f"{module.__name__}.PAIRS declares {sorted(module.PAIRS)}; the test "
                                                 f"file's examples are for {sorted(fixed)}")

    return test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared


def f64(*shape):
    """A fixed float64 array of normals (drawn by numpy: made at import, an eager ``jax.random.normal`` would compile a
    program for every shape)."""
    return jax.device_put(np.random.default_rng(len(shape)).standard_normal(shape))
