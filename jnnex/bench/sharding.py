"""Past data parallel, measured: what FSDP leaves on each device, and what every scheme sends between devices.

**Memory per device under FSDP** (:func:`fsdp_memory`): for each model, the bytes of its parameters and AdamW state
on each device at 1, 2, 4 and 8 devices — read from the placed arrays' shards (:func:`jnnex.parallel.bytes_per_device`)
and from XLA's memory analysis of the compiled FSDP step (its arguments, less the batch) — and each over the one-device
figure: ``1/N`` but for the tensors no axis of which divides by ``N``.

**Collectives** (:func:`collectives`): the bytes each compiled training step all-reduces, all-gathers and
reduce-scatters, read from the program XLA compiled (each collective's result shapes; a collective inside a loop
counts once per iteration it would run — there are none: the blocks are unrolled), split by the mesh axis the op
spans, against the formulas: Megatron's 4 all-reduces of ``B_d·T·C`` per block per step along ``"model"``
(Shoeybi et al. 2019, §3), the gradient's all-reduce of the device's parameters along ``"data"``, FSDP's all-gather of
the parameters and reduce of the gradients.

On a CPU the devices are forced (``JAX_NUM_CPU_DEVICES``) and share the cores: these are counts of bytes, not times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jnnex import parallel, tensor_parallel
from jnnex.bench.harness import table
from jnnex.lm import count_params
from jnnex.models.registry import REGISTRY
from jnnex.plan import OPS, hlo_collectives
from jnnex.optim import TrainConfig, make_optimizer
from jnnex.train import init_train_state, make_step

COUNTS = (1, 2, 4, 8)
# Each model at its registry size (the GPT and Llama at their Shakespeare CPU presets' shape, a 65-character vocabulary;
# the Llama's SwiGLU 344 wide, a multiple of 4, where the preset's 342 splits over 2 devices only).
LLAMA = ("shakespeare-cpu", {"ffn_multiple": 4})
MODELS = {"mlp": {}, "wavenet": {}, "gpt": "shakespeare-cpu", "llama": LLAMA}
QUICK_MODELS = {"gpt": {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 65, "block_size": 16}}


def build(name: str, how) -> object:
    spec = REGISTRY[name]
    preset, more = (how, {}) if isinstance(how, str) else how if isinstance(how, tuple) else (None, how)
    over = {**(spec.presets[preset][0] if preset else {}), **more}
    if spec.per_position:
        over.setdefault("vocab_size", 65)
    return spec.build(spec.config(**over))


def _fsdp_step(model, opt, mesh, ts):
    rep = parallel.replicated(mesh)
    if mesh.size == 1:
        layout = jax.tree.map(lambda _: rep, ts)
        return make_step(model, opt), layout
    layout, step_shardings = parallel.fsdp_layout(ts, mesh)
    return make_step(model, opt, shardings=step_shardings), layout


def _batch(model, rows: int, mesh):
    shape = (rows, model.block_size)
    y = shape if model.per_position else (rows,)
    sharding = parallel.batch_sharded(mesh)
    return (jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
            jax.ShapeDtypeStruct(y, jnp.int32, sharding=sharding))


def fsdp_memory(models: dict, counts) -> list[dict]:
    rows = []
    for name, how in models.items():
        model = build(name, how)
        opt = make_optimizer(TrainConfig(optimizer="adamw"))
        ts = init_train_state(model, opt, jax.random.key(0))
        host = parallel.local(ts)
        base = None
        for n in counts:
            mesh = parallel.data_mesh(jax.devices()[:n])
            step, layout = _fsdp_step(model, opt, mesh, ts)
            placed = parallel.place(host, layout)
            held = max(parallel.bytes_per_device((placed.params, placed.opt_state)).values())
            shaped = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ts, layout)
            batch = _batch(model, 8 * n, mesh)
            compiled = jax.jit(step, out_shardings=(layout, parallel.replicated(mesh))).lower(
                shaped, batch, None).compile()
            batch_bytes = sum(int(np.prod(b.shape)) * 4 // n for b in batch)
            xla = int(compiled.memory_analysis().argument_size_in_bytes) - batch_bytes
            base = base or (held, xla)
            rows.append({"model": name, "params": count_params(host.params), "devices": n,
                         "unsplit_tensors": len(parallel.unsplit(host.params, n)) if n > 1 else 0,
                         "KiB_per_device (arrays)": held / 1024, "KiB_per_device (XLA args)": xla / 1024,
                         "of_1_device (arrays)": held / base[0], "of_1_device (XLA)": xla / base[1],
                         "1/N": 1 / n})
            del placed
    return rows


def collectives(quick: bool) -> list[dict]:
    """Per model and scheme on 4 devices, one training step's collective bytes by kind and axis, and the formulas."""
    rows = []
    B_d, devices = 4, 4
    for name, how in ({"gpt": QUICK_MODELS["gpt"]} if quick else {"gpt": "shakespeare-cpu", "llama": LLAMA}).items():
        model = build(name, how)
        cfg = model.cfg
        opt = make_optimizer(TrainConfig(optimizer="adamw"))
        ts = jax.eval_shape(lambda k: init_train_state(model, opt, k), jax.random.key(0))
        n_params = count_params(ts.params)
        for scheme, (d, m) in [("dp", (4, 1)), ("fsdp", (4, 1)), ("tp", (2, 2)), ("tp", (1, 4))]:
            if m > 1:
                mesh = tensor_parallel.mesh_2d(d, m)
                _, _, layout = tensor_parallel.train_layout(model, opt, mesh, ts)
                step = tensor_parallel.split_step(model, opt, mesh, ts.params)
            else:
                mesh = parallel.data_mesh(devices)
                if scheme == "fsdp":
                    step, layout = _fsdp_step(model, opt, mesh, ts)
                else:
                    rep = parallel.replicated(mesh)
                    step, layout = make_step(model, opt), jax.tree.map(lambda _: rep, ts)
            shaped = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ts, layout)
            text = jax.jit(step, out_shardings=(layout, parallel.replicated(mesh))).lower(
                shaped, _batch(model, B_d * d, mesh), None).compile().as_text()
            found = hlo_collectives(text, mesh)
            per_model = sum(4 * count_params(p) for p in jax.tree.leaves(
                jax.tree.map(lambda p, s: p if tensor_parallel.MODEL not in tuple(s) else None, ts.params,
                             tensor_parallel.specs(model, ts.params), is_leaf=lambda x: isinstance(x, P))))
            split_bytes = 4 * n_params - per_model
            local_params = 4 * n_params if m == 1 else per_model + split_bytes // m
            row = {"model": name, "scheme": scheme, "mesh": f"{d} x {m}"}
            for op in ("all-reduce", "all-gather", "reduce-scatter"):
                for axis in ("data", "model"):
                    total = sum(f["bytes"] for f in found if f["op"] == op and f["axis"] == axis)
                    if total:
                        row[f"{op} {axis} MB"] = total / 1e6
            other = [f for f in found if f["axis"] not in ("data", "model") or f["op"] not in OPS[:3]]
            row["all-to-all and other MB"] = sum(f["bytes"] for f in other) / 1e6
            if m > 1:  # Megatron: 4 all-reduces of (B_d, T, C) float32 per block, forward and backward
                row["Megatron 4·L·B_d·T·C MB"] = 4 * cfg.n_layer * B_d * cfg.block_size * cfg.n_embd * 4 / 1e6
            row["params MB (a device's)"] = local_params / 1e6
            rows.append(row)
    return rows


def run(quick: bool = False) -> dict:
    counts = COUNTS if not quick else (1, 4)
    if len(jax.devices("cpu")) < max(counts) and not os.environ.get("JNNEX_DEVICES_CHILD"):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(max(counts)), "JNNEX_DEVICES_CHILD": "1"}
        out = subprocess.run([sys.executable, "-m", "jnnex.bench.sharding", *(["--quick"] if quick else [])], env=env,
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out.splitlines()[-1])
    memory = fsdp_memory(QUICK_MODELS if quick else MODELS, counts)
    comm = collectives(quick)
    mcols = ["model", "params", "devices", "unsplit_tensors", "KiB_per_device (arrays)", "KiB_per_device (XLA args)",
             "of_1_device (arrays)", "of_1_device (XLA)", "1/N"]
    ccols = ["model", "scheme", "mesh", "all-reduce model MB", "Megatron 4·L·B_d·T·C MB", "all-reduce data MB",
             "all-gather data MB", "reduce-scatter data MB", "all-to-all and other MB", "params MB (a device's)"]
    text = ("FSDP: parameters + AdamW state per device (float32), from the arrays' shards and from XLA's compiled step\n\n"
            + table(memory, mcols) + "\n\nCollectives of one AdamW step on 4 devices, by kind and mesh axis (MB of "
            "results, from the compiled program), beside Megatron's formula and a device's parameters\n\n"
            + table(comm, ccols))
    return {"name": "sharding", "rows": memory, "collectives": comm, "table": text,
            "settings": {"counts": list(counts), "batch_per_device": 4, "backend": jax.default_backend()}}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:])))
