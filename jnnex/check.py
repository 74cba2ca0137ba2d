"""Check any forward/backward pair against autodiff, and plug hand-written backwards into ``jax.grad``.

* :func:`compare` — the lecture's ``cmp`` table as a library function: runs the pair on the given inputs with a
  **random** upstream gradient (never all ones) and reports, per input, whether the hand-written gradient is exact,
  approximately equal, and the largest difference from ``jax.vjp``. :func:`assert_backward` is the pytest-friendly
  form; :func:`check_backward` runs it on every example a Hypothesis strategy draws (see :mod:`jnnex.strategies`).
  Use float64 inputs for a meaningful check.
* :func:`custom_vjp` — turns a pair into a function whose ``jax.grad`` uses the hand-written backward.

A pair follows :mod:`jnnex.layers`' convention: ``forward(*args) -> (out, cache)`` and
``backward(dout, cache) -> grads`` with one entry per argument (``None`` for integer inputs; a single array when the
forward has one argument).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    exact: bool
    approx: bool
    maxdiff: float


def _as_tuple(grads) -> tuple:
    """A backward returns a tuple (or list) of gradients, or one bare array for a one-argument forward."""
    return tuple(grads) if isinstance(grads, tuple | list) else (grads,)


def tolerances(dtype, scale: float) -> tuple[float, float]:
    """``(rtol, atol)`` that fit ``dtype``: float64 ``(1e-10, 1e-12)``; float32 ``(1e-3, 1e-4 · scale)``, where
    ``scale`` is the largest magnitude among the reference gradients and the upstream gradient.

    Why the float32 ``atol`` scales: a gradient that is ~0 in exact arithmetic (BatchNorm's ``dx`` on a batch of 2)
    comes out of float32 as rounding noise of the size of the upstream gradient times the layer's gain. Measured on
    300 drawn BatchNorm problems, the correct backward stays 20× inside these bounds; a wrong one misses by O(1).
    """
    if jnp.finfo(dtype).bits >= 64:
        return 1e-10, 1e-12
    return 1e-3, 1e-4 * scale


def compare(forward: Callable, backward: Callable, *args, names: Sequence[str] | None = None, key=None,
            rtol: float | None = None, atol: float | None = None) -> list[Row]:
    """Per differentiable argument: does ``backward`` equal ``jax.vjp`` of ``forward``'s output? ``rtol``/``atol``
    default to :func:`tolerances` of the output's dtype."""
    key = jax.random.key(0) if key is None else key
    float_idx = [i for i, a in enumerate(args) if jnp.issubdtype(jnp.result_type(a), jnp.floating)]
    array_idx = [i for i, a in enumerate(args) if isinstance(a, jax.Array | np.ndarray)]  # the rest: static settings

    @jax.jit  # one program per shape: far cheaper than compiling every op eagerly
    def run(arrays, key):
        full = merge_args(args, array_idx, arrays)
        out, cache = forward(*full)
        dout = jax.random.normal(key, jnp.shape(out), jnp.result_type(out))  # random, never all ones
        mine = _as_tuple(backward(dout, cache))
        _, vjp = jax.vjp(lambda *fl: forward(*merge_args(full, float_idx, fl))[0], *(full[i] for i in float_idx))
        return dout, mine, vjp(dout)

    dout, mine, ref = run([args[i] for i in array_idx], key)
    if len(mine) != len(args):
        raise ValueError(f"backward returned {len(mine)} gradients for {len(args)} forward arguments")
    scale = max([float(jnp.max(jnp.abs(dout)))] + [float(jnp.max(jnp.abs(r))) for r in ref if jnp.size(r)])
    default_rtol, default_atol = tolerances(jnp.result_type(dout), scale)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    names = list(names) if names is not None else [f"arg{i}" for i in range(len(args))]
    return [compare_arrays(names[i], mine[i], r, rtol=rtol, atol=atol) for i, r in zip(float_idx, ref)]


def compare_arrays(name: str, mine, ref, *, rtol: float = 1e-10, atol: float = 1e-12) -> Row:
    """One row of the table: ``mine`` against the reference ``ref`` (a missing or misshapen ``mine`` fails)."""
    if mine is None or jnp.shape(mine) != jnp.shape(ref):
        return Row(name, False, False, float("inf"))
    m, r = np.asarray(mine), np.asarray(ref)
    return Row(name, bool(np.array_equal(m, r)), bool(np.allclose(m, r, rtol=rtol, atol=atol)),
               float(np.max(np.abs(m - r))) if m.size else 0.0)


def randomise(params, key, dtype=jnp.float64, scale: float = 0.3):
    """``params`` cast to ``dtype`` with every vector (biases, BatchNorm γ and β) perturbed by ``scale · N(0, 1)``:
    zeros and ones hide a wrong backward (a forgotten ``γ`` or bias term), so checks run on random ones."""
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [p + scale * jax.random.normal(k, p.shape, dtype) if p.ndim == 1 else p for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


def merge_args(args, float_idx, floats):
    """``args`` with the entries at ``float_idx`` replaced by ``floats`` (the differentiable ones, in order)."""
    out = list(args)
    for i, f in zip(float_idx, floats):
        out[i] = f
    return out


def format_table(rows: Sequence[Row]) -> str:
    """``name | exact: True | approximate: True | maxdiff: 1.1e-16`` per row, as in the lecture."""
    width = max((len(r.name) for r in rows), default=4)
    return "\n".join(f"{r.name:<{width}} | exact: {str(r.exact):5} | approximate: {str(r.approx):5} | "
                     f"maxdiff: {r.maxdiff:.3g}" for r in rows)


def assert_backward(forward: Callable, backward: Callable, *args, **kwargs) -> None:
    """Raise ``AssertionError`` with the :func:`compare` table unless every gradient is approximately equal."""
    rows = compare(forward, backward, *args, **kwargs)
    if not all(r.approx for r in rows):
        raise AssertionError("hand-written backward differs from jax.vjp:\n" + format_table(rows))


def custom_vjp(forward: Callable, backward: Callable, nondiff: Sequence[int] = ()) -> Callable:
    """``f(*args) = forward(*args)[0]`` whose derivatives come from ``backward`` (``jax.custom_vjp``).

    ``nondiff`` lists positions of integer inputs (indices, labels); their cotangent is ``None``.
    """

    @jax.custom_vjp
    def f(*args):
        return forward(*args)[0]

    def f_fwd(*args):
        return forward(*args)

    def f_bwd(cache, dout):
        grads = _as_tuple(backward(dout, cache))
        return tuple(None if i in nondiff else g for i, g in enumerate(grads))

    f.defvjp(f_fwd, f_bwd)
    return f


def check_backward(forward: Callable, backward: Callable, args_strategy, *, names: Sequence[str] | None = None,
                   rtol: float | None = None, atol: float | None = None, settings=None) -> None:
    """:func:`assert_backward` on every argument tuple Hypothesis draws from ``args_strategy`` (e.g.
    :func:`jnnex.strategies.batchnorm_args`), each with its own random upstream gradient. Call it from a plain test
    function; it runs under the active Hypothesis profile unless ``settings`` is given, and a failure shows the
    table for the shrunk example.

    Args:
        forward, backward: the pair, in :mod:`jnnex.layers`' convention.
        args_strategy: a strategy of argument tuples for ``forward`` (float64 arrays for a meaningful check).
        names, rtol, atol: as :func:`compare` (default: the tolerances that fit the dtype).
        settings: a ``hypothesis.settings`` object to override the profile (``settings(max_examples=200)``); by
            default the active profile with ``deadline=None`` (the first example compiles: that is not slowness).
    """
    from hypothesis import given
    from hypothesis import settings as hypothesis_settings
    from hypothesis import strategies as st

    @given(args=args_strategy, seed=st.integers(0, 2**31 - 1))
    def run(args, seed):
        assert_backward(forward, backward, *args, names=names, key=jax.random.key(seed), rtol=rtol, atol=atol)

    (settings if settings is not None else hypothesis_settings(deadline=None))(run)()
