"""Atomic backprop: the BatchNorm language model broken into elementary tensor operations, and every gradient by hand.

This is exercise 1 of makemore part 4 ("becoming a backprop ninja"). The forward of the single-hidden-layer BatchNorm
net (``bn-mlp``) is written out one elementary operation per line — the embedding gather and concatenation, the linear
layer, BatchNorm as mean → difference → square → variance → reciprocal square root → scale → shift, tanh, the output
layer, and cross-entropy as max-shift → exp → sum → reciprocal → probabilities → log → pick → mean — and
:func:`backward` walks those lines in reverse, returning **every** intermediate gradient by name (``dlogprobs``,
``dprobs``, ``dcounts_sum_inv``, …, ``dbnraw``, ``dhprebn``, ``dembcat``, ``demb``, ``dC``). Broadcasting is written
out: reduced statistics keep their axis (``(1, H)``, ``(B, 1)``) and are broadcast back explicitly.

Conventions are the compact path's (:mod:`jnnex.layers`): the **biased** batch variance (divide by n) normalises, so
``bnvar = bndiff2.mean(0)`` where the lecture's PyTorch code uses Bessel's n - 1; where ``logits.max`` has ties, its
gradient is split equally between them, as ``jax.grad`` does (PyTorch picks one).

Numerics: this decomposition is the lecture's, not a stable one. The max-shift keeps ``exp`` finite, but a target
whose probability underflows to 0 (a logit ~1e3 below the row's maximum, in float64) gives ``log 0 = -inf`` and an
infinite loss; the compact cross-entropy (:func:`jnnex.layers.cross_entropy_forward`, via logsumexp) stays finite.

Grading: :func:`grade` judges a learner's expressions for any gradients each on its own, from the right upstream
gradients (lesson 5's exercises). Exercise mode: :func:`exercise` replaces any intermediate gradients with your own
expressions and prints the lecture's
``cmp`` table for every gradient against ``jax.grad``::

    >>> from jnnex import atomic
    >>> print(atomic.exercise({"dprobs": lambda f, g: g.dlogprobs / f.probs}))  # doctest: +SKIP
    dlogprobs       | exact: True  | approximate: True  | maxdiff: 0
    dprobs          | exact: True  | approximate: True  | maxdiff: 0
    ...
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jnnex.models.bn_mlp import BN_MLP_SMALL, BNMLPConfig, BNMLPParams, bn_mlp
from jnnex.check import Grade, Row, compare_arrays, format_table, grade_call, randomise
from jnnex.layers import check_shape

# The forward's intermediates, in the order they are computed.
INTERMEDIATES = (
    "emb", "embcat", "hprebn", "bnmeani", "bndiff", "bndiff2", "bnvar", "bnvar_inv", "bnraw", "hpreact", "h",
    "logits", "logit_maxes", "norm_logits", "counts", "counts_sum", "counts_sum_inv", "probs", "logprobs",
)
# Every gradient :func:`backward` returns, in the order it computes them (the reverse of the forward).
GRADIENTS = (
    "dlogprobs", "dprobs", "dcounts_sum_inv", "dcounts_sum", "dcounts", "dnorm_logits", "dlogit_maxes", "dlogits",
    "dh", "dW2", "db2", "dhpreact", "dbngain", "dbnbias", "dbnraw", "dbnvar_inv", "dbnvar", "dbndiff2", "dbndiff",
    "dbnmeani", "dhprebn", "dembcat", "dW1", "db1", "demb", "dC",
)
# Gradients of parameters, and where they sit in BNMLPParams.
PARAMETER_GRADIENTS = {"dC": "C", "dW1": "W1", "db1": "b1", "dbngain": "bngain", "dbnbias": "bnbias", "dW2": "W2",
                       "db2": "b2"}


def _check_model(cfg: BNMLPConfig, params: BNMLPParams) -> None:
    if not (cfg.n_layers == 1 and cfg.batchnorm and not cfg.final_batchnorm and cfg.hidden_bias):
        raise ValueError("the atomic backward is written for the single-hidden-layer BatchNorm net (bn-mlp: "
                         f"BNMLPConfig(**BN_MLP_SMALL, ...)); got {cfg}")
    if len(params.dense) != 2 or len(params.bn) != 1:
        raise ValueError("params must be a bn-mlp's: two Linear layers and one BatchNorm")


def _unpack(params: BNMLPParams) -> dict:
    (W1, b1), (W2, b2) = params.dense
    return dict(C=params.C, W1=W1, b1=b1, bngain=params.bn[0].gamma, bnbias=params.bn[0].beta, W2=W2, b2=b2)


def forward(cfg: BNMLPConfig, params: BNMLPParams, x, y, probes: Mapping[str, jax.Array] | None = None):
    """The train-mode loss, one elementary operation per line.

    Args:
        cfg: a ``bn-mlp`` configuration (one hidden layer with bias, BatchNorm, no final BatchNorm).
        params: its parameters.
        x: (B, T) int context windows; y: (B,) int targets (``-1``: ignored, as everywhere in jnnex).
        probes: optional zeros added to named intermediates, so that ``jax.grad`` with respect to a probe is the
            gradient of the loss with respect to that intermediate (how :func:`reference` gets its oracle).

    Returns:
        ``(loss, f)``: the mean cross-entropy and a dict with the inputs, the parameters (lecture names: ``C, W1, b1,
        bngain, bnbias, W2, b2``), ``eps`` and every intermediate in :data:`INTERMEDIATES`.
    """
    _check_model(cfg, params)
    if x.ndim != 2 or x.shape[1] != cfg.block_size or y.shape != x.shape[:1]:
        raise ValueError(f"expected x (B, {cfg.block_size}) and y (B,), got {x.shape} and {y.shape}")
    f = dict(x=x, y=y, eps=cfg.eps, **_unpack(params))
    probes = probes or {}

    def keep(name, value):
        f[name] = value + probes[name] if name in probes else value
        return f[name]

    B = x.shape[0]
    p = types.SimpleNamespace(**f)
    # Embedding and the first linear layer.
    emb = keep("emb", p.C[x])  # (B, T, n_embd)
    embcat = keep("embcat", emb.reshape(B, -1))  # (B, T·n_embd)
    hprebn = keep("hprebn", embcat @ p.W1 + p.b1.reshape(1, -1))  # (B, H)
    # BatchNorm, one statistic at a time (biased variance).
    bnmeani = keep("bnmeani", hprebn.sum(0, keepdims=True) / B)  # (1, H)
    bndiff = keep("bndiff", hprebn - bnmeani)  # (B, H)
    bndiff2 = keep("bndiff2", bndiff**2)  # (B, H)
    bnvar = keep("bnvar", bndiff2.sum(0, keepdims=True) / B)  # (1, H)
    bnvar_inv = keep("bnvar_inv", (bnvar + cfg.eps) ** -0.5)  # (1, H)
    bnraw = keep("bnraw", bndiff * bnvar_inv)  # (B, H)
    hpreact = keep("hpreact", p.bngain.reshape(1, -1) * bnraw + p.bnbias.reshape(1, -1))  # (B, H)
    # Non-linearity and the output layer.
    h = keep("h", jnp.tanh(hpreact))  # (B, H)
    logits = keep("logits", h @ p.W2 + p.b2.reshape(1, -1))  # (B, V)
    # Cross-entropy, one step at a time.
    logit_maxes = keep("logit_maxes", logits.max(1, keepdims=True))  # (B, 1)
    norm_logits = keep("norm_logits", logits - logit_maxes)  # (B, V): subtract the max for numerical stability
    counts = keep("counts", jnp.exp(norm_logits))  # (B, V)
    counts_sum = keep("counts_sum", counts.sum(1, keepdims=True))  # (B, 1)
    counts_sum_inv = keep("counts_sum_inv", counts_sum**-1)  # (B, 1)
    probs = keep("probs", counts * counts_sum_inv)  # (B, V)
    logprobs = keep("logprobs", jnp.log(probs))  # (B, V)
    valid = y >= 0  # targets < 0 are ignored (the contract of jnnex.layers.cross_entropy_forward)
    n = jnp.maximum(valid.sum(), 1).astype(logprobs.dtype)
    loss = -jnp.where(valid, logprobs[jnp.arange(B), jnp.where(valid, y, 0)], 0.0).sum() / n
    return loss, f


def backward(f: Mapping, dloss=1.0, overrides: Mapping[str, Callable] | None = None) -> dict:
    """Every gradient of :data:`GRADIENTS`, by hand, from the intermediates ``f`` of :func:`forward`.

    Args:
        f: the dict returned by :func:`forward`.
        dloss: upstream gradient of the loss (a scalar).
        overrides: exercise mode — ``{name: fn}`` replaces gradient ``name`` by ``fn(f, g)``, where ``f`` and ``g`` are
            namespaces of the forward's values and the gradients computed so far (``g.dlogprobs``, ``f.probs``). The
            rest of the backward continues from your value.

    Returns:
        ``{name: gradient}`` for every name in :data:`GRADIENTS`, each with the shape of its forward value.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(GRADIENTS)
    if unknown:
        raise ValueError(f"overrides: unknown gradient names {sorted(unknown)}; choose from {GRADIENTS}")
    check_shape("backward: dloss", jnp.asarray(dloss), ())
    p = types.SimpleNamespace(**f)
    g: dict = {}

    def put(name, value, like):
        """Record gradient ``name`` (a learner's expression instead, if given), checking it has ``like``'s shape."""
        if name in overrides:
            value = overrides.pop(name)(p, types.SimpleNamespace(**g))
        check_shape(name, value, like.shape)
        g[name] = value
        return value

    B, V = p.logits.shape
    n = B  # rows BatchNorm averages over

    # Cross-entropy: loss = -Σ_i logprobs[i, y_i] / n over the n valid targets. Only the picked entries get gradient
    # (one_hot of an ignored target, -1, is a row of zeros).
    n_valid = jnp.maximum((p.y >= 0).sum(), 1).astype(p.logprobs.dtype)
    dlogprobs = put("dlogprobs", jax.nn.one_hot(p.y, V, dtype=p.logprobs.dtype) * (-dloss / n_valid), p.logprobs)
    dprobs = put("dprobs", dlogprobs / p.probs, p.probs)  # d log(p) = dp / p
    # probs = counts * counts_sum_inv: counts_sum_inv (B, 1) was broadcast across V, so its gradient sums over V.
    dcounts_sum_inv = put("dcounts_sum_inv", (p.counts * dprobs).sum(1, keepdims=True), p.counts_sum_inv)  # (B, 1)
    dcounts_sum = put("dcounts_sum", -(p.counts_sum**-2) * dcounts_sum_inv, p.counts_sum)  # d(1/s) = -1/s² ds
    # counts feeds probs directly and counts_sum (a sum: gradient copied back to every element of the row).
    dcounts = put("dcounts", p.counts_sum_inv * dprobs + jnp.broadcast_to(dcounts_sum, p.counts.shape), p.counts)
    dnorm_logits = put("dnorm_logits", p.counts * dcounts, p.norm_logits)  # d exp(u) = exp(u) du
    dlogit_maxes = put("dlogit_maxes", -dnorm_logits.sum(1, keepdims=True), p.logit_maxes)  # (B, 1), ~0
    # logits feed norm_logits directly and the row max (gradient to the argmax; split equally between ties).
    at_max = (p.logits == p.logit_maxes).astype(p.logits.dtype)  # (B, V)
    at_max = at_max / at_max.sum(1, keepdims=True)
    dlogits = put("dlogits", dnorm_logits + at_max * dlogit_maxes, p.logits)  # (B, V)
    # Output layer: logits = h @ W2 + b2.
    dh = put("dh", dlogits @ p.W2.T, p.h)  # (B, H)
    put("dW2", p.h.T @ dlogits, p.W2)  # (H, V)
    put("db2", dlogits.sum(0), p.b2)  # (V,)
    # tanh: d tanh(u) = (1 - tanh²(u)) du.
    dhpreact = put("dhpreact", (1.0 - p.h**2) * dh, p.hpreact)  # (B, H)
    # BatchNorm scale and shift: hpreact = bngain * bnraw + bnbias.
    put("dbngain", (p.bnraw * dhpreact).sum(0), p.bngain)  # (H,)
    put("dbnbias", dhpreact.sum(0), p.bnbias)  # (H,)
    dbnraw = put("dbnraw", p.bngain.reshape(1, -1) * dhpreact, p.bnraw)  # (B, H)
    # bnraw = bndiff * bnvar_inv.
    dbnvar_inv = put("dbnvar_inv", (p.bndiff * dbnraw).sum(0, keepdims=True), p.bnvar_inv)  # (1, H)
    dbnvar = put("dbnvar", -0.5 * (p.bnvar + p.eps) ** -1.5 * dbnvar_inv, p.bnvar)  # (1, H)
    dbndiff2 = put("dbndiff2", jnp.broadcast_to(dbnvar / n, p.bndiff2.shape), p.bndiff2)  # bnvar = Σ bndiff2 / n
    # bndiff feeds bnraw directly and bndiff2 (d u² = 2u du).
    dbndiff = put("dbndiff", p.bnvar_inv * dbnraw + 2.0 * p.bndiff * dbndiff2, p.bndiff)  # (B, H)
    dbnmeani = put("dbnmeani", -dbndiff.sum(0, keepdims=True), p.bnmeani)  # (1, H)
    # hprebn feeds bndiff directly and the mean (gradient shared equally by the n rows).
    dhprebn = put("dhprebn", dbndiff + jnp.broadcast_to(dbnmeani / n, p.hprebn.shape), p.hprebn)  # (B, H)
    # First linear layer: hprebn = embcat @ W1 + b1.
    dembcat = put("dembcat", dhprebn @ p.W1.T, p.embcat)  # (B, T·n_embd)
    put("dW1", p.embcat.T @ dhprebn, p.W1)  # (T·n_embd, H)
    put("db1", dhprebn.sum(0), p.b1)  # (H,)
    # Concatenation is a reshape; the gather's gradient is a scatter-add (repeated characters accumulate).
    demb = put("demb", dembcat.reshape(p.emb.shape), p.emb)  # (B, T, n_embd)
    put("dC", jnp.zeros_like(p.C).at[p.x.reshape(-1)].add(demb.reshape(-1, p.C.shape[1])), p.C)  # (V, n_embd)
    return g


def parameter_gradients(params: BNMLPParams, g: Mapping) -> BNMLPParams:
    """The parameters' gradients among ``g`` (``dC``, ``dW1``, … by name) in the parameters' own structure: what an
    optimiser step takes."""
    (l1, l2), (bn,) = params.dense, params.bn
    return BNMLPParams(g["dC"], (l1._replace(W=g["dW1"], b=g["db1"]), l2._replace(W=g["dW2"], b=g["db2"])),
                       (bn._replace(gamma=g["dbngain"], beta=g["dbnbias"]),))


def reference(cfg: BNMLPConfig, params: BNMLPParams, x, y) -> dict:
    """The oracle: every gradient of :data:`GRADIENTS` by ``jax.grad`` (intermediates through zero probes)."""
    _, f = forward(cfg, params, x, y)
    zeros = {name: jnp.zeros_like(f[name]) for name in INTERMEDIATES}

    def loss(params, probes):
        return forward(cfg, params, x, y, probes)[0]

    dparams, dprobes = jax.grad(loss, argnums=(0, 1))(params, zeros)
    ref = {"d" + name: dprobes[name] for name in INTERMEDIATES}
    dparams = _unpack(dparams)
    ref.update({d: dparams[name] for d, name in PARAMETER_GRADIENTS.items()})
    return {name: ref[name] for name in GRADIENTS}


def compare(cfg: BNMLPConfig, params: BNMLPParams, x, y, overrides=None, *, rtol=1e-10, atol=1e-12) -> list[Row]:
    """The ``cmp`` table: each hand-written gradient (with ``overrides``) against :func:`reference`."""
    mine = backward(forward(cfg, params, x, y)[1], overrides=overrides)
    ref = reference(cfg, params, x, y)
    return [compare_arrays(name, mine[name], ref[name], rtol=rtol, atol=atol) for name in GRADIENTS]


def grade(problem, answers: Mapping[str, Callable], *, given: Sequence[str] | None = None, rtol=1e-10,
          atol=1e-12) -> list[Grade]:
    """Each answer judged on its own: ``answers[name](f, g)`` against ``jax.grad``'s gradient ``name``, where ``g``
    holds the *right* gradients computed before it in the backward (or only those ``given`` names) — so one run
    names every mistake, not the first and everything computed from it. A wrong shape, a NaN or an exception is a
    row saying what was expected (:class:`jnnex.check.Grade`). Rows in the backward's order."""
    unknown = set(answers) - set(GRADIENTS)
    if unknown:
        raise ValueError(f"answers: unknown gradient names {sorted(unknown)}; choose from {GRADIENTS}")
    cfg, params, x, y = problem
    _, f = forward(cfg, params, x, y)
    ref = reference(cfg, params, x, y)
    p = types.SimpleNamespace(**f)
    rows = []
    for k, name in enumerate(GRADIENTS):
        if name in answers:
            g = types.SimpleNamespace(**{n: ref[n] for n in (GRADIENTS[:k] if given is None else given)})
            rows.append(grade_call(name, answers[name], (p, g), ref[name], rtol=rtol, atol=atol))
    return rows


def example_problem(seed: int = 42, batch: int = 32, dtype=jnp.float64):
    """The lecture's setting: ``bn-mlp`` (n_embd 10, H 64 here for speed, block 3, V 27), random biases and γ/β
    (never 0/1, which hide wrong gradients), a batch of ``batch`` random windows. Returns ``(cfg, params, x, y)``."""
    cfg = BNMLPConfig(**{**BN_MLP_SMALL, "n_hidden": 64})
    keys = jax.random.split(jax.random.key(seed), 4)
    params = randomise(bn_mlp(cfg).init(keys[0])[0], keys[1], dtype, scale=0.1)
    x = jax.random.randint(keys[2], (batch, cfg.block_size), 0, cfg.vocab_size, dtype=jnp.int32)
    y = jax.random.randint(keys[3], (batch,), 0, cfg.vocab_size, dtype=jnp.int32)
    return cfg, params, x, y


def exercise(attempts: Mapping[str, Callable], problem=None) -> str:
    """Try your own expressions for any gradients and see the ``cmp`` table for all of them.

    Args:
        attempts: ``{name: fn(f, g)}`` — e.g. ``{"dbnraw": lambda f, g: f.bngain * g.dhpreact}`` (with
            ``f.bngain`` of shape (H,), that is a rank-promotion error under strict settings: write
            ``f.bngain.reshape(1, -1)``). Names from :data:`GRADIENTS`; ``f`` holds the forward's values (lecture
            names), ``g`` the gradients computed before yours.
        problem: ``(cfg, params, x, y)``; default :func:`example_problem` in float64 (needs ``jax_enable_x64``;
            otherwise float32, and "exact" becomes rarer).

    Returns:
        The table as text: one row per gradient, yours and every one computed from it.
    """
    cfg, params, x, y = problem if problem is not None else example_problem(
        dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    rows = compare(cfg, params, x, y, overrides=attempts)
    return format_table([dataclasses.replace(r, name=f"{r.name} (yours)") if r.name in attempts else r for r in rows])
