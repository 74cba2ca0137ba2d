"""Check any forward/backward pair against autodiff, and plug hand-written backwards into ``jax.grad``.

* :func:`compare` — the lecture's ``cmp`` table as a library function: runs the pair on the given inputs with a
  **random** upstream gradient (never all ones) and reports, per input, whether the hand-written gradient is exact,
  approximately equal, and the largest difference from ``jax.vjp``. :func:`assert_backward` is the pytest-friendly
  form; :func:`check_backward` runs it on every example a Hypothesis strategy draws (see :mod:`jnnex.strategies`).
  Use float64 inputs for a meaningful check.
* :func:`compare_model` — the same table for a whole model: every parameter tensor's hand-written gradient
  against ``jax.grad``, with one tolerance rule (:data:`MODEL_RTOL` of that tensor's scale); every model's test uses
  it through :func:`assert_model_gradients`, which names *every* tensor that differs.
* :func:`custom_vjp` — turns a pair into a function whose ``jax.grad`` uses the hand-written backward.
* :func:`grade_array`, :func:`grade_sequence`, :func:`grade_backward`, :func:`format_grades` — the lessons'
  graders: a learner's answer judged on its own against the right value (a wrong shape, a NaN or an exception is a
  row of the table saying what was expected, never a traceback).

A pair follows :mod:`jnnex.layers`' convention: ``forward(*args) -> (out, cache)`` and
``backward(dout, cache) -> grads`` with one entry per argument (``None`` for integer inputs; a single array when the
forward has one argument).
"""

from __future__ import annotations

import dataclasses
import functools
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


def _float_positions(args) -> tuple[int, ...]:
    """The positions of the arguments a pair differentiates: its floating arrays (``None``, an optional setting left
    out, would pass for a float to ``result_type``)."""
    return tuple(i for i, a in enumerate(args) if a is not None and jnp.issubdtype(jnp.result_type(a), jnp.floating))


def _chosen_tolerances(dout, refs, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """``(rtol, atol)`` as given, else :func:`tolerances` of the upstream gradient's dtype at the scale of it and of
    the reference gradients (numpy: eager ``jnp`` would compile a program per shape)."""
    scale = max([float(np.max(np.abs(np.asarray(d)))) for d in jax.tree.leaves(dout)]
                + [float(np.max(np.abs(np.asarray(r)))) for r in refs if np.size(r)])
    default_rtol, default_atol = tolerances(jnp.result_type(jax.tree.leaves(dout)[0]), scale)
    return default_rtol if rtol is None else rtol, default_atol if atol is None else atol


def compare(forward: Callable, backward: Callable, *args, names: Sequence[str] | None = None, key=None,
            rtol: float | None = None, atol: float | None = None) -> list[Row]:
    """Per differentiable argument: does ``backward`` equal ``jax.vjp`` of ``forward``'s output? ``rtol``/``atol``
    default to :func:`tolerances` of the output's dtype."""
    key = jax.random.key(0) if key is None else key
    float_idx = _float_positions(args)
    array_idx = tuple(i for i, a in enumerate(args) if isinstance(a, jax.Array | np.ndarray))  # the rest: settings
    statics = tuple((type(a), None if i in array_idx else a) for i, a in enumerate(args))  # typed: 1 is not True
    try:
        run = _vjp_program(forward, backward, statics, array_idx, float_idx)
    except TypeError:  # a setting that is not hashable: a program of its own
        run = _vjp_program.__wrapped__(forward, backward, statics, array_idx, float_idx)
    dout, mine, ref = run([args[i] for i in array_idx], key)
    if len(mine) != len(args):
        raise ValueError(f"backward returned {len(mine)} gradients for {len(args)} forward arguments")
    rtol, atol = _chosen_tolerances(dout, ref, rtol, atol)
    names = list(names) if names is not None else [f"arg{i}" for i in range(len(args))]
    return [compare_arrays(names[i], mine[i], r, rtol=rtol, atol=atol) for i, r in zip(float_idx, ref)]


@functools.lru_cache(maxsize=512)
def _vjp_program(forward: Callable, backward: Callable, statics: tuple, array_idx: tuple, float_idx: tuple):
    """The jitted check of one pair with these settings (``statics``: ``(type, value)`` of each argument, the value
    ``None`` for arrays): ``run(arrays, key) -> (dout, backward's gradients, jax.vjp's)``. Kept, so that the examples
    a property draws reuse the program of a shape seen before instead of tracing and compiling it again."""
    settings = [value for _, value in statics]

    @jax.jit  # one program per shape: far cheaper than compiling every op eagerly
    def run(arrays, key):
        full = merge_args(settings, array_idx, arrays)
        out, cache = forward(*full)
        leaves, treedef = jax.tree.flatten(out)  # one output array, or several (a tuple of them)
        dout = treedef.unflatten([jax.random.normal(k, jnp.shape(o), jnp.result_type(o))  # random, never all ones
                                  for k, o in zip(jax.random.split(key, len(leaves)), leaves)])
        mine = _as_tuple(backward(dout, cache))
        _, vjp = jax.vjp(lambda *fl: forward(*merge_args(full, float_idx, fl))[0], *(full[i] for i in float_idx))
        return dout, mine, vjp(dout)

    return run


def compare_arrays(name: str, mine, ref, *, rtol: float = 1e-10, atol: float = 1e-12) -> Row:
    """One row of the table: ``mine`` against the reference ``ref`` (a missing or misshapen ``mine`` fails)."""
    if mine is None or jnp.shape(mine) != jnp.shape(ref):
        return Row(name, False, False, float("inf"))
    m, r = np.asarray(mine), np.asarray(ref)
    return Row(name, bool(np.array_equal(m, r)), bool(np.allclose(m, r, rtol=rtol, atol=atol)),
               float(np.max(np.abs(m - r))) if m.size else 0.0)


@dataclasses.dataclass(frozen=True)
class Grade:
    """One answer of an exercise, judged: ``verdict`` is ``exact`` (bit for bit), ``close`` (within the
    tolerances), ``wrong``, ``wrong shape``, ``not finite``, ``error`` (the answer raised) or ``to do`` (``None``:
    not written yet); ``note`` says what was expected or what went wrong."""

    name: str
    verdict: str
    maxdiff: float | None = None
    note: str = ""

    @property
    def right(self) -> bool:
        return self.verdict in ("exact", "close")


def grade_array(name: str, got, want, *, rtol: float = 1e-10, atol: float = 1e-12) -> Grade:
    """A learner's array ``got`` against the right one, ``want``."""
    if got is None:
        return Grade(name, "to do", note="not written yet")
    try:
        mine = np.asarray(got)
    except Exception as e:  # noqa: BLE001 (whatever the answer is, the grader says so)
        return Grade(name, "error", note=f"not an array: {type(e).__name__}: {_first_line(e)}")
    ref = np.asarray(want)
    if mine.shape != ref.shape:
        return Grade(name, "wrong shape", note=f"got shape {mine.shape}, want {ref.shape}")
    if not np.issubdtype(mine.dtype, np.number):
        return Grade(name, "error", note=f"got dtype {mine.dtype}, want a number like {ref.dtype}")
    bad = int(np.size(mine) - np.isfinite(mine).sum())
    if bad:
        return Grade(name, "not finite", note=f"{bad} of {mine.size} values are NaN or infinite")
    diff = float(np.max(np.abs(mine - ref))) if mine.size else 0.0
    if np.array_equal(mine, ref):
        return Grade(name, "exact", diff)
    if np.allclose(mine, ref, rtol=rtol, atol=atol):
        return Grade(name, "close", diff, f"within {rtol:g} relative")
    return Grade(name, "wrong", diff, f"largest |yours - right| {diff:.3g}, the right values' largest "
                                      f"{float(np.max(np.abs(ref))) if ref.size else 0.0:.3g}")


def grade_sequence(name: str, got, want, what: str = "item") -> Grade:
    """A learner's sequence (token ids, merges, a string) against the right one: ``exact``, or ``wrong`` with the
    first place they differ named."""
    if got is None:
        return Grade(name, "to do", note="not written yet")
    try:
        mine = list(got) if not isinstance(got, str) else got
    except TypeError:
        return Grade(name, "error", note=f"got {type(got).__name__}, want a sequence like {type(want).__name__}")
    ref = list(want) if not isinstance(want, str) else want
    if isinstance(mine, list) and isinstance(ref, list):
        mine = [tuple(m) if isinstance(m, list) else m for m in mine]  # a pair written as a list is the pair
    if mine == ref:
        return Grade(name, "exact", 0.0, f"{len(ref)} {what}s, all equal")
    at = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref)))
    yours = repr(mine[at]) if at < len(mine) else "(ends)"
    right = repr(ref[at]) if at < len(ref) else "(ends)"
    return Grade(name, "wrong", None, f"{len(mine)} {what}s against {len(ref)}; first difference at {what} {at}: "
                                      f"yours {yours}, want {right}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:160]


def grade_call(name: str, answer: Callable, args: Sequence, want, *, grade: Callable | None = None,
               **options) -> Grade:
    """``answer(*args)`` graded against ``want`` by ``grade`` (default :func:`grade_array`; ``options`` go to it); an
    exception it raises is the row's note."""
    try:
        got = answer(*args)
    except Exception as e:  # noqa: BLE001
        return Grade(name, "error", note=f"{type(e).__name__}: {_first_line(e)}")
    return (grade or grade_array)(name, got, want, **options)


def grade_backward(forward: Callable, backward: Callable, *args, names: Sequence[str], key=None,
                   rtol: float | None = None, atol: float | None = None) -> list[Grade]:
    """A learner's ``backward`` for ``forward``, graded per input (``names``) against ``jax.vjp`` with a random
    upstream gradient, as :func:`compare` checks — but run eagerly, so that an exception, a missing gradient or a
    wrong shape is a row naming what was expected."""
    key = jax.random.key(0) if key is None else key
    float_idx = _float_positions(args)
    out, cache = forward(*args)
    dout = jax.random.normal(key, jnp.shape(out), jnp.result_type(out))
    _, vjp = jax.vjp(lambda *fl: forward(*merge_args(list(args), float_idx, fl))[0], *(args[i] for i in float_idx))
    ref = dict(zip(float_idx, vjp(dout)))
    rtol, atol = _chosen_tolerances(dout, ref.values(), rtol, atol)
    tol = dict(rtol=rtol, atol=atol)
    try:
        mine = _as_tuple(backward(dout, cache))
    except Exception as e:  # noqa: BLE001
        return [Grade(names[i], "error", note=f"{type(e).__name__}: {_first_line(e)}") for i in float_idx]
    if len(mine) != len(args):
        return [Grade(names[i], "error", note=f"the backward returned {len(mine)} gradients, want {len(args)} (one "
                                              f"per forward argument: {', '.join(names)})") for i in float_idx]
    return [grade_array(names[i], mine[i], ref[i], **tol) for i in float_idx]


def format_grades(grades: Sequence[Grade]) -> str:
    """The graded answers as a table: ``name | verdict | max diff | note``, one row each."""
    width = max((len(g.name) for g in grades), default=4)
    return "\n".join(f"{g.name:<{width}} | {g.verdict:<11} | "
                     f"{'' if g.maxdiff is None else f'{g.maxdiff:.2g}':>8} | {g.note}".rstrip() for g in grades)


MODEL_RTOL = 1e-10  # float64: a hand-written gradient tensor within 1e-10 of the tensor's scale (max |jax.grad|)
SCALE_FLOOR = 1e-6  # a tensor's scale counts as at least this fraction of the model's largest (see compare_model)
LOSS_RTOL = 1e-12  # the loss and the new model state: the same numbers, a few roundings apart


@dataclasses.dataclass(frozen=True)
class TensorRow:
    """One parameter tensor of :func:`compare_model`: its largest difference from ``jax.grad``'s gradient, relative
    to that gradient's scale."""

    name: str
    rel: float  # max |manual - jax.grad| / scale
    scale: float  # max |jax.grad| of this tensor, at least SCALE_FLOOR x the model's largest
    ok: bool


def compare_model(model, params, state, x, y, key=None, *, rtol: float = MODEL_RTOL) -> tuple[list[TensorRow], dict]:
    """Every parameter tensor's hand-written gradient (``model.value_and_grad_manual``) against ``jax.grad`` of the
    model's objective, at float64 ``params``, in one compiled program. One rule for every model: a tensor passes when
    ``max |manual - jax.grad| <= rtol · scale``, its scale being ``max |jax.grad|`` of that tensor (llm.c's lesson:
    one global tolerance hides a small tensor's error) — but at least :data:`SCALE_FLOOR` times the largest
    tensor's, since a gradient that is zero in exact arithmetic (a bias before BatchNorm) comes out as rounding
    noise of the model's O(1) terms. Returns the rows, named by parameter path, and ``{"loss": (manual, autodiff),
    "state": [(manual, autodiff) per leaf]}`` for the caller's checks."""

    @jax.jit
    def both(params, state):
        manual = model.value_and_grad_manual(params, state, x, y, key)
        (loss, new_state), grads = jax.value_and_grad(model.objective, has_aux=True)(params, state, x, y, key)
        return manual, (loss, grads, new_state)

    (loss_m, grads_m, state_m), (loss_a, grads_a, state_a) = both(params, state)
    flat_m = jax.tree_util.tree_flatten_with_path(grads_m)[0]
    flat_a = jax.tree.leaves(grads_a)
    if len(flat_m) != len(flat_a) or jax.tree.structure(grads_m) != jax.tree.structure(grads_a):
        raise AssertionError(f"model {model.name!r}: the hand-written gradients are shaped "
                             f"{jax.tree.structure(grads_m)}, jax.grad's {jax.tree.structure(grads_a)}")
    largest = max((float(np.abs(np.asarray(g)).max()) for g in flat_a if np.size(g)), default=0.0)
    rows = []
    for (path, gm), ga in zip(flat_m, flat_a):
        gm, ga = np.asarray(gm, np.float64), np.asarray(ga, np.float64)
        if gm.shape != ga.shape:
            rows.append(TensorRow(jax.tree_util.keystr(path), float("inf"), float("nan"), False))
            continue
        scale = max(float(np.abs(ga).max()) if ga.size else 0.0, SCALE_FLOOR * largest)
        diff = float(np.abs(gm - ga).max()) if ga.size else 0.0
        rel = diff / scale if scale > 0 else diff
        rows.append(TensorRow(jax.tree_util.keystr(path), rel, scale, bool(rel <= rtol)))
    extra = {"loss": (float(loss_m), float(loss_a)),
             "state": list(zip(jax.tree.leaves(state_m), jax.tree.leaves(state_a)))}
    return rows, extra


@dataclasses.dataclass(frozen=True)
class PrecisionRow:
    name: str  # the parameter's path
    manual: float  # max |hand-written gradient at the model's precision − float64| / scale
    autodiff: float  # the same for jax.grad at the model's precision
    scale: float  # max |float64 gradient| of the tensor (at least SCALE_FLOOR of the largest)


def compare_precision(model, params, state, x, y, key=None) -> list[PrecisionRow]:
    """What a lower precision costs, per tensor: the hand-written gradients and ``jax.grad``'s, both computed at
    ``model``'s precision (``cfg.precision = "bfloat16"``: the forward and backward in bfloat16), against ``jax.grad``
    in float64 at the same parameters (``params`` cast up; needs ``jax_enable_x64``). Errors relative to the float64
    tensor's scale, as :func:`compare_model`'s."""
    if not jax.config.jax_enable_x64:
        raise ValueError("compare_precision needs float64 for its reference: turn on jax_enable_x64")
    exact = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, precision="float32"))
    params64 = jax.tree.map(lambda p: p.astype(jnp.float64) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)

    @jax.jit
    def grads(params, params64):
        manual = model.value_and_grad_manual(params, state, x, y, key)[1]
        auto = jax.grad(lambda p: model.objective(p, state, x, y, key)[0])(params)
        ref = jax.grad(lambda p: exact.objective(p, state, x, y, key)[0])(params64)
        return manual, auto, ref

    manual, auto, ref = grads(params, params64)
    flat_ref = jax.tree_util.tree_flatten_with_path(ref)[0]
    largest = max((float(np.abs(np.asarray(g)).max()) for _, g in flat_ref if np.size(g)), default=0.0)
    rows = []
    for (path, r), m, a in zip(flat_ref, jax.tree.leaves(manual), jax.tree.leaves(auto)):
        r = np.asarray(r, np.float64)
        scale = max(float(np.abs(r).max()) if r.size else 0.0, SCALE_FLOOR * largest)
        err = [float(np.abs(np.asarray(g, np.float64) - r).max()) / scale if r.size else 0.0 for g in (m, a)]
        rows.append(PrecisionRow(jax.tree_util.keystr(path), err[0], err[1], scale))
    return rows


def format_model_table(rows: Sequence[TensorRow]) -> str:
    width = max((len(r.name) for r in rows), default=6)
    return "\n".join(f"{r.name:<{width}}  max|manual - jax.grad| / scale {r.rel:.1e}  (scale {r.scale:.2e})"
                     f"{'' if r.ok else '  <-- differs'}" for r in rows)


def assert_model_gradients(model, params, state, x, y, key=None, *, rtol: float = MODEL_RTOL) -> list[TensorRow]:
    """:func:`compare_model`, failing with the table of *every* tensor that differs (a slip in the backward shows
    where it starts and how far it spreads), and with the loss and the new state checked to ``rtol`` too. Returns
    the rows (for a table in the test output)."""
    rows, extra = compare_model(model, params, state, x, y, key, rtol=rtol)
    bad = [r for r in rows if not r.ok]
    if bad:
        raise AssertionError(f"model {model.name!r}: {len(bad)} of {len(rows)} gradient tensors differ from jax.grad "
                             f"(rule: max|diff| <= {rtol:g} x the tensor's scale):\n{format_model_table(bad)}")
    loss_m, loss_a = extra["loss"]
    np.testing.assert_allclose(loss_m, loss_a, rtol=LOSS_RTOL, err_msg=f"model {model.name!r}: the loss")
    for i, (sm, sa) in enumerate(extra["state"]):
        np.testing.assert_allclose(sm, sa, rtol=LOSS_RTOL, err_msg=f"model {model.name!r}: state leaf {i}")
    return rows


def randomise(params, key, dtype=jnp.float64, scale: float = 0.3):
    """``params`` cast to ``dtype`` with every vector (biases, BatchNorm γ and β) perturbed by ``scale · N(0, 1)``:
    zeros and ones hide a wrong backward (a forgotten ``γ`` or bias term), so checks run on random ones."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [_perturbed(p, k, jnp.dtype(dtype), float(scale))
                                        for p, k in zip(leaves, keys)])


@functools.partial(jax.jit, static_argnums=(2, 3))  # one small program per tensor shape, reused by every model
def _perturbed(p, key, dtype, scale: float):
    p = p.astype(dtype)
    return p + scale * jax.random.normal(key, p.shape, dtype) if p.ndim == 1 else p


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
