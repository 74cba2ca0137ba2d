"""What every jnnex language model is, and what works on any of them: loss, evaluation, sampling.

A language model maps token ids to logits over the V tokens that come next, in one of two shapes (makemore's):

* a **window** model reads a context ``x (B, T)`` and predicts the one next token: logits ``(B, V)``, targets ``(B,)``;
* a **per-position** model reads a padded word ``x (B, T)`` and predicts the next token at every position: logits
  ``(B, T, V)``, targets ``(B, T)`` with ``-1`` where there is nothing to predict.

In jnnex a model is a bundle of pure functions (:class:`LanguageModel`) around **one forward**,
``forward(cfg, params, state, x, train, key=None) -> Forward(logits, state, caches, acts)``: ``apply`` keeps the
logits and state, the hand-written backward consumes the caches, diagnostics reads the activations. ``state``
carries what is not learned by gradient (BatchNorm's running statistics); it is ``()`` for stateless models.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jnnex import memory
from jnnex.settings import positive_int
from jnnex.layers import check_targets, cross_entropy_backward, cross_entropy_forward, target_nll


class Forward(NamedTuple):
    """What a model's one forward returns."""

    logits: jax.Array  # (B, V) for a window model; (B, T, V) for a per-position (sequence) model
    state: Any  # the new model state (BatchNorm running statistics after a train-mode step); () if none
    caches: Any  # what the model's hand-written backward needs (unused under autodiff: XLA drops it)
    acts: tuple  # the hidden activations, in forward order, for diagnostics: (B, H) or (B, T', H) arrays
    aux: Any = 0.0  # what the model adds to the training objective (a mixture of experts' balancing loss); 0 if none


class ManualGradients(NamedTuple):
    """One train-mode forward and the hand-written backward, with everything diagnostics reads."""

    loss: jax.Array  # () the objective: the mean cross-entropy over the valid targets, plus the forward's aux loss
    grads: Any  # like params
    state: Any  # the new model state
    acts: tuple  # the forward's hidden activations
    act_grads: tuple  # the loss gradient w.r.t. each of them (the backward computes them on its way)


class Pipe(NamedTuple):
    """A transformer cut where a pipeline cuts it (:mod:`jnnex.pipeline`): the forward/backward pairs of what comes
    before the blocks, of one block, and of what comes after — the functions the model's own forward and backward are
    written with, so a pipeline stage runs them and nothing else.

    * ``embed_forward(cfg, params, x, train, key) -> (h, cache)``; ``embed_backward(cfg, dh, cache) -> {field: grad}``;
    * ``block_forward(cfg, blk, h, i, *, train, key) -> (h, cache)``; ``block_backward(dh, cache) -> (dh, dblk)``;
    * ``top_forward(cfg, params, h) -> (logits, cache)``; ``top_backward(cfg, dlogits, cache) -> (dh, {field: grad})``.

    The parameters are a ``NamedTuple`` with a ``blocks`` field (one block each); the other fields are what the
    embed and top pairs read, and their gradients come back by field name (:func:`merge_grads`)."""

    embed_forward: Callable
    embed_backward: Callable
    block_forward: Callable
    block_backward: Callable
    top_forward: Callable
    top_backward: Callable


def merge_grads(*parts: dict) -> dict:
    """Gradients by field from several uses, summed where a field is used twice (a tied table: the embedding's and
    the head's), in the order given."""
    out: dict = {}
    for part in parts:
        for name, g in part.items():
            if out.get(name) is None:
                out[name] = g
            elif g is not None:
                out[name] = jax.tree.map(jnp.add, out[name], g)
    return out


GRADIENTS = ("autodiff", "manual")


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """A language model as pure functions.

    The functions are module-level and take the config first, so two models with equal configs compare (and hash)
    equal and share compiled code; the methods below bind the config.

    Attributes:
        name: registry name (``"bigram"``, ``"mlp"``, …).
        cfg: the model's frozen config dataclass; has ``vocab_size`` (V) and ``block_size`` (T).
        init_fn: ``(key, cfg) -> (params, state)``.
        forward_fn: the model's one forward, ``(cfg, params, state, x (B, T) int32, train: bool, key=None) ->``
            :class:`Forward`. :meth:`apply`, the hand-written backward and diagnostics all run it.
        backward_fn: optional hand-written ``(cfg, params, caches, dlogits) -> (grads, act_grads)``: the layer
            backwards in reverse order of the forward, ``grads`` shaped like ``params``, ``act_grads`` like ``acts``.
        penalty_fn: optional ``(cfg, params) -> scalar`` added to the training objective (an L2 term, say); the
            reported cross-entropy never includes it.
        gradients: ``"autodiff"`` (``jax.grad`` of :meth:`objective`) or ``"manual"`` (:meth:`value_and_grad_manual`:
            ``jax.grad`` nowhere in the training path); see :meth:`with_gradients`.
        stochastic: ``True`` for a model with random layers in train mode (dropout): its forward reads the
            ``key`` that every train-mode call below passes on (:func:`jnnex.train.make_step` gives each step its
            own); eval mode needs none. Every model's forward takes ``key=None`` (one signature; a model without
            random layers ignores it), so a model that gains dropout changes nothing outside itself.
        per_position: ``False``: a window ``x (B, T)`` predicts one next token, logits ``(B, V)``, targets ``(B,)``.
            ``True``: a sequence ``x (B, T)`` predicts every next token, logits ``(B, T, V)``, targets ``(B, T)``
            with ``-1`` where nothing is predicted (:func:`jnnex.data.build_sequences`).
        embeddings_fn: optional ``params -> (V, C)`` token embedding table, for pictures.
        prefill_fn, decode_fn: optional incremental decoding with a KV cache (a per-position model's):
            ``prefill_fn(cfg, params, x (B, T)) -> (logits (B, T, V), cache)`` and ``decode_fn(cfg, params, cache,
            token (B,), pos) -> (logits (B, V), cache)``; :func:`continue_text` uses them.
        pipe: optional :class:`Pipe`, the model cut into what comes before its blocks, a block, and what comes after:
            what a pipeline stage runs (:mod:`jnnex.pipeline`).
        lr_scale_fn: optional ``(cfg, params) -> tree of floats like params, or None``: per-tensor learning-rate
            multipliers the parametrisation asks for (μP's ``1/r`` on the hidden matrices);
            :func:`jnnex.optim.make_optimizer` applies them to the optimiser's updates.
        split_fn: optional ``cfg -> {block field: rule}``, the model's tensor-parallel split as data
            (:class:`jnnex.collectives.Column`, :data:`jnnex.collectives.ROW`): which linear of each block splits
            how. A model with one has a ``model_axis`` config field its kernels read; :mod:`jnnex.tensor_parallel`
            lays the parameters out from the rules and runs the model's own forward and backward under
            ``shard_map``.
    """

    name: str
    cfg: Any
    init_fn: Callable
    forward_fn: Callable
    backward_fn: Callable | None = None
    penalty_fn: Callable | None = None
    gradients: str = "autodiff"
    stochastic: bool = False
    per_position: bool = False
    embeddings_fn: Callable | None = None
    prefill_fn: Callable | None = None
    decode_fn: Callable | None = None
    split_fn: Callable | None = None
    pipe: Pipe | None = None
    lr_scale_fn: Callable | None = None

    def __post_init__(self):
        if self.gradients not in GRADIENTS:
            raise ValueError(f"gradients must be one of {GRADIENTS}, got {self.gradients!r}")
        if self.gradients == "manual" and self.backward_fn is None:
            raise ValueError(f"model {self.name!r} has no hand-written backward; gradients='manual' is not available")
        if self.gradients == "manual" and self.penalty_fn is not None:
            raise ValueError(f"model {self.name!r} has a penalty term its hand-written backward does not cover")

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def with_gradients(self, gradients: str) -> LanguageModel:
        """The same model trained on ``"manual"`` (hand-written) or ``"autodiff"`` gradients."""
        return dataclasses.replace(self, gradients=gradients)

    def init(self, key):
        """``(params, state)`` for this model."""
        return self.init_fn(key, self.cfg)

    def forward(self, params, state, x, *, train: bool, key=None) -> Forward:
        """The model's one forward; ``key`` feeds a :attr:`stochastic` model's random layers (ignored otherwise)."""
        return self.forward_fn(self.cfg, params, state, x, train, key=key)

    def apply(self, params, state, x, *, train: bool, key=None):
        """``(logits, new_state)`` for contexts ``x (B, T)``: logits ``(B, V)``, or ``(B, T, V)`` per position."""
        out = self.forward(params, state, x, train=train, key=key)
        return out.logits, out.state

    def loss(self, params, state, x, y, *, train: bool = True, key=None):
        """Mean cross-entropy over the valid targets (``y >= 0``): ``(loss, new_state)``."""
        logits, new_state = self.apply(params, state, x, train=train, key=key)
        return cross_entropy_forward(logits, y)[0], new_state

    def objective(self, params, state, x, y, key=None):
        """What training minimises: the cross-entropy, plus the forward's auxiliary loss (:attr:`Forward.aux`: a
        mixture of experts' balancing loss) and the penalty, if any. ``(objective, new_state)``."""
        out = self.forward(params, state, x, train=True, key=key)
        loss, new_state = cross_entropy_forward(out.logits, y)[0] + out.aux, out.state
        if self.penalty_fn is not None:
            loss = loss + self.penalty_fn(self.cfg, params)
        return loss, new_state

    def value_and_grad_manual(self, params, state, x, y, key=None):
        """``(loss, grads, new_state)`` entirely by hand: the forward, the cross-entropy pair, the model's backward."""
        out = manual_gradients(self, params, state, x, y, key)
        return out.loss, out.grads, out.state

    def value_and_grad(self, params, state, x, y, key=None):
        """``(objective, grads, new_state)`` on this model's :attr:`gradients`: hand-written, or ``jax.grad``."""
        if self.gradients == "manual":
            return self.value_and_grad_manual(params, state, x, y, key)
        (loss, new_state), grads = jax.value_and_grad(self.objective, has_aux=True)(params, state, x, y, key)
        return loss, grads, new_state


def manual_gradients(model: LanguageModel, params, state, x, y, key=None, dloss=None) -> ManualGradients:
    """One train-mode forward, then every gradient by hand in reverse order (no autodiff anywhere). ``dloss`` seeds
    the backward (default 1: the gradients of this batch's mean loss; data parallelism passes a shard's weight)."""
    if model.backward_fn is None:
        raise ValueError(f"model {model.name!r} has no hand-written backward")
    out = model.forward(params, state, x, train=True, key=key)
    loss, c_ce = cross_entropy_forward(out.logits, y)
    seed = jnp.ones((), out.logits.dtype) if dloss is None else jnp.asarray(dloss, out.logits.dtype)
    dlogits, _ = cross_entropy_backward(seed, c_ce)  # (B, V) or (B, T, V)
    grads, act_grads = model.backward_fn(model.cfg, params, out.caches, dlogits)  # (an aux loss's: seeded inside)
    return ManualGradients(loss + out.aux, grads, out.state, out.acts, tuple(act_grads))


def manual_vjp(model: LanguageModel, *, train: bool = True) -> Callable:
    """``logits(params, state, x, key=None)``: the model's logits, whose derivatives come from its hand-written
    backward (``jax.custom_vjp``), so ``jax.grad`` of *any* function of the logits runs on it.

    ``state`` (BatchNorm's running statistics), ``x`` and ``key`` get no gradient. The residuals kept for the backward
    are the inputs: the backward runs the forward again for its caches (one more forward per gradient, traded for
    keeping the caches' shapes and flags out of JAX's residuals). Only parameters are differentiated; a model whose
    train-mode forward pools over the batch (BatchNorm) still gets the batch-coupled gradient it should.
    """
    if model.backward_fn is None:
        raise ValueError(f"model {model.name!r} has no hand-written backward")

    @jax.custom_vjp
    def logits(params, state, x, key):
        return model.forward(params, state, x, train=train, key=key).logits

    def fwd(params, state, x, key):
        return logits(params, state, x, key), (params, state, x, key)

    def bwd(res, dlogits):
        params, state, x, key = res
        out = model.forward(params, state, x, train=train, key=key)
        grads, _ = model.backward_fn(model.cfg, params, out.caches, dlogits)
        return grads, None, None, None

    logits.defvjp(fwd, bwd)
    return lambda params, state, x, key=None: logits(params, state, x, key)


def check_batch(model: LanguageModel, X, Y, what: str) -> None:
    """``X (N, T)`` token ids in ``[0, V)`` and targets of the model's contract (``Y (N,)``, or ``(N, T)`` per
    position; ids in ``[0, V)`` or ``-1``); otherwise a ``ValueError`` that names ``what`` and what was expected."""
    X, Y = np.asarray(X), np.asarray(Y)
    want_y = "(N, T)" if model.per_position else "(N,)"
    shape_ok = X.ndim == 2 and (Y.shape == X.shape if model.per_position else
                                (Y.shape == X.shape[:1] and X.shape[1] == model.block_size))
    if not shape_ok:
        T = "T" if model.per_position else str(model.block_size)
        raise ValueError(f"{what}: model {model.name!r} expects X (N, {T}) and Y {want_y}, got {X.shape} and {Y.shape}")
    if not (np.issubdtype(X.dtype, np.integer) and np.issubdtype(Y.dtype, np.integer)):
        raise ValueError(f"{what}: X and Y must be integer token ids, got {X.dtype} and {Y.dtype}")
    if X.size and (X.min() < 0 or X.max() >= model.vocab_size):
        bad = X[(X < 0) | (X >= model.vocab_size)][0]
        raise ValueError(f"{what}: the data has token id {int(bad)} but model {model.name!r} has a vocabulary of "
                         f"{model.vocab_size} (was it built for this data's vocabulary?)")
    check_targets(Y, model.vocab_size, f"{what}: Y")


def count_params(params) -> int:
    return int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


@functools.partial(jax.jit, static_argnames="model")
def _nll_sum(model, params, state, x, y):
    """``(Σ nll, number of valid targets)`` of one chunk, in eval mode."""
    logits, _ = model.apply(params, state, x, train=False)  # (b, V) or (b, T, V)
    nll, valid = target_nll(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), y)  # (b,) or (b, T)
    return nll.sum(), valid.sum(dtype=jnp.int32)


def evaluate(model: LanguageModel, params, state, X, Y, *, chunk: int = 16384) -> float:
    """Mean negative log-likelihood (nats per token) over every valid target of ``(X, Y)``, in eval mode.

    Token-weighted: a per-position split's loss is the total over all its predicted characters divided by their
    number (not a mean of per-batch means). ``X (N, T)``; ``Y (N,)`` for a window model, ``(N, T)`` per position.
    The set is cut into chunks of ``chunk`` predictions, the last one padded with ignored targets, so every split of
    a run shares one compiled program.
    """
    check_batch(model, X, Y, "evaluate")
    X, Y = np.asarray(X, np.int32), np.asarray(Y, np.int32)
    if not (Y >= 0).any():
        raise ValueError("evaluate: the data has no target to predict")
    rows = max(1, chunk // (X.shape[1] if model.per_position else 1))  # about `chunk` predictions per call
    pad = -len(X) % rows
    X = np.concatenate([X, np.zeros((pad, *X.shape[1:]), np.int32)])
    Y = np.concatenate([Y, np.full((pad, *Y.shape[1:]), -1, np.int32)])  # padding rows: ignored targets
    sums = [_nll_sum(model, params, state, X[i : i + rows], Y[i : i + rows]) for i in range(0, len(X), rows)]
    total, count = np.sum([float(t) for t, _ in sums], dtype=np.float64), sum(int(c) for _, c in sums)
    return float(total / count)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def check_sampling(model: LanguageModel, temperature, top_k) -> None:
    """A ``ValueError`` naming ``temperature`` or ``top_k`` unless they are a sampler's: > 0, and None or 1 .. V."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= model.vocab_size):
        raise ValueError(f"top_k must be an integer in [1, {model.vocab_size}] or left out (None), got {top_k!r}")


@functools.partial(jax.jit, static_argnames=("model", "n", "max_len", "top_k"))
def _generate(model, params, state, key, n, max_len, temperature, top_k):
    T = model.block_size

    def body(carry, t):
        ctx, done = carry  # (n, T), (n,)
        logits, _ = model.apply(params, state, ctx, train=False)  # (n, V), or (n, T, V) per position
        if model.per_position:  # the prediction after the last token read: position t until the context is full
            logits = jax.lax.dynamic_index_in_dim(logits, jnp.minimum(t, T - 1), axis=1, keepdims=False)
        logits = logits.astype(jnp.float32) / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (n, 1)
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        tok = jax.random.categorical(jax.random.fold_in(key, t), logits, axis=-1).astype(jnp.int32)  # (n,)
        tok = jnp.where(done, 0, tok)  # a finished name only emits the boundary token
        shifted = jnp.concatenate([ctx[:, 1:], tok[:, None]], axis=1)  # a full context slides (cropped to T)
        if model.per_position:  # a sequence grows from the start token until it fills the context
            placed = jax.lax.dynamic_update_index_in_dim(ctx, tok, jnp.minimum(t + 1, T - 1), axis=1)
            shifted = jnp.where(t + 1 < T, placed, shifted)
        return (shifted, done | (tok == 0)), tok

    ctx0 = jnp.zeros((n, T), jnp.int32)
    _, toks = jax.lax.scan(body, (ctx0, jnp.zeros((n,), bool)), jnp.arange(max_len))
    return toks.T  # (n, max_len)


def generate(
    model: LanguageModel,
    params,
    state,
    key: jax.Array,
    n: int = 20,
    *,
    max_len: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> np.ndarray:
    """Sample ``n`` sequences in parallel: ``tokens (n, max_len) int32``, each padded with 0 after its boundary token.

    Each step reads the prediction at the last position of the context (a window model has only that one); a
    per-position model's context grows from the start token and is cropped to its ``block_size`` once full.
    Deterministic for a given ``key``. ``temperature`` divides the logits; ``top_k`` keeps only the k most likely
    tokens at each step. ``n`` too large to sample at once is a ``ValueError`` with the largest that fits.
    """
    positive_int("n", n)
    positive_int("max_len", max_len)
    check_sampling(model, temperature, top_k)
    memory.check_sampling_fits(model, n)  # before anything is allocated: a clear error, not RESOURCE_EXHAUSTED
    return np.asarray(_generate(model, params, state, key, n, max_len, jnp.float32(temperature), top_k))


def sample_words(model: LanguageModel, params, state, vocab, key, n: int = 20, **kwargs) -> list[str]:
    """``n`` generated words, decoded with ``vocab`` (each stops at its boundary token)."""
    return [vocab.decode(row) for row in generate(model, params, state, key, n, **kwargs)]


# ----------------------------------------------------------------------------------------------------------------------
# Continuing a text


def filter_logits(logits, temperature, top_k: int | None, top_p):
    """``logits (B, V)`` for sampling: divided by ``temperature``, then only the ``top_k`` most likely tokens kept
    (``None``: all), then only the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus
    sampling; 1: all; the most likely token always stays). Dropped tokens get ``-inf``."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)  # (B, V), most likely first
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # the probability of the tokens ranked above each
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("model", "n_new", "top_k", "cached", "with_logits"))
def _continue(model, params, state, window, length, key, n_new, temperature, top_k, top_p, cached, with_logits):
    T = model.block_size
    keys = jax.random.split(key, n_new)
    B = window.shape[0]

    def last_logits(logits, length):
        return jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)  # (B, V)

    def put(window, length, tok):
        return jax.lax.dynamic_update_slice(window, tok[:, None], (jnp.int32(0), length))

    if not cached:  # the whole window again for every token; a full window slides by one (nanoGPT's crop)
        def body(carry, k):
            window, length = carry
            logits = last_logits(model.apply(params, state, window, train=False)[0], length)
            tok = jax.random.categorical(k, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)
            full = length == T
            window = jnp.where(full, jnp.roll(window, -1, axis=1), window)
            length = jnp.where(full, T - 1, length)
            return (put(window, length, tok), length + 1), (tok, logits if with_logits else jnp.zeros((B, 0)))

        _, (toks, logits) = jax.lax.scan(body, (window, length), keys)
        return toks.T, logits

    def prefill(window):
        logits, cache = model.prefill_fn(model.cfg, params, window)
        return logits, cache

    logits, cache = prefill(window)
    first = last_logits(logits, length)

    def refill(window_cache):  # the last T // 2 tokens become positions 0 .. T // 2 - 1, encoded in one forward
        window, _ = window_cache
        window = jnp.roll(window, -(T - T // 2), axis=1)
        return window, prefill(window)[1]

    def body(carry, k):
        window, length, cache, logits = carry
        tok = jax.random.categorical(k, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)
        full = length == T
        window, cache = jax.lax.cond(full, refill, lambda wc: wc, (window, cache))
        length = jnp.where(full, T // 2, length)
        new_logits, cache = model.decode_fn(model.cfg, params, cache, tok, length)
        return (put(window, length, tok), length + 1, cache, new_logits), \
            (tok, logits if with_logits else jnp.zeros((B, 0)))

    _, (toks, logits) = jax.lax.scan(body, (window, length, cache, first), keys)
    return toks.T, logits


def continue_text(model: LanguageModel, params, state, prompt, n_new: int, key, *, n: int = 1,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0, cache: bool | None = None,
                  with_logits: bool = False):
    """``n`` continuations of the token ids ``prompt``, ``n_new`` tokens each: ``tokens (n, n_new) int32`` (and,
    ``with_logits``, the logits each token was drawn from, ``(n_new, n, V)``). Deterministic for a given ``key``.

    ``cache`` (default: when the model has one, a GPT's): incremental decoding — the prompt is read in one forward,
    then each token runs the blocks once over its one position, reading and appending the cached keys and values
    (:func:`jnnex.models.gpt.decode`). Past ``block_size`` the context slides by halves: once the buffer is full, its
    last ``T // 2`` tokens are encoded again at positions ``0 .. T/2 - 1`` (one forward) and decoding goes on, so
    every token is drawn from between ``T/2`` and ``T`` tokens of context, for one forward per ``T/2`` tokens (a
    learned position table cannot slide a cache by one). Without a cache each token re-runs the whole window, which
    slides by one (the last ``T`` tokens, nanoGPT's crop). Only the prompt's last ``T`` tokens are read.
    """
    if not model.per_position:
        raise ValueError(f"model {model.name!r} predicts one token from a window; continuing a text needs a "
                         "per-position model")
    positive_int("n", n)
    positive_int("n_new", n_new)
    check_sampling(model, temperature, top_k)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    prompt = [int(i) for i in prompt][-model.block_size:]
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token to continue")
    if not all(0 <= i < model.vocab_size for i in prompt):
        raise ValueError(f"the prompt has token ids outside the vocabulary [0, {model.vocab_size})")
    if cache is None:
        cache = model.decode_fn is not None
    if cache and model.decode_fn is None:
        raise ValueError(f"model {model.name!r} has no KV cache; sample without one")
    memory.check_sampling_fits(model, n)
    window = np.zeros((n, model.block_size), np.int32)
    window[:, : len(prompt)] = prompt
    toks, logits = _continue(model, params, state, jnp.asarray(window), jnp.int32(len(prompt)), key, n_new,
                             jnp.float32(temperature), top_k, jnp.float32(top_p), bool(cache), bool(with_logits))
    return (np.asarray(toks), np.asarray(logits)) if with_logits else np.asarray(toks)


def grouped_config(cfg, groups: int):
    """The model config each of ``groups`` row groups runs under a scheme that trains :func:`grouped_objective`: a
    mixture of experts' balancing-loss weight divided by ``groups`` (the groups' losses averaged when their
    gradients are summed); a config without experts unchanged."""
    if getattr(cfg, "n_expert", None) is None:
        return cfg
    return dataclasses.replace(cfg, aux_weight=cfg.aux_weight / groups)


def grouped_objective(model: LanguageModel, params, state, x, y, groups: int):
    """The objective a scheme that runs the model on ``groups`` row groups of the batch trains — a pipeline's data
    shards × micro-batches, tensor parallelism's data shards — on one device: the batch's mean cross-entropy, with
    each group of rows (contiguous, in order) run through the model on its own (so that a mixture of experts routes,
    fills its capacity and counts its balancing loss per group), plus the groups' auxiliary losses averaged. Without
    an auxiliary loss or a capacity it is the model's own objective."""
    B = x.shape[0]
    if B % groups:
        raise ValueError(f"grouped_objective: the groups ({groups}) must divide the batch's rows ({B})")
    xs, ys = x.reshape(groups, B // groups, -1), y.reshape(groups, B // groups, -1)
    total = (y >= 0).sum()
    loss = 0.0
    for g in range(groups):
        out = model.forward(params, state, xs[g], train=True, key=None)
        ce = cross_entropy_forward(out.logits, ys[g])[0]
        loss = loss + ce * ((ys[g] >= 0).sum() / total).astype(ce.dtype) + out.aux / groups
    return loss
