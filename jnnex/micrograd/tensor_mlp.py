"""The feed-forward MLP as whole tensors, with a hand-written backward (the tensor half of "backprop from first
principles").

``init(key, sizes, activation)`` / ``apply(params, x)`` are the forward; :func:`backward` walks the same layers in
reverse, calling each layer's hand-written backward (relu and the moons losses here, linear, tanh and the
cross-entropy from :mod:`jnnex.layers`), and returns gradients with the structure of ``params``. The moons recipe
is micrograd's demo: ``MLP(2, [16, 16, 1])`` with relu, max-margin (hinge) loss plus ``alpha · Σ p²`` (α = 1e-4), 100 SGD steps with ``lr = 1.0 - 0.9·k/100``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
import jax
import jax.numpy as jnp
import optax

from jnnex import layers
from jnnex.data import make_moons
from jnnex.layers import Linear, check_shape

# ----------------------------------------------------------------------------------------------------------------------
# This stage's own pairs: relu, and the losses of the moons demo


def relu_forward(x):
    y = jnp.maximum(x, 0)
    return y, y


def relu_backward(dy, y):
    """``dx = dy · [y > 0]`` (the subgradient 0 at 0, as PyTorch and micrograd)."""
    check_shape("relu_backward: dy", dy, y.shape)
    return jnp.where(y > 0, dy, jnp.zeros_like(dy))


PAIRS = {"relu": layers.Pair(relu_forward, relu_backward, ("x",))}  # this stage's own (the losses: through the net)


def hinge_forward(scores, y):
    """Max-margin loss ``mean(relu(1 - y·s))`` of micrograd's moons demo. ``scores (B,), y (B,) in {-1, +1}``."""
    if scores.ndim != 1 or y.shape != scores.shape:
        raise ValueError(f"hinge: expected scores (B,) and y (B,), got {scores.shape} and {y.shape}")
    margins = 1.0 - y * scores  # (B,)
    return jnp.maximum(margins, 0).mean(), (margins, y)


def hinge_backward(dloss, cache):
    """``dscores = -dloss · y · [1 - y·s > 0] / B``."""
    margins, y = cache
    check_shape("hinge_backward: dloss", jnp.asarray(dloss), ())
    return jnp.where(margins > 0, -y, jnp.zeros_like(y)) * (dloss / margins.shape[0]), None


def mse_forward(pred, target):
    """``mean((pred - target)²)`` over every element."""
    if pred.shape != target.shape:
        raise ValueError(f"mse: pred {pred.shape} and target {target.shape} must have the same shape")
    diff = pred - target
    return jnp.mean(diff * diff), diff


def mse_backward(dloss, diff):
    """``dpred = dloss · 2 (pred - target) / N``, ``dtarget = -dpred``."""
    check_shape("mse_backward: dloss", jnp.asarray(dloss), ())
    dpred = diff * (2.0 * dloss / diff.size)
    return dpred, -dpred


ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "tanh": (layers.tanh_forward, layers.tanh_backward),
}
LOSSES = {
    "hinge": (hinge_forward, hinge_backward),
    "mse": (mse_forward, mse_backward),
    "cross_entropy": (layers.cross_entropy_forward, layers.cross_entropy_backward),
}


def init(key, sizes: Sequence[int], dtype=jnp.float32) -> tuple[Linear, ...]:
    """micrograd's init: ``W ~ U(-1, 1)``, ``b = 0``, for layers ``sizes[0] -> sizes[1] -> …``."""
    sizes = list(sizes)
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be at least two integers >= 1 (inputs, ..., outputs), got {sizes}")
    keys = jax.random.split(key, len(sizes) - 1)
    return tuple(
        Linear(jax.random.uniform(k, (nin, nout), dtype, -1.0, 1.0), jnp.zeros((nout,), dtype))
        for k, nin, nout in zip(keys, sizes[:-1], sizes[1:])
    )


def _activation(activation: str):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def forward(params: Sequence[Linear], x, activation: str = "relu"):
    """``out (B, Cout)`` and the caches: linear → activation on every layer but the last, which stays linear."""
    act_forward, _ = _activation(activation)
    caches = []
    for i, layer in enumerate(params):
        x, c_lin = layers.linear_forward(x, layer.W, layer.b)  # (B, C_i+1)
        c_act = None
        if i < len(params) - 1:
            x, c_act = act_forward(x)
        caches.append((c_lin, c_act))
    return x, caches


def apply(params: Sequence[Linear], x, activation: str = "relu"):
    return forward(params, x, activation)[0]


def backward(dout, caches, activation: str = "relu") -> tuple[Linear, ...]:
    """The layer backwards in reverse order of the forward: ``grads`` with the structure of ``params``."""
    _, act_backward = _activation(activation)
    grads = []
    for c_lin, c_act in reversed(caches):
        if c_act is not None:
            dout = act_backward(dout, c_act)
        dout, dW, db = layers.linear_backward(dout, c_lin)
        grads.append(Linear(dW, db))
    return tuple(reversed(grads))


def value_and_grad_manual(params, x, y, *, loss: str = "hinge", alpha: float = 1e-4, activation: str = "relu"):
    """``(total_loss, data_loss, grads)`` of ``loss(out, y) + alpha · Σ p²`` by the hand-written backward.

    For ``hinge`` the network has one output and ``y`` is in {-1, +1}; for ``cross_entropy`` ``y`` holds class ids.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    loss_forward, loss_backward = LOSSES[loss]
    out, caches = forward(params, x, activation)  # (B, Cout)
    pred = out[:, 0] if loss == "hinge" else out
    data_loss, c_loss = loss_forward(pred, y)
    reg = alpha * sum(jnp.sum(p * p) for p in jax.tree.leaves(params))
    dpred = loss_backward(jnp.ones((), out.dtype), c_loss)[0]
    dout = dpred[:, None] if loss == "hinge" else dpred
    grads = backward(dout, caches, activation)
    grads = jax.tree.map(lambda g, p: g + 2.0 * alpha * p, grads, params)  # d(α Σ p²)/dp = 2αp
    return data_loss + reg, data_loss, grads


def loss_fn(params, x, y, *, loss: str = "hinge", alpha: float = 1e-4, activation: str = "relu"):
    """The same objective as :func:`value_and_grad_manual`, for ``jax.grad``."""
    out = apply(params, x, activation)
    pred = out[:, 0] if loss == "hinge" else out
    return LOSSES[loss][0](pred, y)[0] + alpha * sum(jnp.sum(p * p) for p in jax.tree.leaves(params))


def accuracy(params, x, y, activation: str = "relu"):
    """Fraction of points whose score has the sign of ``y`` (hinge labels in {-1, +1})."""
    return jnp.mean((apply(params, x, activation)[:, 0] > 0) == (y > 0))


# ----------------------------------------------------------------------------------------------------------------------
# The moons recipe, on whole tensors


MOONS_SIZES = (2, 16, 16, 1)


def moons_problem(seed: int = 0):
    """micrograd's demo problem: 100 two-moons points with noise 0.1, labels in {-1, +1}, and the initial weights of
    ``MLP(2, [16, 16, 1])``. Returns ``(X (100, 2) float64, y (100,) float64, params)``; ``seed`` draws all three."""
    key = jax.random.key(seed)
    X, y01 = make_moons(100, 0.1, jax.random.fold_in(key, 0))
    return X, 2.0 * y01 - 1.0, init(jax.random.fold_in(key, 1), list(MOONS_SIZES))


def moons_schedule(steps: int = 100):
    """micrograd's ``lr = 1.0 - 0.9·k/steps``."""
    return lambda k: 1.0 - 0.9 * k / steps


def train_moons(params, x, y, *, steps: int = 100, alpha: float = 1e-4, engine: str = "manual"):
    """Full-batch SGD on the moons recipe inside one jitted ``lax.scan``.

    Args:
        params: from :func:`init`; x: (N, 2) points; y: (N,) labels in {-1, +1}.
        engine: ``"manual"`` (the hand-written backward) or ``"autodiff"`` (``jax.grad``).
    Returns:
        ``(params, losses (steps,), accuracies (steps,))`` — loss and accuracy measured before each update.
    """
    if engine not in ("manual", "autodiff"):
        raise ValueError(f"engine must be 'manual' or 'autodiff', got {engine!r}")
    return _train_moons(params, x, y, steps=steps, alpha=alpha, engine=engine)


@functools.partial(jax.jit, static_argnames=("steps", "alpha", "engine"))
def _train_moons(params, x, y, *, steps, alpha, engine):
    optimizer = optax.sgd(moons_schedule(steps))

    def step(carry, _):
        params, opt_state = carry
        if engine == "manual":
            loss, _, grads = value_and_grad_manual(params, x, y, alpha=alpha)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y, alpha=alpha)
        acc = accuracy(params, x, y)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and floats (see jnnex.train)
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, acc)

    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    (params, _), (losses, accs) = jax.lax.scan(step, (params, opt_state), None, length=steps)
    return params, losses, accs
