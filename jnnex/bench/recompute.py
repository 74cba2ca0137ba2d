"""Activation recomputation (``recompute="blocks"``) against keeping every block's activations, for the GPT and the
Llama on their hand-written backward: what the forward stores for the backward (the caches' bytes, read from
shapes), XLA's temporary memory of the compiled gradient step, and its time — measured side by side in one run, as
a ratio. The gradients are the same bits either way (``tests/test_recompute.py``).

Rows: one per (model, n_layer, policy). ``stored_MiB``: the bytes of the forward's caches (what ``none`` keeps and
``blocks`` replaces by each block's input); ``temp_MiB``: XLA's ``memory_analysis`` temporaries of the jitted
``value_and_grad``; ``ms``: its median time; ``*_ratio``: against ``none`` at the same depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jnnex.bench.harness import interleaved, table
from jnnex.memory import nbytes
from jnnex.models.gpt import GPTConfig, gpt
from jnnex.models.llama import LlamaConfig, llama

BUILD = {"gpt": (gpt, GPTConfig, {}), "llama": (llama, LlamaConfig, {"n_kv_head": 2})}


def measure(name: str, n_layer: int, B: int, T: int, C: int, repeats: int) -> list[dict]:
    build, config, extra = BUILD[name]
    x = jax.random.randint(jax.random.key(1), (B, T), 0, 64, jnp.int32)
    compiled, calls, stored = {}, {}, {}
    for policy in ("none", "blocks"):
        model = build(config(vocab_size=64, block_size=T, n_layer=n_layer, n_head=4, n_embd=C, recompute=policy,
                             **extra)).with_gradients("manual")
        params, state = model.init(jax.random.key(0))
        caches = jax.eval_shape(lambda p, s: model.forward(p, s, x, train=True).caches, params, state)
        stored[policy] = nbytes(caches.blocks)
        compiled[policy] = jax.jit(model.value_and_grad).lower(params, state, x, x).compile()
        calls[policy] = lambda c=compiled[policy], p=params, s=state: jax.block_until_ready(c(p, s, x, x))
        calls[policy]()  # warm-up
    timings = interleaved(calls, repeats)
    rows = []
    for policy in ("none", "blocks"):
        temp = compiled[policy].memory_analysis().temp_size_in_bytes
        rows.append({"model": name, "n_layer": n_layer, "recompute": policy, "stored_MiB": stored[policy] / 2**20,
                     "temp_MiB": temp / 2**20, "ms": 1e3 * timings[policy]["median"],
                     "spread": timings[policy]["spread"]})
    base = rows[0]
    for r in rows:
        r["stored_ratio"] = r["stored_MiB"] / base["stored_MiB"]
        r["temp_ratio"] = r["temp_MiB"] / base["temp_MiB"]
        r["time_ratio"] = r["ms"] / base["ms"]
    return rows


COLS = ["model", "n_layer", "recompute", "stored_MiB", "stored_ratio", "temp_MiB", "temp_ratio", "ms", "spread",
        "time_ratio"]


def run(quick: bool = False) -> dict:
    size = dict(B=2, T=16, C=32) if quick else dict(B=16, T=128, C=128)
    depths = (2,) if quick else (4, 8, 16)
    repeats = 1 if quick else 7
    rows = [r for name in BUILD for L in depths for r in measure(name, L, **size, repeats=repeats)]
    text = (f"Activation recomputation, float32, batch {size['B']} x {size['T']} tokens, n_embd {size['C']}, 4 heads: "
            f"the forward's stored caches, XLA's temporaries of the gradient step and its time, against keeping "
            f"everything\n\n" + table(rows, COLS))
    return {"name": "recompute", "rows": rows, "device": str(jax.devices()[0]), "table": text,
            "settings": {**size, "depths": list(depths), "repeats": repeats}}
