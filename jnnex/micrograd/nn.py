"""Neurons, layers and MLPs made of scalar :class:`~jnnex.micrograd.engine.Value`\\ s (micrograd's ``nn``), and the
moons demo.

The network is the tensor MLP of :mod:`jnnex.micrograd.tensor_mlp` one number at a time:
``MLP(2, [16, 16, 1], key=...)`` starts from exactly the weights ``tensor_mlp.init(key, [2, 16, 16, 1])`` gives, so
the two can be compared gradient for gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jnnex.layers import Linear
from jnnex.micrograd import tensor_mlp
from jnnex.micrograd.engine import Value, cyclic_gc_paused, zero_grad


class Module:
    def parameters(self) -> list[Value]:
        return []

    def zero_grad(self) -> None:
        zero_grad(self.parameters())


class Neuron(Module):
    """``act(Σ wᵢxᵢ + b)``; linear when ``nonlin`` is False."""

    __slots__ = ("w", "b", "nonlin")

    def __init__(self, w: Sequence[float], b: float, nonlin: bool = True):
        self.w = [Value(wi) for wi in w]
        self.b = Value(b)
        self.nonlin = nonlin

    def __call__(self, x: Sequence[Value | float]) -> Value:
        act = Value.sum([wi * xi for wi, xi in zip(self.w, x)] + [self.b])
        return act.relu() if self.nonlin else act

    def parameters(self) -> list[Value]:
        return self.w + [self.b]

    def __repr__(self) -> str:
        return f"{'ReLU' if self.nonlin else 'Linear'}Neuron({len(self.w)})"


class Layer(Module):
    __slots__ = ("neurons",)

    def __init__(self, W: np.ndarray, b: np.ndarray, nonlin: bool = True):
        """A layer from a weight matrix ``W (nin, nout)`` and biases ``b (nout,)``: neuron j has weights ``W[:, j]``."""
        self.neurons = [Neuron(W[:, j].tolist(), float(b[j]), nonlin) for j in range(W.shape[1])]

    def __call__(self, x):
        out = [n(x) for n in self.neurons]
        return out[0] if len(out) == 1 else out

    def parameters(self) -> list[Value]:
        return [p for n in self.neurons for p in n.parameters()]

    def __repr__(self) -> str:
        return f"Layer[{', '.join(str(n) for n in self.neurons)}]" if len(self.neurons) <= 4 else \
            f"Layer[{len(self.neurons)} × {self.neurons[0]}]"


class MLP(Module):
    """``MLP(nin, [h1, ..., nout], key=...)``: relu on every layer but the last (micrograd's moons network)."""

    __slots__ = ("layers",)

    def __init__(self, nin: int, nouts: Sequence[int], *, key=None, params=None):

        if params is None:
            if key is None:
                raise TypeError("MLP needs key= (a jax.random key) or params= (from jnnex.micrograd.tensor_mlp.init)")
            params = tensor_mlp.init(key, [nin, *nouts])
        params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        self.layers = [Layer(p.W, p.b, nonlin=i < len(params) - 1) for i, p in enumerate(params)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def parameters(self) -> list[Value]:
        return [p for layer in self.layers for p in layer.parameters()]

    def grads_as_params(self):
        """The gradients in the tensor layout of :func:`jnnex.micrograd.tensor_mlp.init` (a tuple of ``Linear(W, b)``)."""

        return tuple(
            Linear(np.array([[n.w[i].grad for n in layer.neurons] for i in range(len(layer.neurons[0].w))]),
                   np.array([n.b.grad for n in layer.neurons]))
            for layer in self.layers
        )

    def __repr__(self) -> str:
        return f"MLP of [{', '.join(str(layer) for layer in self.layers)}]"


def moons_loss(model: MLP, X, y, alpha: float = 1e-4) -> tuple[Value, float]:
    """micrograd's demo loss: ``mean(relu(1 - yᵢ·scoreᵢ)) + alpha · Σ p²``, and the accuracy. ``y`` in {-1, +1}."""
    scores = [model(list(map(float, xi))) for xi in X]
    data_loss = Value.sum((1 - float(yi) * si).relu() for yi, si in zip(y, scores)) * (1.0 / len(scores))
    reg = Value.sum(p * p for p in model.parameters())
    accuracy = sum((float(yi) > 0) == (si.data > 0) for yi, si in zip(y, scores)) / len(scores)
    return data_loss + alpha * reg, accuracy


def train_moons(model: MLP, X, y, steps: int = 100, alpha: float = 1e-4):
    """The demo's loop: full batch, ``lr = 1.0 - 0.9·k/steps``. Returns the per-step losses and accuracies."""
    losses, accs = [], []
    params = model.parameters()
    for k in range(steps):
        with cyclic_gc_paused():  # the graph is freed by reference counting when `loss` is rebound
            loss, acc = moons_loss(model, X, y, alpha)
            loss.backward()  # sets every gradient of this graph (no zero_grad needed, see Value.backward)
        lr = 1.0 - 0.9 * k / steps
        for p in params:
            p.data -= lr * p.grad
        losses.append(loss.data)
        accs.append(acc)
    return losses, accs


ENGINES = ("scalar", "tensor", "autodiff")


def moons_demo(engine: str = "tensor", steps: int = 100, seed: int = 0) -> dict:
    """micrograd's demo, on one of three engines: 100 points, noise 0.1, MLP(2, [16, 16, 1]), hinge + 1e-4 L2,
    lr 1.0 - 0.9 k/steps — the ``scalar`` :class:`Value` engine, the ``tensor`` MLP's hand-written backward, or
    ``autodiff`` (``jax.grad``), from the same initial weights. Returns the final loss and accuracy (``jnnex moons``)."""
    import time

    import jax.numpy as jnp

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"--steps must be >= 1, got {steps}")
    X, y, params = tensor_mlp.moons_problem(seed)
    t0 = time.perf_counter()
    if engine == "scalar":
        model = MLP(2, list(tensor_mlp.MOONS_SIZES[1:]), params=params)
        train_moons(model, X, y, steps=steps)
        loss, acc = moons_loss(model, X, y)
        loss = loss.data
    else:
        x, yj = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)
        trained, _, _ = tensor_mlp.train_moons(params, x, yj, steps=steps,
                                               engine="manual" if engine == "tensor" else "autodiff")
        loss, acc = float(tensor_mlp.loss_fn(trained, x, yj)), float(tensor_mlp.accuracy(trained, x, yj))
    return {"model": "moons-mlp", "engine": engine, "steps": steps, "seed": seed, "loss": float(loss),
            "accuracy": float(acc), "seconds": round(time.perf_counter() - t0, 3)}
