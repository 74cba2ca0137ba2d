"""Optimisation settings and the optimisers, each one function of the settings to an optax
``GradientTransformation`` (optax's ``(init, update)`` pair).

* :class:`TrainConfig` — every optimisation setting a run records (steps, batch, the learning rate and its schedule,
  the optimiser and its hyperparameters, clipping, evaluation and checkpoint cadence, the seed);
* :func:`lr_schedule` — the learning rate at each step, the one definition the step and the log both read;
* :data:`OPTIMIZERS` — ``name -> (tcfg -> optax.GradientTransformation)``: :func:`sgd`, :func:`momentum`,
  :func:`adam`, :func:`adamw`, :func:`muon`; :func:`make_optimizer` picks one and adds clipping. A new optimiser is one
  function here and one entry in the table;
* :func:`state_shapes` — an optimiser's state by shape, which the memory plan and the fit check read.

The training loop (:mod:`jnnex.train`) and the model registry both import this module; it imports no model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from jnnex.layers import Linear
from jnnex.settings import check_choice, positive_int, setting


# ----------------------------------------------------------------------------------------------------------------------
# The optimisers: one function each, of the settings (TrainConfig, below) to an optax transformation


def sgd(tcfg: TrainConfig) -> optax.GradientTransformation:
    """Plain SGD on :func:`lr_schedule` (the lectures')."""
    return optax.sgd(lr_schedule(tcfg))


def momentum(tcfg: TrainConfig) -> optax.GradientTransformation:
    """SGD with momentum ``sgd_momentum``."""
    return optax.sgd(lr_schedule(tcfg), momentum=tcfg.sgd_momentum)


def adam(tcfg: TrainConfig) -> optax.GradientTransformation:
    """Adam with ``betas`` and ``adam_eps``."""
    b1, b2 = tcfg.betas
    return optax.adam(lr_schedule(tcfg), b1=b1, b2=b2, eps=tcfg.adam_eps)


def adamw(tcfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW: Adam plus decoupled weight decay ``weight_decay`` on the parameters ``decay_mask`` names."""
    b1, b2 = tcfg.betas
    mask = matrices_only if tcfg.decay_mask == "matrices" else None
    return optax.adamw(lr_schedule(tcfg), b1=b1, b2=b2, eps=tcfg.adam_eps, weight_decay=tcfg.weight_decay, mask=mask)


def muon(tcfg: TrainConfig) -> optax.GradientTransformation:
    """``optax.contrib.muon`` (momentum ``muon_beta``, Nesterov, five Newton–Schulz steps) on the matrices
    :func:`muon_labels` names, :func:`adamw` exactly as ``optimizer="adamw"`` on the rest, one learning rate and
    schedule for both: the update of each matrix is scaled to AdamW's typical size (``consistent_rms=0.2``, "Muon is
    Scalable", Liu et al. 2025), so ``lr`` and ``weight_decay`` carry over from an AdamW run unchanged."""
    matrices = optax.contrib.muon(lr_schedule(tcfg), beta=tcfg.muon_beta, weight_decay=tcfg.weight_decay,
                                  consistent_rms=0.2)
    return optax.partition({"muon": matrices, "adamw": adamw(tcfg)}, muon_labels)


OPTIMIZERS = {"sgd": sgd, "momentum": momentum, "adam": adam, "adamw": adamw, "muon": muon}  # name -> tcfg -> optax
OPTIMIZER_NAMES = tuple(OPTIMIZERS)  # the --optimizer flag's choices
DECAY_MASKS = ("all", "matrices")
SCHEDULES = ("steps", "cosine")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults are the makemore MLP lecture's (SGD, 0.1, then 0.01 from half of the steps:
    step 100,000 of 200,000)."""

    steps: int = setting(200_000, "total optimisation steps")
    batch_size: int | None = setting(32, "minibatch size (none: the whole training set every step)", none=None)
    lr: float = setting(0.1, "initial learning rate")
    lr_boundaries: tuple[int, ...] | None = setting(None, "steps at which the learning rate is multiplied by "
                                                          "lr_factor (default: half of steps, the lecture's 100,000 of "
                                                          "200,000; none: never)", none=())
    lr_factor: float = setting(0.1, "the learning rate's factor at each boundary")
    schedule: str = setting("steps", "learning-rate schedule: steps (x lr_factor at each of lr_boundaries) or cosine "
                                     "(linear warmup, then a cosine from lr to min_lr: nanoGPT's)", choices=SCHEDULES)
    warmup: int = setting(0, "cosine: steps of linear warmup to lr")
    min_lr: float = setting(0.0, "cosine: the rate the cosine ends at")
    lr_decay_steps: int | None = setting(None, "cosine: the step the cosine ends at, min_lr after it (default: steps)")
    optimizer: str = setting("sgd", "optax optimiser; muon: Muon for the linear layers' weight matrices, adamw (with "
                                    "these betas, weight decay and mask) for the rest", choices=OPTIMIZER_NAMES)
    sgd_momentum: float = setting(0.9, "momentum: the momentum coefficient")
    betas: tuple[float, ...] = setting((0.9, 0.999), "adam, adamw: (b1, b2), the moment decay rates")
    adam_eps: float = setting(1e-8, "adam, adamw: epsilon added to the second moment's root")
    weight_decay: float = setting(0.0, "adamw: decoupled weight decay")
    decay_mask: str = setting("all", "adamw: which parameters decay: all (makemore) or matrices (>= 2-D only, "
                                     "nanoGPT's; biases, gains and shifts are not decayed)", choices=DECAY_MASKS)
    muon_beta: float = setting(0.95, "muon: the momentum of the matrices' updates (modded-nanogpt's 0.95)")
    grad_clip: float | None = setting(None, "clip gradients to this global norm before the update (none: off)",
                                      none=None)
    eval_every: int = setting(20_000, "evaluate train/dev loss (and checkpoint) every this many steps, and at the end")
    eval_iters: int = setting(20, "text streams: random batches averaged in the loss estimate (nanoGPT's eval_iters)")
    chunk: int = setting(1_000, "steps per compiled call; checkpoints fall on multiples of it")
    save_seconds: float = setting(60.0, "a run directory's checkpoint is also written at the end of the first chunk "
                                        "this many seconds after the last one (0: every chunk): a kill loses at most "
                                        "this and a chunk")
    seed: int = setting(0, "seed of initialisation and minibatches")

    def __post_init__(self):
        for name in ("steps", "eval_every", "chunk", "eval_iters"):
            positive_int(name, getattr(self, name))
        check_choice("schedule", self.schedule, SCHEDULES)
        positive_int("warmup", self.warmup, minimum=0)
        if self.lr_decay_steps is not None:
            positive_int("lr_decay_steps", self.lr_decay_steps)
        if self.schedule == "cosine" and not self.warmup < self.decay_steps:
            raise ValueError(f"warmup ({self.warmup}) must be shorter than the cosine's {self.decay_steps} steps")
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        positive_int("seed", self.seed, minimum=0)
        for name in ("lr", "adam_eps"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (isinstance(self.min_lr, int | float) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr must be in [0, lr] = [0, {self.lr}], got {self.min_lr!r}")
        check_choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        check_choice("decay_mask", self.decay_mask, DECAY_MASKS)
        if self.lr_boundaries is not None and sorted(self.lr_boundaries) != list(self.lr_boundaries):
            raise ValueError(f"lr_boundaries must be increasing, got {self.lr_boundaries}")
        if self.lr_boundaries and not 0 <= self.lr_boundaries[0] <= self.lr_boundaries[-1] < self.steps:
            raise ValueError(f"lr_boundaries {self.lr_boundaries} must lie in [0, steps) = [0, {self.steps}): a "
                             f"boundary at or past the end never takes effect (TrainConfig.with_steps({self.steps}) "
                             "fits a schedule written for another length to this one)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("sgd_momentum", "muon_beta"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not (isinstance(self.save_seconds, int | float) and 0 <= self.save_seconds < math.inf):
            raise ValueError(f"save_seconds must be a number >= 0, got {self.save_seconds!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be None or > 0, got {self.grad_clip!r}")

    @property
    def decay_steps(self) -> int:
        """The step a cosine schedule ends at: ``lr_decay_steps``, or ``steps``."""
        return self.steps if self.lr_decay_steps is None else self.lr_decay_steps

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The learning-rate boundaries in force: ``lr_boundaries``, or half of ``steps`` when it is ``None``."""
        return (self.steps // 2,) if self.lr_boundaries is None else self.lr_boundaries

    def with_steps(self, steps: int) -> TrainConfig:
        """These settings for a run of ``steps`` steps: explicit learning-rate boundaries keep their fraction of the
        run (WaveNet's 150,000 of 200,000 becomes 15,000 of 20,000; the default, ``None``, is half of any run
        already), and so does a cosine's ``lr_decay_steps`` when set; ``eval_every`` is at most the run and
        ``warmup`` shorter than the cosine. What ``jnnex train --steps`` does to a model's settings.

        >>> TrainConfig(steps=200_000, lr_boundaries=(150_000,)).with_steps(20_000).lr_boundaries
        (15000,)
        """
        positive_int("steps", steps)
        boundaries = None if self.lr_boundaries is None else tuple(b * steps // self.steps for b in self.lr_boundaries)
        decay = None if self.lr_decay_steps is None else self.lr_decay_steps * steps // self.steps
        return dataclasses.replace(self, steps=steps, lr_boundaries=boundaries, eval_every=min(self.eval_every, steps),
                                   lr_decay_steps=decay, warmup=min(self.warmup, (decay or steps) - 1))

    def continued(self, steps: int) -> TrainConfig:
        """These settings continued to ``steps`` steps (more than before): the learning-rate boundaries stay at the
        steps where they were (the default, half of the old run, is written out), so the steps already taken keep
        their schedule and the added ones run at the rate in force at the old end."""
        if not (isinstance(steps, int) and steps > self.steps):
            raise ValueError(f"steps: a run of {self.steps:,} steps can be continued to more steps, not to {steps!r}")
        return dataclasses.replace(self, steps=steps, lr_boundaries=self.boundaries, lr_decay_steps=self.decay_steps)


def lr_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """The learning rate at each step; the one definition of it: the step uses it, and so does the log
    (``float(lr_schedule(tcfg)(step))``).

    ``steps``: piecewise-constant, ``lr`` until the first boundary, × ``lr_factor`` from each (the lecture's 0.1 →
    0.01); the same values as ``optax.piecewise_constant_schedule``, written without its int/float mixing so it also
    runs under strict dtype promotion; the result is weakly typed and follows the parameters' dtype.

    ``cosine``: ``optax.warmup_cosine_decay_schedule`` — from ``lr / (warmup + 1)`` linearly to ``lr`` at step
    ``warmup``, then half a cosine down to ``min_lr`` at ``decay_steps``, ``min_lr`` after (nanoGPT's ``get_lr``, whose
    first step is also ``lr / (warmup + 1)``).
    """
    if tcfg.schedule == "cosine":
        cosine = optax.warmup_cosine_decay_schedule(init_value=tcfg.lr / (tcfg.warmup + 1), peak_value=tcfg.lr,
                                                    warmup_steps=tcfg.warmup, decay_steps=tcfg.decay_steps,
                                                    end_value=tcfg.min_lr)

        def schedule(count):
            with jax.numpy_dtype_promotion("standard"):  # (optax mixes the integer count with float constants)
                return cosine(count)

        return schedule

    def schedule(count):
        lr = tcfg.lr
        for boundary in tcfg.boundaries:
            lr = lr * jnp.where(count >= boundary, tcfg.lr_factor, 1.0)
        return lr

    return schedule


def matrices_only(params):
    """The weight-decay mask of ``decay_mask="matrices"``: True for parameters of 2 or more dimensions."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def muon_labels(params):
    """Which optimiser trains each parameter under ``optimizer="muon"`` (modded-nanogpt's split): ``"muon"`` for the
    weight matrix of every linear layer (:class:`jnnex.layers.Linear`), ``"adamw"`` for the rest — embedding tables,
    the output head (a bare matrix in the GPT and the Llama), gains, biases. The rule is by layer kind, not by name
    or shape: an embedding table is a matrix too, but a lookup, not a map Muon's orthogonalised step is made for.

    >>> import jax.numpy as jnp
    >>> muon_labels({"wte": jnp.zeros((5, 4)), "fc": Linear(jnp.zeros((4, 8)), jnp.zeros(8))})
    {'fc': Linear(W='muon', b='adamw'), 'wte': 'adamw'}
    """
    def label(node):
        if isinstance(node, Linear):
            return Linear("muon", None if node.b is None else "adamw")
        return "adamw"

    return jax.tree.map(label, params, is_leaf=lambda node: isinstance(node, Linear))


def check_optimizer(tcfg: TrainConfig, model) -> None:
    """A clear error for an optimiser ``model`` (a :class:`jnnex.lm.LanguageModel`) cannot take: Muon for a model
    without linear layers."""
    if tcfg.optimizer != "muon":
        return
    params, _ = jax.eval_shape(model.init, jax.random.key(0))
    if "muon" not in jax.tree.leaves(muon_labels(params)):
        raise ValueError(f"optimizer muon: it trains the weight matrices of linear layers (jnnex.layers.Linear), and "
                         f"model {model.name!r} has none; choose adamw")


def make_optimizer(tcfg: TrainConfig, model=None) -> optax.GradientTransformation:
    """The optax optimiser ``tcfg`` names (:data:`OPTIMIZERS`), after global-norm clipping if ``grad_clip`` asks;
    with a ``model`` whose parametrisation scales learning rates per tensor (``lr_scale_fn``: μP's), its updates
    scaled so (:func:`scale_updates`)."""
    opt = OPTIMIZERS[tcfg.optimizer](tcfg)
    opt = opt if tcfg.grad_clip is None else optax.chain(clip_by_global_norm(tcfg.grad_clip), opt)
    if model is None or getattr(model, "lr_scale_fn", None) is None:
        return opt
    if model.lr_scale_fn(model.cfg, jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0))) is None:
        return opt
    return optax.chain(opt, scale_updates(lambda tree: model.lr_scale_fn(model.cfg, tree)))


_SQUARED_NORM = contextvars.ContextVar("jnnex_squared_norm", default=None)


@contextlib.contextmanager
def global_norm_by(squared_norm):
    """Within this block, :func:`clip_by_global_norm` takes its tree's squared norm from ``squared_norm(tree)``: for an
    update traced on a part of the parameters (a pipeline stage's blocks), the squared norm of the whole (its parts
    summed over the devices that hold them)."""
    token = _SQUARED_NORM.set(squared_norm)
    try:
        yield
    finally:
        _SQUARED_NORM.reset(token)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm``, step for step (the same norm, comparison and scaling), but for the norm: inside
    :func:`global_norm_by`, that of the whole parameters where the update sees a part of them."""
    def update(updates, state, params=None):
        squared = _SQUARED_NORM.get()
        g_norm = optax.tree.norm(updates) if squared is None else jnp.sqrt(squared(updates))
        trigger = jnp.squeeze(g_norm < max_norm)
        updates = jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm), updates)
        return updates, state

    return optax.GradientTransformation(optax.init_empty_state, update)


def scale_updates(multipliers) -> optax.GradientTransformation:
    """Each update times its tensor's multiplier (``multipliers(updates)``: a tree of floats like the updates): a
    per-tensor learning rate, weight decay included (AdamW's decay is part of its update). Keeps no state."""
    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        scales = multipliers(updates)
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def state_shapes(optimizer: optax.GradientTransformation, params) -> object:
    """The optimiser's state for ``params`` as ``ShapeDtypeStruct``s (``jax.eval_shape``: nothing allocated): what
    the memory estimates count, read from the optimiser itself (SGD keeps nothing, AdamW two moments, Muon one
    momentum per matrix and two moments for the rest)."""
    def init(params):
        with jax.numpy_dtype_promotion("standard"):  # (optax mixes integer counts with float constants)
            return optimizer.init(params)

    return jax.eval_shape(init, params)
