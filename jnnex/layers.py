"""The layers models share, as forward/backward pairs, each backward directly under its forward (llm.c style), in the
order the course meets them: linear, tanh, the embedding, the cross-entropy, BatchNorm, dropout.

A pair one model alone uses lives in that model's file, above its forward (the GPT's LayerNorm, GELU and attention in
:mod:`jnnex.models.gpt`, the recurrent cells in :mod:`jnnex.models.rnn`, the WaveNet's pairing and convolution in
:mod:`jnnex.models.wavenet`, …), as llm.c's ``train_gpt2.c`` and makemore.py keep them: a learner reads a model in
one file. A pair moves here the day a second model needs it. Nothing here reads ambient state: a synchronised
BatchNorm is told its mesh axis (``axis_name``).

Every ``<name>_forward(...)`` returns ``(out, cache)``: the output and only what the backward needs. Every
``<name>_backward(dout, cache)`` takes the upstream gradient (same shape as ``out``) and returns the gradients of the
forward's inputs, named and ordered as they are (``None`` for integer inputs). Models call the forwards in order and,
for hand-written backprop, the backwards in exactly the reverse order. Autodiff models call the same forwards and drop
the cache (XLA removes what nobody reads), so a model is written once.

Shapes use one vocabulary: B batch, T context, C channels, V vocabulary, H hidden. ``...`` is any leading batch axes:
``linear`` and ``batchnorm`` accept (B, C) and (B, T, C) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def check_shape(name: str, arr: jax.Array, shape: tuple[int, ...]) -> None:
    """Backwards rely on shapes; a wrong upstream gradient gets a clear error instead of silent broadcasting."""
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")


def check_train(train) -> None:
    """``train`` selects a code path at trace time, so it must be a Python bool (not an array)."""
    if not isinstance(train, bool):
        raise TypeError(f"train must be a Python bool (it selects the code path), got {type(train).__name__}")


def per_channel(v, ndim: int):
    """A (C,) vector shaped (1, …, 1, C) to broadcast explicitly against (..., C) (rank promotion stays strict)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


# ----------------------------------------------------------------------------------------------------------------------
# Mixed precision: a model's forward and backward may compute in bfloat16 while its parameters (and the optimiser's
# state) stay float32. Where it matters the sums are kept wide: matrix products accumulate in float32, norms take
# their statistics in float32, softmax and the loss run in float32, embedding gradients are scatter-added in float32.

PRECISIONS = ("float32", "bfloat16")


def wide(dtype):
    """The dtype sums are kept in: float32 for a 16-bit float, else ``dtype`` itself (float32, float64)."""
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def matmul(a, b):
    """``a @ b`` accumulated (and returned) in :func:`wide` of ``a``'s dtype: float32 for bfloat16 inputs."""
    return jnp.matmul(a, b, preferred_element_type=wide(a.dtype))


# The backward's products take one operand transposed (``dx = dy Wᵀ``, ``dW = xᵀ dy``). Written as ``matmul(a, b.T)``
# they compute the same numbers, but XLA's CPU backend keeps a bfloat16 product on its fast kernel (YNNPACK, which
# uses the CPU's AMX tiles where it has them) only for ``a @ b`` and ``a @ bᵀ`` stated as one dot: a transpose in front
# of the dot, or ``aᵀ @ b`` in any form, makes it convert both operands to float32 first (5–8× slower for the GPT's
# bfloat16 shapes here: `jnnex bench --only text`). So ``a @ bᵀ`` is one dot_general, and for ``aᵀ @ b`` a 16-bit ``a``
# is first copied into the transposed layout (a pass over ``a``, small beside the product). float32 and float64 are
# computed as before.


def matmul_nt(a, b):
    """``a @ bᵀ`` over the last two axes, as one dot contracting both last axes; ``b`` is 2-D (a weight, shared by
    all of ``a``'s leading axes) or has ``a``'s leading (batch) axes."""
    batch = tuple(range(b.ndim - 2))
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 1,)), (batch, batch)),
                               preferred_element_type=wide(a.dtype))


def transpose(a):
    """``a`` with its last two axes swapped, to be multiplied: a 16-bit float ``a`` as a copy laid out transposed (a
    reshape XLA cannot fold away behind an optimisation barrier), any other as a view XLA folds into the product."""
    t = jnp.swapaxes(a, -1, -2)
    if jnp.finfo(a.dtype).bits >= 32:
        return t
    return jax.lax.optimization_barrier(t.reshape(t.shape[:-2] + (-1,))).reshape(t.shape)


def matmul_tn(a, b):
    """``aᵀ @ b`` over the last two axes (leading axes batched)."""
    return matmul(transpose(a), b)


def compute_params(params, precision: str):
    """The parameters a forward computes with: themselves (``"float32"``: the parameters' own dtype, float64 in the
    proofs), or cast to bfloat16. The cast's backward casts the gradients back (:func:`param_grads`)."""
    if precision == "float32":
        return params
    return jax.tree.map(lambda p: p.astype(jnp.bfloat16) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def param_grads(grads, params):
    """Gradients in each parameter's own dtype (float32 from a bfloat16 backward: the backward of the cast)."""
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


class Pair(NamedTuple):
    """A forward/backward pair as the module that holds it declares it, in its ``PAIRS`` (``{name: Pair}``, below its
    pairs): the property tests check each declared backward against ``jax.vjp`` in float64 over the arguments
    :data:`jnnex.strategies.PAIR_ARGS` draws for it, and the backward benchmarks time the declared functions. A pair
    added to a module's ``PAIRS`` without a strategy fails the suite, naming it.

    ``forward(*args) -> (out, cache)``, ``backward(dout, cache) -> grads`` (one per argument, ``None`` for those that
    get none). ``args`` names the forward's arguments; ``fixed`` those that get no gradient (integer ids, settings
    such as a head count, a tile or a dilation)."""

    forward: Callable
    backward: Callable
    args: tuple[str, ...]
    fixed: tuple[str, ...] = ()

    @property
    def diff(self) -> tuple[int, ...]:
        """The positions of the arguments that get a gradient."""
        return tuple(i for i, name in enumerate(self.args) if name not in self.fixed)


def partition_static(tree):
    """``(arrays, static)``: a cache's array leaves (``None`` in place of the rest), and the rest — the shapes, flags
    and head counts a cache keeps as Python values — with the tree's structure. What ``lax.scan`` can carry from one
    step to the next (arrays) and what it cannot (the Python values, the same at every step of a scan over blocks of
    one shape); :func:`combine_static` puts them back together."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [leaf if isinstance(leaf, jax.Array) else None for leaf in leaves]
    static = tuple(None if isinstance(leaf, jax.Array) else leaf for leaf in leaves)
    return arrays, (treedef, static)


def combine_static(arrays, static):
    """The inverse of :func:`partition_static`."""
    treedef, values = static
    return jax.tree.unflatten(treedef, [a if v is None else v for a, v in zip(arrays, values)])


# ----------------------------------------------------------------------------------------------------------------------
# Activation recomputation: a policy on what a block's forward keeps for its backward


RECOMPUTE = ("none", "blocks")  # keep every block's caches; or keep each block's input, and run its forward again


class Recompute(NamedTuple):
    """What a block keeps under ``recompute="blocks"``: its input, its index, the forward's dropout key and mode, from
    which :func:`recomputed` runs the same forward again in the backward (the same dropout masks: they are drawn from
    the key and the index)."""

    h: jax.Array
    i: int
    key: jax.Array | None
    train: bool


def keep(recompute: str, h_in, i: int, key, train: bool, cache):
    """What block ``i``'s forward stores for the backward: its ``cache``, or under ``recompute="blocks"`` in training
    only its input ``h_in`` (an evaluation keeps its caches: nothing runs backward through them)."""
    return Recompute(h_in, i, key, train) if recompute == "blocks" and train else cache


def recomputed(block_forward: Callable, cfg, blk, c, dh):
    """``(cache, dh)``: the block's cache as stored, or, for a :class:`Recompute`, its forward run again from its
    input, with the block's parameters ``blk`` cast as the forward computed with them (``cfg.precision``). The input
    and the arriving gradient ``dh`` pass an optimisation barrier together, so XLA can neither reuse the first
    forward's values (which would keep them alive) nor run the recomputation before the backward reaches this
    block."""
    if not isinstance(c, Recompute):
        return c, dh
    h, dh = jax.lax.optimization_barrier((c.h, dh))
    return block_forward(cfg, compute_params(blk, cfg.precision), h, c.i, train=c.train, key=c.key)[1], dh


# ----------------------------------------------------------------------------------------------------------------------
# Linear: y = x @ W + b


class Linear(NamedTuple):
    """Parameters of a linear layer."""

    W: jax.Array  # (Cin, Cout)
    b: jax.Array | None  # (Cout,), or None for a bias-free layer (e.g. before BatchNorm)


def linear_forward(x, W, b=None):
    """``x (..., Cin) @ W (Cin, Cout) + b (Cout,) -> y (..., Cout)``."""
    if x.shape[-1] != W.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} input channels but W expects {W.shape[0]} (W is {W.shape})")
    y = matmul(x, W)  # accumulated in float32 for bfloat16
    if b is not None:
        y = y + per_channel(b.astype(y.dtype), y.ndim)
    return y.astype(x.dtype), (x, W, b is not None)


def linear_backward(dy, cache):
    """``dx = dy @ Wᵀ``, ``dW = xᵀ @ dy`` (leading axes flattened), ``db = Σ dy`` over leading axes."""
    x, W, has_bias = cache
    check_shape("linear_backward: dy", dy, x.shape[:-1] + (W.shape[1],))
    dx = matmul_nt(dy, W).astype(dy.dtype)  # (..., Cin)
    dW = matmul_tn(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))  # (Cin, Cout), kept wide
    db = dy.reshape(-1, dy.shape[-1]).astype(dW.dtype).sum(0) if has_bias else None  # (Cout,)
    return dx, dW, db


# ----------------------------------------------------------------------------------------------------------------------
# Nonlinearities


def tanh_forward(x):
    y = jnp.tanh(x)
    return y, y


def tanh_backward(dy, y):
    """``dx = (1 - y²) · dy``: the derivative of tanh written in its output.

    Computed as ``(1 - y)(1 + y)``: near saturation (|y| → 1) ``1 - y`` is exact where ``1 - y·y`` loses the digits
    that matter (float32, y = 0.9999: relative error 3e-8 against 5e-5).
    """
    check_shape("tanh_backward: dy", dy, y.shape)
    return (1.0 - y) * (1.0 + y) * dy


# ----------------------------------------------------------------------------------------------------------------------
# Embedding lookup: emb = C[ix]


def embedding_forward(C, ix):
    """``C (V, C) [ix (...)] -> emb (..., C)``. The row lookup is the one-hot product ``onehot(ix) @ C``."""
    if not jnp.issubdtype(ix.dtype, jnp.integer):
        raise TypeError(f"embedding: ix must be an integer array, got {ix.dtype}")
    return C[ix], (ix, C.shape)


def embedding_backward(demb, cache):
    """``dC[v] = Σ_{i: ix_i = v} demb_i`` — a scatter-add, so a repeated index accumulates; unseen rows stay 0."""
    ix, C_shape = cache
    check_shape("embedding_backward: demb", demb, ix.shape + (C_shape[1],))
    acc = wide(demb.dtype)  # a row's many additions, in float32 for bfloat16
    dC = jnp.zeros(C_shape, acc).at[ix.reshape(-1)].add(demb.reshape(-1, C_shape[1]).astype(acc))
    return dC, None


# ----------------------------------------------------------------------------------------------------------------------
# Losses (each returns a scalar; its backward takes the scalar upstream gradient)


def cross_entropy_forward(logits, y):
    """Mean softmax cross-entropy over the valid targets, via logsumexp: ``logits (..., V)``, ``y (...)`` int.

    Targets ``< 0`` are ignored (makemore's ``-1`` padding of a word's tail): the loss is the mean over the ``n``
    valid targets (0 when there are none). Window models pass ``(B, V)`` and ``(B,)``; sequence models ``(B, T, V)``
    and ``(B, T)``. A concrete ``y`` with a target ``>= V`` is a ``ValueError`` (under ``jit`` the caller checks:
    :func:`check_targets`).
    """
    if logits.ndim < 1 or y.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: expected logits (..., V) and y (...) with the same leading shape, got "
                         f"{logits.shape} and {y.shape}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"cross_entropy: y must be an integer array, got {y.dtype}")
    if not isinstance(y, jax.core.Tracer):
        check_targets(y, logits.shape[-1], "cross_entropy: y")
    logprobs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # (..., V)
    nll, valid = target_nll(logprobs, y)  # (...)
    n = jnp.maximum(valid.sum(), 1).astype(logits.dtype)  # the number of valid targets
    return nll.sum() / n, (logprobs, y, n)


def target_nll(logprobs, y):
    """``(nll (...), valid (...))``: ``-logprobs[..., y]`` where ``y >= 0``, exactly 0 where the target is ignored.
    The one place a target's log-probability is picked (the loss above, evaluation in :mod:`jnnex.lm`)."""
    valid = y >= 0
    picked = jnp.take_along_axis(logprobs, jnp.where(valid, y, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, -picked, 0.0), valid


def cross_entropy_backward(dloss, cache):
    """``dlogits = dloss · (softmax(logits) - onehot(y)) / n`` at valid targets, exactly 0 where ``y < 0``."""
    logprobs, y, n = cache
    check_shape("cross_entropy_backward: dloss", jnp.asarray(dloss), ())
    valid = (y >= 0)[..., None]  # (..., 1)
    dlogits = jnp.exp(logprobs) - jax.nn.one_hot(y, logprobs.shape[-1], dtype=logprobs.dtype)  # (..., V)
    return jnp.where(valid, dlogits * (dloss / n), 0.0), None


def check_targets(y, vocab_size: int, what: str = "targets") -> None:
    """Targets must lie in ``[0, V)`` or be ``-1`` (ignored); anything else is a ``ValueError`` naming ``what``."""
    y = np.asarray(y)
    bad = (y >= vocab_size) | (y < -1)
    if bad.any():
        raise ValueError(f"{what} must be token ids in [0, {vocab_size}) or -1 (ignored); found {int(y[bad][0])}")


# ----------------------------------------------------------------------------------------------------------------------
# BatchNorm (Ioffe & Szegedy, 2015). Statistics over every axis but the last: (B, C) and (B, T, C) alike.
#
# Variance convention (PyTorch's): the *biased* batch variance (divide by n) normalises in training, and the
# *unbiased* one (divide by n - 1) feeds the running estimate used in eval. The backward below matches this.


class BatchNormParams(NamedTuple):
    gamma: jax.Array  # (C,) gain
    beta: jax.Array  # (C,) shift


class BatchNormState(NamedTuple):
    mean: jax.Array  # (C,) running mean
    var: jax.Array  # (C,) running (unbiased) variance


def batchnorm_init(C: int, dtype=jnp.float32) -> tuple[BatchNormParams, BatchNormState]:
    return (
        BatchNormParams(jnp.ones((C,), dtype), jnp.zeros((C,), dtype)),
        BatchNormState(jnp.zeros((C,), dtype), jnp.ones((C,), dtype)),
    )


def _batch_mean(v, axes, axis_name: str | None):
    """The mean over the rows ``axes`` — of every device's rows along mesh axis ``axis_name`` (under
    ``jax.shard_map``), or of this array's alone for ``None``."""
    m = v.mean(axes)
    return m if axis_name is None else jax.lax.pmean(m, axis_name)


def _bn_rows(x) -> int:
    n = 1
    for d in x.shape[:-1]:
        n *= d
    return n


def batchnorm_forward(x, gamma, beta, eps: float = 1e-5, *, axis_name: str | None = None):
    """Train-mode BatchNorm: ``y = γ · (x - mean) / sqrt(var + eps) + β`` with batch statistics.

    Args:
        x: (..., C) activations; the statistics run over all leading axes (n = their product rows).
        gamma, beta: (C,) gain and shift.
        axis_name: under ``jax.shard_map``, the mesh axis whose devices' rows the statistics also run over
            (synchronised BatchNorm; every device must hold the same number of rows); ``None``: this array's rows.
            The backward and the running-statistics update take the same one.
    Returns:
        ``(y, cache)``; ``cache`` holds ``x``, ``rstd``, ``gamma`` and the batch ``mean``/biased ``var`` (llm.c's
        choice: the backward recomputes ``xhat`` from ``x``, ``mean`` and ``rstd`` inside its fused passes, which
        measured faster than storing ``xhat`` — one (..., C) array less written per layer).
    """
    C = x.shape[-1]
    if gamma.shape != (C,) or beta.shape != (C,):
        raise ValueError(f"batchnorm: x has {C} channels but gamma/beta have shapes {gamma.shape}/{beta.shape}")
    if _bn_rows(x) < 2:
        raise ValueError(f"batchnorm in train mode needs at least 2 rows to estimate statistics, got x {x.shape}")
    axes = tuple(range(x.ndim - 1))
    mean = _batch_mean(x, axes, axis_name)  # (C,)
    xc = x - per_channel(mean, x.ndim)  # (..., C)
    var = _batch_mean(xc * xc, axes, axis_name)  # (C,) biased
    rstd = jax.lax.rsqrt(var + eps)  # (C,)
    xhat = xc * per_channel(rstd, x.ndim)  # (..., C)
    y = xhat * per_channel(gamma, x.ndim) + per_channel(beta, x.ndim)
    return y, (x, rstd, gamma, mean, var)


def batchnorm_backward(dy, cache, *, axis_name: str | None = None):
    """``dx = γ·rstd/n · (n·dy - Σdy - xhat·Σ(dy·xhat))``; ``dγ = Σ dy·xhat``, ``dβ = Σ dy``.

    The lecture's form with ``dxhat = γ·dy`` and ``Σdxhat``, ``Σdxhat·xhat``, with γ taken out of the sums: they are
    then ``dβ`` and ``dγ``, so the whole backward reads ``dy`` in two reductions (one fused pass) and one elementwise pass.
    """
    x, rstd, gamma, mean, _ = cache
    check_shape("batchnorm_backward: dy", dy, x.shape)
    axes = tuple(range(dy.ndim - 1))
    n = _bn_rows(dy)
    d = dy.ndim
    xhat = (x - per_channel(mean, d)) * per_channel(rstd, d)  # (..., C), recomputed (see batchnorm_forward)
    dgamma = (dy * xhat).sum(axes)  # (C,)
    dbeta = dy.sum(axes)  # (C,)
    if axis_name is None:
        dx = per_channel(gamma * rstd / n, d) * (n * dy - per_channel(dbeta, d) - xhat * per_channel(dgamma, d))
    else:  # synchronised: the two means over every device's rows (dγ, dβ stay this device's share)
        mean_dy, mean_dyx = (jax.lax.pmean(s / n, axis_name) for s in (dbeta, dgamma))
        dx = per_channel(gamma * rstd, d) * (dy - per_channel(mean_dy, d) - xhat * per_channel(mean_dyx, d))
    return dx, dgamma, dbeta


def batchnorm_update_state(state: BatchNormState, mean, var, n: int, momentum: float, *,
                           axis_name: str | None = None) -> BatchNormState:
    """Exponential running averages; the biased batch ``var`` is turned unbiased (× n/(n-1)) first (``n``: this
    array's rows, times the devices along ``axis_name`` when the statistics were synchronised)."""
    if axis_name is not None:
        n = n * jax.lax.axis_size(axis_name)
    unbiased = var * (n / (n - 1))
    return BatchNormState(
        (1 - momentum) * state.mean + momentum * jax.lax.stop_gradient(mean),
        (1 - momentum) * state.var + momentum * jax.lax.stop_gradient(unbiased),
    )


def batchnorm_eval(x, gamma, beta, state: BatchNormState, eps: float = 1e-5):
    """Eval-mode BatchNorm with the running statistics: an affine map per channel."""
    C = x.shape[-1]
    if state.mean.shape != (C,):
        raise ValueError(f"batchnorm: x has {C} channels but the running statistics have {state.mean.shape[0]}")
    scale = gamma * jax.lax.rsqrt(state.var + eps)  # (C,)
    return (x - per_channel(state.mean, x.ndim)) * per_channel(scale, x.ndim) + per_channel(beta, x.ndim)


def batchnorm_step(params: BatchNormParams, state: BatchNormState, x, *, train: bool, momentum: float = 0.1,
                   eps: float = 1e-5, axis_name: str | None = None):
    """One BatchNorm layer in either mode, as every model runs it: ``(y, new_state, cache)``. Train mode normalises
    with the batch statistics over every row of ``x (..., C)`` (all its leading axes: B·T' rows for (B, T', C)),
    updates the running ones and keeps the cache for :func:`batchnorm_backward`; eval mode uses the running
    statistics, returns ``state`` unchanged and no cache."""
    check_train(train)
    if not train:
        return batchnorm_eval(x, params.gamma, params.beta, state, eps), state, None
    y, cache = batchnorm_forward(x, params.gamma, params.beta, eps, axis_name=axis_name)
    _, _, _, mean, var = cache
    return y, batchnorm_update_state(state, mean, var, _bn_rows(x), momentum, axis_name=axis_name), cache


def batchnorm(
    params: BatchNormParams,
    state: BatchNormState,
    x: jax.Array,
    *,
    train: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[jax.Array, BatchNormState]:
    """BatchNorm as a stateful layer: ``(y, new_state) = batchnorm(params, state, x, train=...)`` (equinox's form of
    :func:`batchnorm_step`, for code that needs no hand-written backward).

    >>> p, s = batchnorm_init(2)
    >>> y, s = batchnorm(p, s, jnp.array([[0., 1.], [2., 5.]], jnp.float32), train=True)
    >>> y.round(3).tolist()
    [[-1.0, -1.0], [1.0, 1.0]]
    """
    y, new_state, _ = batchnorm_step(params, state, x, train=train, momentum=momentum, eps=eps)
    return y, new_state


# ----------------------------------------------------------------------------------------------------------------------
# Dropout (Srivastava et al. 2014), inverted: scaled in training so that eval mode is the identity


def dropout_forward(x, key, rate: float, batch_axis: str | None = None):
    """Zero each element with probability ``rate``, scale the rest by ``1 / (1 - rate)``: ``E[y] = x``. The cache is
    the scaled mask ``m / (1 - rate)``, ``m ~ Bernoulli(1 - rate)``, drawn from ``key``.

    ``batch_axis`` (inside ``jax.shard_map``): ``x (B_d, ...)`` is this device's rows of a batch split along that mesh
    axis; the mask is drawn for the whole batch's shape and this device's rows taken, so a split run drops exactly
    what one device does with the whole batch."""
    if not 0 <= rate < 1:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate!r}")
    if batch_axis is None:
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    else:
        rows = x.shape[0]
        whole = jax.random.bernoulli(key, 1.0 - rate, (rows * jax.lax.axis_size(batch_axis), *x.shape[1:]))
        keep = jax.lax.dynamic_slice_in_dim(whole, jax.lax.axis_index(batch_axis) * rows, rows)
    scale = jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(x.dtype)
    return x * scale, scale


def dropout_backward(dy, scale):
    """``dx = dy · m / (1 - rate)``: the same mask, the same scale (``key`` and ``rate`` get no gradient)."""
    check_shape("dropout_backward: dy", dy, scale.shape)
    return dy * scale, None, None


def check_dropout_key(rate: float, train, key) -> None:
    """A model's forward with dropout: ``train`` a Python bool, and a key whenever training drops something."""
    check_train(train)
    if train and rate > 0 and key is None:
        raise ValueError(f"dropout {rate} in train mode needs a key (forward(..., train=True, key=...))")


def dropout_in_training(x, key, i: int, rate: float, train: bool, batch_axis: str | None = None):
    """A model's dropout number ``i``: in training, :func:`dropout_forward` with a key of its own
    (``fold_in(key, i)``; ``batch_axis`` as there); otherwise the identity. ``(x, cache)``, cache None when nothing
    was dropped."""
    if not (train and rate > 0):
        return x, None
    return dropout_forward(x, jax.random.fold_in(key, i), rate, batch_axis)


# The pairs two or more models share; a model's own pairs are declared in its module.
PAIRS = {
    "linear": Pair(linear_forward, linear_backward, ("x", "W", "b")),
    "tanh": Pair(tanh_forward, tanh_backward, ("x",)),
    "embedding": Pair(embedding_forward, embedding_backward, ("C", "ix"), fixed=("ix",)),
    "cross_entropy": Pair(cross_entropy_forward, cross_entropy_backward, ("logits", "y"), fixed=("y",)),
    "batchnorm": Pair(batchnorm_forward, batchnorm_backward, ("x", "gamma", "beta")),
}
