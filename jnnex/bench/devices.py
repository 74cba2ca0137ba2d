"""Data parallelism, measured and on paper.

**Measured**: µs per training step of the global-view data-parallel step (:func:`jnnex.train.make_run` on a mesh of
1, 2 and 4 devices), the meshes timed in the same rounds. On a CPU the "devices" are forced (``JAX_NUM_CPU_DEVICES``)
and share the same cores, so the table shows what partitioning *costs* (the per-device pieces and the all-reduces),
never a speed-up. Where JAX runs on a GPU, that GPU's single-device step is timed too. When the process has fewer
than 4 CPU devices, the suite runs itself in a child process that has 4 (the count is fixed when JAX starts).

**On paper** (:func:`paper_model`): per model, the bytes a gradient all-reduce moves per step (a ring all-reduce sends
and receives ``2 (N − 1)/N`` times the float32 gradient, per device) against the arithmetic of a step (XLA's FLOP count
for the compiled step at batch 32, the trained size and 10× and 100× wider), as the time each takes on a stated
device and link. Data parallelism pays while a device's share of the compute outlasts the all-reduce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jnnex import parallel
from jnnex.bench.harness import interleaved, table
from jnnex.data import Vocab, load_words, make_splits
from jnnex.lm import count_params
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.optim import make_optimizer
from jnnex.train import init_train_state, make_run, make_step

COUNTS = (1, 2, 4)
MODELS = {"mlp": {}, "wavenet": {}, "gpt": {}}  # at their registry defaults


def _measured(quick: bool) -> list[dict]:
    words = load_words("census-first")
    vocab = Vocab.from_words(words)
    rows = []
    for name in ("bn-mlp",) if quick else MODELS:
        spec = REGISTRY[name]
        model = build_for_words(spec, words, vocab)
        X, Y = make_splits(words, model.block_size, vocab=vocab, per_position=model.per_position).train
        for batch in (32,) if quick else (32, 256):
            n_steps = 5 if quick else max(10, 4000 // batch)
            contenders = {}
            opt = make_optimizer(spec.train)
            ts0 = parallel.local(init_train_state(model, opt, jax.random.key(0)))
            key = np.asarray(jax.random.key_data(jax.random.key(1)))
            cpus = jax.devices("cpu")
            for n in COUNTS:
                mesh = parallel.data_mesh(cpus[:n])
                run = make_run(make_step(model, opt), batch, mesh=mesh)
                args = parallel.replicate((ts0, X, Y, key), mesh)
                jax.block_until_ready(run(*args, n_steps=n_steps))
                contenders[f"cpu x{n}"] = lambda run=run, args=args: jax.block_until_ready(run(*args, n_steps=n_steps))
            if jax.default_backend() == "gpu":
                run = make_run(make_step(model, opt), batch)
                args = (jax.device_put(jax.tree.map(jnp.asarray, ts0)), jnp.asarray(X), jnp.asarray(Y),
                        jax.random.key(1))
                jax.block_until_ready(run(*args, n_steps=n_steps))
                contenders["gpu x1"] = lambda run=run, args=args: jax.block_until_ready(run(*args, n_steps=n_steps))
            timings = interleaved(contenders, 1 if quick else 7)
            one = timings["cpu x1"]["median"]
            for where, t in timings.items():
                rows.append({"model": name, "batch": batch, "devices": where, "us_per_step": 1e6 * t["median"] / n_steps,
                             "spread": t["spread"], "vs_cpu_x1": t["median"] / one})
    return rows


# A device and a link to put numbers on the paper model (stated, not measured here).
RATES = {"this CPU (2 cores)": 150e9, "one H100 (fp32 on tensor cores, ~40 % of peak)": 200e12}
LINKS = {"NVLink (~400 GB/s)": 400e9, "PCIe 4 x16 (~25 GB/s)": 25e9, "100 Gb/s Ethernet (~12 GB/s)": 12e9,
         "10 Gb/s Ethernet (~1.2 GB/s)": 1.2e9}


def _flops(model, batch: int) -> float:
    """XLA's FLOP count of one compiled AdamW training step (lowered and compiled, never run)."""
    spec = REGISTRY[model.name]
    opt = make_optimizer(spec.train)
    step = make_step(model, opt)
    ts = jax.eval_shape(lambda k: init_train_state(model, opt, k), jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch, model.block_size), jnp.int32)
    y = jax.ShapeDtypeStruct((batch, model.block_size) if model.per_position else (batch,), jnp.int32)
    return float(jax.jit(step).lower(ts, (x, y), jax.random.key(0)).compile().cost_analysis()["flops"])


def paper_model(batch: int = 32) -> list[dict]:
    """Per model and width (×1, ×10, ×100 the trained hidden sizes): parameters, float32 gradient bytes, FLOPs of one
    training step at ``batch`` examples per device, FLOPs per byte all-reduced, and — for each device rate and link
    of :data:`RATES` and :data:`LINKS` — the all-reduce's time over the step's compute time. Each device keeping its
    ``batch`` (weak scaling), a ratio well under 1 means each added device adds nearly its whole throughput; near or
    above 1, the link, not the devices, sets the pace."""
    widen = {"mlp": ("n_embd", "n_hidden"), "wavenet": ("n_embd", "n_hidden"), "gpt": ("n_embd",)}
    rows = []
    for name, fields in widen.items():
        spec = REGISTRY[name]
        base = spec.config()
        for factor in (1, 10, 100):
            cfg = spec.config(**{f: getattr(base, f) * factor for f in fields})
            model = spec.build(cfg)
            params = count_params(jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0)))
            grad_bytes = 4 * params
            flops = _flops(model, batch)
            row = {"model": name, "width": f"x{factor}", "params": params, "grad_MB": grad_bytes / 1e6,
                   "GFLOP_per_step": flops / 1e9, "flop_per_byte": flops / grad_bytes}
            for rate_name, rate in RATES.items():
                for link_name, bw in LINKS.items():
                    row[f"allreduce/compute: {rate_name}, {link_name}"] = (2 * grad_bytes / bw) / (flops / rate)
            rows.append(row)
    return rows


def run(quick: bool = False) -> dict:
    if jax.default_backend() != "tpu" and len(jax.devices("cpu")) < max(COUNTS) and \
            not os.environ.get("JNNEX_DEVICES_CHILD"):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(max(COUNTS)), "JNNEX_DEVICES_CHILD": "1"}
        out = subprocess.run([sys.executable, "-m", "jnnex.bench.devices", *(["--quick"] if quick else [])], env=env,
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out.splitlines()[-1])
    rows = _measured(quick)
    paper = paper_model() if not quick else []
    cols = ["model", "batch", "devices", "us_per_step", "spread", "vs_cpu_x1"]
    text = (f"{jax.device_count()} devices ({jax.default_backend()}); CPU devices forced, sharing the same cores: "
            "overhead, not speed-up\n\n" + table(rows, cols))
    if paper:
        pcols = ["model", "width", "params", "grad_MB", "GFLOP_per_step", "flop_per_byte"]
        text += "\n\nOn paper (batch 32 per device per step; the all-reduce ÷ compute ratio per device and link is in the JSON and in benchmarks/README.md)\n\n" + table(paper, pcols)
    return {"name": "devices", "rows": rows, "paper": paper, "table": text,
            "settings": {"counts": list(COUNTS), "rates": RATES, "links": LINKS, "backend": jax.default_backend()}}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:])))
