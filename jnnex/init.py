"""Principled initialisation (He et al. 2015, "Delving deep into rectifiers"; makemore part 3).

A layer ``y = x @ W`` with fan-in ``n`` keeps unit-variance inputs at unit variance when ``W ~ N(0, 1/n)``. A
nonlinearity squashes (tanh) or halves (relu) the signal, so its layer's weights get a ``gain`` to make up for it:
``W ~ N(0, gain² / fan_in)``. The output layer is made *less confident* (weights × 0.1, bias 0) so that the initial
logits are nearly uniform and the initial loss is ≈ ln V instead of a hockey-stick start.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jnnex.layers import Linear

GAINS = {
    "tanh": 5.0 / 3.0,  # tanh's derivative shrinks the signal; 5/3 restores unit variance for unit-variance inputs
    "relu": math.sqrt(2.0),  # relu zeroes half the inputs, halving the variance
    "linear": 1.0,  # nothing to make up for
}
OUTPUT_SCALE = 0.1  # "last layer less confident": near-uniform initial softmax, initial loss ≈ ln V


def gain(nonlinearity: str) -> float:
    if nonlinearity not in GAINS:
        raise ValueError(f"nonlinearity must be one of {sorted(GAINS)}, got {nonlinearity!r}")
    return GAINS[nonlinearity]


def kaiming_scale(fan_in: int, nonlinearity: str = "linear") -> float:
    """The std ``gain / sqrt(fan_in)`` of a Kaiming-initialised weight."""
    return gain(nonlinearity) / math.sqrt(fan_in)


def kaiming_normal(key, fan_in: int, fan_out: int, nonlinearity: str = "linear", dtype=jnp.float32) -> jax.Array:
    """``W (fan_in, fan_out) ~ N(0, gain² / fan_in)`` — PyTorch's ``kaiming_normal_(mode="fan_in")``."""
    return jax.random.normal(key, (fan_in, fan_out), dtype) * kaiming_scale(fan_in, nonlinearity)


def normals(draws, dtype=jnp.float32) -> list[jax.Array]:
    """Standard normals for every ``(key, shape)`` of ``draws``, made by one vectorised draw.

    Why: each distinct shape drawn by ``jax.random.normal`` compiles its own threefry and inverse-error-function
    kernels (0.3–0.5 s each on a 2-core CPU), so a model ``init`` of a handful of shapes took ~1.5–2 s to compile
    for a few thousand numbers. One ``vmap`` over the keys of the longest draw, cut to each length, is one kernel.
    With JAX's partitionable threefry (the default) a draw depends only on its key and each element's flat index,
    so every array holds exactly the numbers of ``jax.random.normal(key, shape)``; once scaled inside a jitted
    ``init`` they may differ from a separately drawn and scaled array in the last bit (XLA fuses the scale into a
    different kernel).
    """
    draws = list(draws)
    sizes = [math.prod(shape) for _, shape in draws]
    if not draws:
        return []
    flat = jax.vmap(lambda k: jax.random.normal(k, (max(sizes),), dtype))(jnp.stack([k for k, _ in draws]))
    return [flat[i, :n].reshape(shape) for i, (n, (_, shape)) in enumerate(zip(sizes, draws))]


def torch_linear(key_w, key_b, fan_in: int, fan_out: int):
    """PyTorch's default ``nn.Linear`` init, which makemore.py's models inherit: weight ``(fan_in, fan_out)`` and bias
    ``(fan_out,)`` both ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, drawn from their own keys."""
    bound = 1.0 / math.sqrt(fan_in)
    return Linear(jax.random.uniform(key_w, (fan_in, fan_out), jnp.float32, -bound, bound),
                  jax.random.uniform(key_b, (fan_out,), jnp.float32, -bound, bound))
