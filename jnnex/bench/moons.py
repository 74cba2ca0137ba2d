"""The moons run (micrograd's demo, 100 SGD steps) three ways: the scalar engine, the jitted tensor code with the
hand-written backward, and the jitted tensor code with ``jax.grad`` — timed side by side in one process."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jnnex.bench.harness import interleaved, table
from jnnex.micrograd import nn, tensor_mlp


def run(quick: bool = False) -> dict:
    steps = 20 if quick else 100
    X, y, params = tensor_mlp.moons_problem(seed=0)
    x32, y32 = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)
    results = {}

    def tensor(engine):
        def go():
            out = tensor_mlp.train_moons(params, x32, y32, steps=steps, engine=engine)
            jax.block_until_ready(out)
            results[engine] = out
        return go

    def scalar():
        model = nn.MLP(2, list(tensor_mlp.MOONS_SIZES[1:]), params=params)
        results["scalar"] = nn.train_moons(model, X, y, steps=steps)

    contenders = {"scalar engine": scalar, "tensor, manual backward": tensor("manual"),
                  "tensor, jax.grad": tensor("autodiff")}
    for fn in list(contenders.values())[1:]:
        fn()  # compile
    timings = interleaved(contenders, repeats=1 if quick else 3)
    base = timings["tensor, jax.grad"]["median"]
    accuracy = {"scalar engine": results["scalar"][1][-1],
                "tensor, manual backward": float(results["manual"][2][-1]),
                "tensor, jax.grad": float(results["autodiff"][2][-1])}
    rows = [{"engine": k, "steps": steps, "seconds": v["median"], "spread": v["spread"],
             "vs jax.grad": v["median"] / base, "accuracy before last step": accuracy[k]} for k, v in timings.items()]
    text = table(rows, ["engine", "steps", "seconds", "spread", "vs jax.grad", "accuracy before last step"])
    return {"name": "moons", "settings": {"steps": steps, "points": 100, "sizes": list(tensor_mlp.MOONS_SIZES)}, "rows": rows,
            "table": text}
