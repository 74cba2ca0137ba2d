"""Initialisation (:mod:`jnnex.init`): one draw of all normals equals jax.random.normal draw for draw; Kaiming's
standard deviation and gains."""

import os
import subprocess
import sys

import jax
import pytest

from jnnex.init import GAINS, gain, kaiming_normal

DRAW_FOR_DRAW = """
import jax, jax.numpy as jnp, numpy as np
from jnnex.init import normals
keys = jax.random.split(jax.random.key(7), 4)
shapes = [(30, 200), (200,), (27, 10), (1,)]
got = jax.jit(lambda ks: normals(list(zip(ks, shapes))))(keys)
for k, shape, g in zip(keys, shapes, got):
    assert g.shape == shape and g.dtype == jnp.float32
    np.testing.assert_array_equal(g, jax.random.normal(k, shape, jnp.float32))
assert normals([]) == []
print("draw for draw")
"""


def test_normals_are_jax_random_normal_draw_for_draw():
    """One vectorised draw holds exactly the numbers of a separate jax.random.normal per (key, shape): what keeps
    every model's init cheap to compile relies on it (partitionable threefry: values depend on key and flat index).
    Checked in a process that compiles as a user's does: under the suite's compile settings (conftest: XLA's costlier
    passes and its CPU fusion emitters both off; either alone keeps the bits) the two programs' uniform-to-normal
    transforms differ in the last bits (8e-7 at most, seen)."""
    proc = subprocess.run([sys.executable, "-c", DRAW_FOR_DRAW], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert proc.returncode == 0 and proc.stdout.strip() == "draw for draw", proc.stderr


def test_kaiming_normal_std_and_gains():
    W = kaiming_normal(jax.random.key(0), 400, 300, "tanh")
    assert W.shape == (400, 300)
    assert float(W.std()) == pytest.approx(GAINS["tanh"] / 20.0, rel=0.02)
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        gain("sigmoid")
