"""One training step on 1 device and on 4, every registered model, both gradients (float64, batch 8 of census-first):
the largest difference, as a markdown table. `JAX_NUM_CPU_DEVICES=4 .venv/bin/python benchmarks/dp_equality.py`."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")  # before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from jnnex import parallel  # noqa: E402
from jnnex.check import randomise  # noqa: E402
from jnnex.data import Vocab, load_words, make_splits  # noqa: E402
from jnnex.models.registry import REGISTRY, build_for_words  # noqa: E402

words = load_words("census-first")
vocab = Vocab.from_words(words)
mesh = parallel.data_mesh(4)
rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
print("| model | gradients | loss rel diff | largest per-tensor rel diff | largest abs diff |")
print("|---|---|---|---|---|")
for name, spec in REGISTRY.items():
    if spec.fit_fn is not None:
        continue
    model = build_for_words(spec, words, vocab)
    for g in ("autodiff", "manual"):
        if g == "manual" and model.backward_fn is None:
            continue
        m = model.with_gradients(g)
        params, state = m.init(jax.random.key(0))
        params = randomise(params, jax.random.key(1), jnp.float64)
        state = jax.tree.map(lambda s: s.astype(jnp.float64), state)
        sp = make_splits(words, m.block_size, vocab=vocab, per_position=m.per_position)
        x, y = (jnp.asarray(a[:8]) for a in sp.train)
        key = jax.random.key(3)
        step = jax.jit(m.value_and_grad)
        l1, g1, _ = step(params, state, x, y, key)
        l4, g4, _ = step(jax.device_put(params, rep), jax.device_put(state, rep), jax.device_put(x, shard),
                         jax.device_put(y, shard), jax.device_put(key, rep))
        a, b = [np.asarray(t) for t in jax.tree.leaves(g4)], [np.asarray(t) for t in jax.tree.leaves(g1)]
        floor = 1e-3 * max(float(np.abs(t).max()) for t in b)
        rel = max(float(np.abs(p - q).max()) / max(float(np.abs(q).max()), floor) for p, q in zip(a, b))
        absd = max(float(np.abs(p - q).max()) for p, q in zip(a, b))
        print(f"| {name} | {g} | {abs(float(l4 - l1)) / abs(float(l1)):.1e} | {rel:.1e} | {absd:.1e} |", flush=True)
