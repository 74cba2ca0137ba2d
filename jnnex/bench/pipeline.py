"""Pipeline parallelism (:mod:`jnnex.pipeline`): the bubble and each schedule's activation memory per stage, GPipe
against 1F1B (``1f1b/2``: its backward in two ticks, each the backward of half the stage's blocks) and the
alternating schedule, at P = 2, 4 stages and M = 4, 8 micro-batches, in jnnex's two runtimes: the host-driven one
(:func:`jnnex.pipeline.host_value_and_grad`: each stage's programs on its own device, MPMD) and the lockstep SPMD
program (:func:`jnnex.pipeline.pipeline_value_and_grad`).

**The bubble.** ``tick_bubble`` is the schedule's idle fraction counted in ticks (each action one tick); the
others replay the schedule *with measured durations* (:meth:`jnnex.pipeline.Schedule.replay`): each stage's forward
and backward of a micro-batch, timed as the host-driven runtime runs them (its trace: the medians over the bench's
steps; the first stage's forward also embeds, its backward also runs the embedding's; the last stage's forward also
runs the head, the loss and their backward). ``bubble_host``: the host-driven runtime — each stage runs its actions
in order, each as soon as its device is free and its input or gradient has arrived. ``bubble_lockstep``: the lockstep
program, whose ticks end in a ``ppermute`` between neighbouring stages, so a device leaves a tick when it and its
neighbours are done. ``formula`` is ``(P − 1) / (M + P − 1)``, which counts equal stages; ``slowest_vs_mean`` is the
busiest stage's seconds per micro-batch over the stages' mean, the imbalance it leaves out. A backward cut into ticks
is replayed as equal parts of the stage's measured backward (the lockstep program's only: the host-driven runtime
runs a backward whole). The bubble is replayed, not read off a wall clock: a CPU's forced devices share its two
cores, and XLA's CPU client runs their programs one after another (measured with 2 devices, two independent chains
of 20 matmul programs, one on each: 1.6–2.0× one chain's time, not 1×), so the host-driven runtime's step here takes
the sum of its programs, not the makespan a machine of parallel devices gives it.

**The memory.** ``host_held_MiB``: the most bytes of caches stage 0 holds at once in the host-driven runtime — its own
arrays, summed after each action. ``stored_MiB``: the lockstep program's (its schedule's slots × one micro-batch's
caches of a stage's blocks, read from shapes); ``temp_MiB``: XLA's ``memory_analysis`` temporaries of the compiled
lockstep program (per device: the SPMD program every device runs). ``*_vs_gpipe``: a schedule's over GPipe's, beside
``P / M``. When the process has fewer CPU devices than the stages, the suite runs itself in a child process with 4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jnnex import pipeline as PP
from jnnex.bench.harness import table
from jnnex.memory import nbytes
from jnnex.models.gpt import GPTConfig, gpt

DEVICES = 4
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("1f1b", 2), ("alternating", 1))  # (name, a backward's ticks)


def _model(n_layer: int, T: int, C: int):
    return gpt(GPTConfig(vocab_size=65, block_size=T, n_layer=n_layer, n_head=4, n_embd=C, bias=False, tie=True))


def stage_times(model, stages: int, micro: int, rows: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds for one micro-batch of ``rows`` rows, per stage: its forward and its backward as jnnex's host-driven
    runtime runs them (:func:`jnnex.pipeline.host_value_and_grad`, 1F1B), each timed by the runtime's own trace — from
    its dispatch to its output on the neighbour's device, its gradients summed — the medians over ``repeats`` steps
    of ``micro`` micro-batches. These are the programs of the lockstep program's ticks too: the forward runs the stage's
    blocks (:func:`jnnex.pipeline.run_stage`) and keeps their caches (:func:`jnnex.pipeline.pack`), the backward reads
    them back (:func:`jnnex.pipeline.unpack`) and runs :func:`jnnex.pipeline.run_stage_backward`; the first stage's
    forward also embeds, its backward also runs the embedding's; the last stage's forward also runs the head, the
    loss and their backward."""
    params, x, y = _batch(model, micro, rows)
    run = PP.host_value_and_grad(model, PP.schedule("1f1b", stages, micro), jax.devices("cpu")[:stages])
    jax.block_until_ready(run(params, x, y))  # (compiled here: not timed)
    trace: list = []
    for _ in range(repeats):
        run(params, x, y, trace=trace)
    def median(s, kind):
        return float(np.median([r["seconds"] for r in trace if (r["stage"], r["kind"]) == (s, kind)]))

    return [median(s, PP.FORWARD) for s in range(stages)], [median(s, PP.BACKWARD) for s in range(stages)]


def _batch(model, micro: int, rows: int):
    cfg = model.cfg
    params, _ = model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (micro * rows, cfg.block_size), 0, cfg.vocab_size)
    y = jax.random.randint(jax.random.key(2), (micro * rows, cfg.block_size), 0, cfg.vocab_size)
    return params, x, y


def host_held(model, sched, rows: int) -> int:
    """The most bytes of caches stage 0 holds at once when jnnex's host-driven runtime runs ``sched``: the arrays it
    keeps, summed after each action (its trace)."""
    params, x, y = _batch(model, sched.micro, rows)
    trace: list = []
    PP.host_value_and_grad(model, sched, jax.devices("cpu")[:sched.stages])(params, x, y, trace=trace)
    return max(r["held_bytes"] for r in trace if r["stage"] == 0)


def memory(model, stages: int, micro: int, rows: int) -> dict:
    """Per schedule: the stored caches per stage (slots × one micro-batch's) and XLA's temporaries of the compiled
    pipelined gradient program."""
    cfg = model.cfg
    params, _ = model.init(jax.random.key(0))
    stacked = PP.stack_blocks(params)
    x = jax.ShapeDtypeStruct((rows * micro, cfg.block_size), jnp.int32)
    h = jax.ShapeDtypeStruct((rows, cfg.block_size, cfg.n_embd), jnp.float32)
    Lp = cfg.n_layer // stages
    stage_blocks = jax.tree.map(lambda a: a[:Lp], stacked.blocks)
    one = nbytes(jax.eval_shape(lambda b, h: PP.run_stage(model.pipe, cfg, b, h, 0)[1][0], stage_blocks, h))
    out = {}
    mesh = PP.mesh_3d(1, stages, 1, jax.devices("cpu")[:stages])
    for name, parts in SCHEDULES:
        sched = PP.schedule(name, stages, micro, parts)
        vg = jax.jit(PP.pipeline_value_and_grad(model, mesh, sched, params))
        temp = vg.lower(stacked, x, x).compile().memory_analysis().temp_size_in_bytes
        out[sched.label] = {"slots": sched.slots[0], "stored": sched.slots[0] * one, "temp": temp}
    return out


def run(quick: bool = False) -> dict:
    if len(jax.devices("cpu")) < DEVICES and not os.environ.get("JNNEX_PIPELINE_CHILD"):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(DEVICES), "JNNEX_PIPELINE_CHILD": "1"}
        out = subprocess.run([sys.executable, "-m", "jnnex.bench.pipeline", *(["--quick"] if quick else [])], env=env,
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out.splitlines()[-1])
    size = dict(n_layer=4, T=16, C=32, rows=2) if quick else dict(n_layer=8, T=128, C=128, rows=4)
    grid = [(2, 4)] if quick else [(2, 4), (2, 8), (4, 4), (4, 8)]
    repeats = 1 if quick else 11  # steps of M micro-batches each: the medians of M × repeats actions a stage
    model = _model(size["n_layer"], size["T"], size["C"])
    rows = []
    for P, M in grid:
        forward, backward = stage_times(model, P, M, size["rows"], repeats)
        work = [f + b for f, b in zip(forward, backward)]  # a stage's seconds per micro-batch
        mem = memory(model, P, M, size["rows"])
        for name, parts in SCHEDULES:
            sched = PP.schedule(name, P, M, parts)
            name = sched.label
            bubble = {}
            for lockstep in (False, True):
                makespan, busy = sched.replay(forward, backward, lockstep=lockstep)
                bubble[lockstep] = 1 - sum(busy) / (P * makespan)
            row = {"P": P, "M": M, "schedule": name, "formula": (P - 1) / (M + P - 1), "tick_bubble": sched.bubble}
            if parts == 1:  # (the host-driven runtime runs each backward whole: 1f1b/2 is the lockstep program's)
                row.update(bubble_host=bubble[False], host_held_MiB=host_held(model, sched, size["rows"]) / 2**20)
            rows.append({**row, "bubble_lockstep": bubble[True],
                         "F_first_ms": 1e3 * forward[0], "F_last_ms": 1e3 * forward[-1],
                         "B_first_ms": 1e3 * backward[0], "B_last_ms": 1e3 * backward[-1],
                         "slowest_vs_mean": max(work) / (sum(work) / P), "slots": mem[name]["slots"],
                         "stored_MiB": mem[name]["stored"] / 2**20, "temp_MiB": mem[name]["temp"] / 2**20})
        gp = rows[-len(SCHEDULES)]
        for r in rows[-len(SCHEDULES):]:
            if "bubble_host" in r:
                r["host_vs_formula"] = r["bubble_host"] / r["formula"]
                r["host_held_vs_gpipe"] = r["host_held_MiB"] / gp["host_held_MiB"]
            r["lockstep_vs_formula"] = r["bubble_lockstep"] / r["formula"]
            r["stored_vs_gpipe"] = r["stored_MiB"] / gp["stored_MiB"]
            r["temp_vs_gpipe"] = r["temp_MiB"] / gp["temp_MiB"]
            r["P/M"] = P / M
    cols = ["P", "M", "schedule", "formula", "tick_bubble", "bubble_host", "host_vs_formula", "bubble_lockstep",
            "lockstep_vs_formula", "F_first_ms", "F_last_ms", "B_first_ms", "B_last_ms", "slowest_vs_mean",
            "host_held_MiB", "host_held_vs_gpipe", "slots", "stored_MiB", "stored_vs_gpipe", "temp_MiB",
            "temp_vs_gpipe", "P/M"]
    text = (f"Pipeline parallelism, GPT {size['n_layer']} blocks, n_embd {size['C']}, {size['T']} tokens, "
            f"{size['rows']} rows a micro-batch, float32, on {DEVICES} forced CPU devices: the bubble (ticks; "
            "replayed with the stage times measured in jnnex's host-driven runtime, as that runtime runs and as the "
            "lockstep program does) and the activations a stage holds (the host runtime's own arrays; the lockstep "
            "program's slots and XLA's temporaries)\n\n" + table(rows, cols))
    return {"name": "pipeline", "rows": rows, "device": str(jax.devices()[0]), "table": text,
            "settings": {**size, "grid": grid, "repeats": repeats}}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:])))
