"""Ring attention (:mod:`jnnex.models.ring`) on 4 CPU devices: each device its striped chunk of the sequence, the
key/value chunks passed round the ring; the output and every gradient equal plain causal attention on one device
(``jnnex.models.gpt.attend_forward/backward``) per tensor, float64 and float32; the communication is ppermutes only,
counted in the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jnnex.models.gpt as G
import jnnex.models.ring as R

N = 4  # the suite's processes have 4 CPU devices (conftest.py)


def problem(B=2, nh=2, T=16, hs=4, dtype=jnp.float64):
    rng = np.random.default_rng(0)
    q, k, v, dy = (jnp.asarray(rng.standard_normal((B, nh, T, hs)) * s, dtype) for s in (1.0, 1.0, 1.0, 1.0))
    return q, k, v, dy


def ring_step(mesh, tile=None):
    """Forward and backward under shard_map, on striped chunks (each folded in key tiles of ``tile``)."""
    spec = P(None, None, "seq", None)

    def local(q, k, v, dy):
        y, cache = R.ring_attention_forward(q, k, v, "seq", tile)
        return (y, *R.ring_attention_backward(dy, cache))

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 4))


@pytest.mark.parametrize("tile", [None, 1, 2])  # a chunk of 4 positions: whole, or in key tiles of 1 and 2
@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)], ids=["float64", "float32"])
def test_ring_attention_equals_plain_attention_per_tensor(dtype, tol, tile):
    with jax.enable_x64(dtype == jnp.float64):
        q, k, v, dy = problem(dtype=dtype)
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:N]), ("seq",))
        y, dq, dk, dv = (R.unstripe(a, N) for a in ring_step(mesh, tile)(*(R.stripe(a, N) for a in (q, k, v, dy))))
        want_y, cache = G.attend_forward(q, k, v)
        want = (G.heads(want_y, q.shape[1]), *G.attend_backward(G.merge_heads(dy), cache))
        for name, got, ref in zip(("y", "dq", "dk", "dv"), (y, dq, dk, dv), want):
            rel = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
            assert rel < tol, (name, rel)


def test_the_ring_passes_chunks_and_nothing_else():
    """The compiled step's collectives: collective-permutes (the forward's n − 1 passes of K and V, the backward's n
    of K, V and their gradients) and no all-gather or all-reduce — no device ever holds the whole sequence."""
    q, k, v, dy = problem()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:N]), ("seq",))
    with jax.enable_x64(True):
        text = ring_step(mesh).lower(*(R.stripe(a, N) for a in (q, k, v, dy))).compile().as_text()
    assert "collective-permute" in text
    assert "all-gather" not in text and "all-reduce" not in text


def test_stripe_puts_every_nth_position_on_a_device_and_unstripe_undoes_it():
    x = jnp.arange(12.0).reshape(1, 1, 12, 1)
    s = R.stripe(x, 4)
    assert s[0, 0, :, 0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert (R.unstripe(s, 4) == x).all()
    with pytest.raises(ValueError, match=r"the sequence \(10 positions\) must divide by the ring's 4 devices"):
        R.stripe(jnp.zeros((1, 1, 10, 1)), 4)


def test_a_tile_that_does_not_divide_the_chunk_is_named():
    q, k, v, dy = problem()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:N]), ("seq",))
    with pytest.raises(ValueError, match=r"the key tile \(3\) must be an integer >= 1 that divides a device's chunk "
                                         r"of 4 positions"):
        ring_step(mesh, 3)(*(R.stripe(a, N) for a in (q, k, v, dy)))
