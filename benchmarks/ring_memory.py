"""Ring attention's memory per device against plain attention on one device, forward + backward, float32: XLA's
temporaries of each compiled program, batch 1 × 4 heads of 64, T = 1,024 … 16,384, the ring over 4 forced CPU
devices, each received chunk folded whole (``Tc × Tc`` scores a step) and in key tiles of 128 (``Tc × 128``).
Writes benchmarks/results/ring_memory.json and prints a markdown table. `.venv/bin/python benchmarks/ring_memory.py`."""
import json
import os
from pathlib import Path

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")  # before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jnnex.models.gpt as G  # noqa: E402
import jnnex.models.ring as R  # noqa: E402

N, B, NH, HS = 4, 1, 4, 64
mesh = jax.sharding.Mesh(np.array(jax.devices()[:N]), ("seq",))
spec = P(None, None, "seq", None)


TILE = 128


def ring(q, k, v, dy, tile=None):
    y, cache = R.ring_attention_forward(q, k, v, "seq", tile)
    return (y, *R.ring_attention_backward(dy, cache))


def plain(q, k, v, dy):
    y, cache = G.attend_forward(q, k, v)
    return (y, *G.attend_backward(G.merge_heads(dy), cache))


rows = []
for T in (1024, 2048, 4096, 8192, 16384):
    shape = jax.ShapeDtypeStruct((B, NH, T, HS), jnp.float32)
    one = jax.jit(plain).lower(shape, shape, shape, shape).compile().memory_analysis().temp_size_in_bytes
    sharded = jax.ShapeDtypeStruct((B, NH, T, HS), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, spec))
    per = {}
    for name, tile in (("whole", None), ("tiled", TILE)):
        f = jax.shard_map(lambda q, k, v, dy, tile=tile: ring(q, k, v, dy, tile), mesh=mesh, in_specs=(spec,) * 4,
                          out_specs=(spec,) * 4)
        per[name] = jax.jit(f).lower(sharded, sharded, sharded, sharded).compile().memory_analysis().temp_size_in_bytes
    rows.append({"T": T, "plain_one_device_MiB": one / 2**20, "ring_per_device_MiB": per["whole"] / 2**20,
                 "ratio": per["whole"] / one, "ring_tiled_per_device_MiB": per["tiled"] / 2**20,
                 "tiled_ratio": per["tiled"] / one})
print(f"| T | plain, one device (MiB) | ring, per device of {N} (MiB) | ÷ plain | ring in key tiles of {TILE} (MiB) "
      "| ÷ plain |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['T']:,} | {r['plain_one_device_MiB']:.1f} | {r['ring_per_device_MiB']:.1f} | {r['ratio']:.3f} | "
          f"{r['ring_tiled_per_device_MiB']:.1f} | {r['tiled_ratio']:.4f} |")
out = Path(__file__).parent / "results" / "ring_memory.json"
out.write_text(json.dumps({"rows": rows, "devices": N, "batch": B, "heads": NH, "head_size": HS, "tile": TILE},
                          indent=1))
