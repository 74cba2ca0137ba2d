"""The checker (:mod:`jnnex.check`): it catches a wrong backward, the custom_vjp adapter runs the hand-written one,
and the README's recipe passes a correct pair and fails a wrong one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnex import layers
from jnnex.check import assert_backward, compare, custom_vjp, format_table


def f64(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float64)


def test_checker_catches_a_wrong_backward():
    def wrong_tanh_backward(dy, y):
        return (1.0 - y) * dy  # forgot the square

    x = f64(jax.random.key(1), (4, 3))
    rows = compare(layers.tanh_forward, wrong_tanh_backward, x)
    assert not rows[0].approx and rows[0].maxdiff > 1e-3
    assert format_table(rows).startswith("arg0 | exact: False | approximate: False | maxdiff: ")
    with pytest.raises(AssertionError, match="approximate: False"):
        assert_backward(layers.tanh_forward, wrong_tanh_backward, x)


def test_custom_vjp_adapter_uses_the_hand_written_backward():
    k = jax.random.split(jax.random.key(2), 4)
    x, gamma, beta = f64(k[0], (8, 3)), 1.0 + 0.2 * f64(k[1], (3,)), f64(k[2], (3,))
    bn = custom_vjp(layers.batchnorm_forward, layers.batchnorm_backward)
    loss = lambda f: lambda x, g, b: jnp.sum(f(x, g, b) ** 3)  # noqa: E731
    through_adapter = jax.grad(loss(bn), argnums=(0, 1, 2))(x, gamma, beta)
    plain = jax.grad(loss(lambda *a: layers.batchnorm_forward(*a)[0]), argnums=(0, 1, 2))(x, gamma, beta)
    y, cache = layers.batchnorm_forward(x, gamma, beta)
    manual = layers.batchnorm_backward(3 * y ** 2, cache)
    for a, p, m in zip(through_adapter, plain, manual):
        np.testing.assert_allclose(a, m, rtol=1e-12)
        np.testing.assert_allclose(a, p, rtol=1e-10, atol=1e-12)
    # The adapter really calls the hand-written backward: a deliberately wrong one shows up in jax.grad.
    wrong = custom_vjp(layers.tanh_forward, lambda dy, y: 2.0 * layers.tanh_backward(dy, y))
    np.testing.assert_allclose(jax.grad(lambda x: wrong(x).sum())(x), 2 * jax.grad(lambda x: jnp.tanh(x).sum())(x))
    # Integer inputs: the embedding lookup with its index argument marked non-differentiable.
    emb = custom_vjp(layers.embedding_forward, layers.embedding_backward, nondiff=(1,))
    C, ix = f64(k[3], (5, 2)), jnp.array([1, 1, 4], jnp.int32)
    np.testing.assert_allclose(jax.grad(lambda C: emb(C, ix).sum())(C), jax.grad(lambda C: C[ix].sum())(C))


RECIPE = """
import sys
import jax
jax.config.update("jax_enable_x64", sys.argv[1] == "float64")
from hypothesis import Phase, settings  # the suite's budget, no shrinking (the recipe below is the README's, as written)
settings.register_profile("suite", max_examples=10, derandomize=True, phases=[Phase.explicit, Phase.generate])
settings.load_profile("suite")

from jnnex import layers, strategies
from jnnex.check import check_backward

def forgot_gamma(dy, cache):  # a plausible mistake: dx without the gain
    x, rstd, gamma, mean, var = cache
    return layers.batchnorm_backward(dy, (x, rstd, gamma * 0 + 1, mean, var))

for which in ("correct", "wrong"):
    my_batchnorm_backward = layers.batchnorm_backward if which == "correct" else forgot_gamma

    def test_my_batchnorm_backward():
        check_backward(layers.batchnorm_forward, my_batchnorm_backward, strategies.batchnorm_args(),
                       names=["x", "gamma", "beta"])

    try:
        test_my_batchnorm_backward()
    except AssertionError as e:
        print(which, "FAILED", str(e).splitlines()[0])
    else:
        print(which, "PASSED")
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_readme_recipe_passes_a_correct_pair_and_fails_a_wrong_one(dtype, tmp_path):
    """The README's check_backward recipe as a user runs it (a fresh process, default Hypothesis settings, x64 on or
    off): the library's BatchNorm backward passes; one that forgets γ fails."""
    import os
    import subprocess
    import sys

    script = tmp_path / "recipe.py"
    script.write_text(RECIPE)
    from runfiles import suite_compile_env

    proc = subprocess.run([sys.executable, str(script), dtype], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, **suite_compile_env()})  # compiled as the suite compiles
    lines = proc.stdout.splitlines()
    assert lines[0] == "correct PASSED" and lines[1].startswith("wrong FAILED"), (dtype, proc.stdout,
                                                                                   proc.stderr[-2000:])


def test_the_lessons_grader_names_every_kind_of_answer():
    """What a learner's answer can be, and the row the grader writes for it: never a traceback, never `maxdiff: inf`."""
    from jnnex.check import format_grades, grade_array, grade_backward

    want = np.arange(6.0).reshape(2, 3)
    cases = {"to do": None, "wrong shape": want.T, "not finite": want * np.nan, "exact": want.copy(),
             "close": want + 1e-13, "wrong": want + 1e-3,
             "error": np.array([[object()] * 3] * 2)}
    got = {k: grade_array(k, v, want) for k, v in cases.items()}
    assert {k: g.verdict for k, g in got.items()} == {k: k for k in cases}
    assert got["wrong shape"].note == "got shape (3, 2), want (2, 3)"
    assert got["not finite"].note == "6 of 6 values are NaN or infinite" and got["wrong"].maxdiff == pytest.approx(1e-3)
    table = format_grades(list(got.values()))
    assert "inf" not in table.replace("infinite", "") and len(table.splitlines()) == len(cases)

    import jnnex.models.gpt as G

    x, w, b = (jnp.asarray(np.random.default_rng(0).normal(size=s)) for s in ((2, 3, 4), (4,), (4,)))
    with jax.enable_x64(True):
        x, w, b = (a.astype(jnp.float64) for a in (x, w, b))

        def raises(dy, cache):
            return dy @ jnp.ones((5, 5))  # a shape error inside the learner's code

        def short(dy, cache):
            return G.layernorm_backward(dy, cache)[:2]

        def flat_dw(dy, cache):
            dx, dw, db = G.layernorm_backward(dy, cache)
            return dx, dw[None, :], db

        names = ["dx", "dw", "db"]
        assert all(g.right for g in grade_backward(G.layernorm_forward, G.layernorm_backward, x, w, b, names=names))
        assert {g.verdict for g in grade_backward(G.layernorm_forward, raises, x, w, b, names=names)} == {"error"}
        rows = grade_backward(G.layernorm_forward, short, x, w, b, names=names)
        assert "returned 2 gradients, want 3" in rows[0].note
        rows = grade_backward(G.layernorm_forward, flat_dw, x, w, b, names=names)
        assert [g.name for g in rows] == names and rows[0].right and rows[2].right and rows[1].verdict == "wrong shape"
        assert rows[1].note == "got shape (1, 4), want (4,)"
