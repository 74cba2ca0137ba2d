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


def kaiming_normal(key, fan_in: int, fan_out: int, nonlinearity: str = "linear", dtype=jnp.float32) -> jax.Array:
    """``W (fan_in, fan_out) ~ N(0, gain² / fan_in)`` — PyTorch's ``kaiming_normal_(mode="fan_in")``."""
    return jax.random.normal(key, (fan_in, fan_out), dtype) * (gain(nonlinearity) / math.sqrt(fan_in))
