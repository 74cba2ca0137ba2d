"""Pipeline parallelism (:mod:`jnnex.pipeline`): the bubble and each schedule's activation memory per stage, GPipe
against 1F1B (``1f1b/2``: its backward in two ticks, each the backward of half the stage's blocks) and the
alternating schedule, at P = 2, 4 stages and M = 4, 8 micro-batches.

**The bubble.** ``tick_bubble`` is the schedule's idle fraction counted in ticks (each action one tick); the
others replay the schedule *with measured durations* (:meth:`jnnex.pipeline.Schedule.replay`): each stage's forward
and backward of a micro-batch are timed here, each compiled as the one program its tick runs (its ``n_layer / P``
blocks; the first stage also the embedding and its backward, the last the head, the loss and their backward, in its
forward tick). ``bubble_mpmd``: each stage runs its actions in order, each as soon as its stage is free and its input
or gradient has arrived (devices that each run their own program). ``bubble_jnnex``: jnnex's one SPMD program, whose
ticks end in a ``ppermute`` between neighbouring stages, so a device leaves a tick when it and its neighbours are done.
``formula`` is ``(P − 1) / (M + P − 1)``, which counts equal stages; ``slowest_vs_mean`` is the busiest stage's
seconds per micro-batch over the stages' mean, the imbalance it leaves out. A backward cut into ticks is replayed as
equal parts of the stage's measured backward. A CPU cannot show the bubble in wall-clock time: its forced devices
share the same two cores, and XLA's CPU client runs their programs one after another (measured with 2 devices, two
independent chains of 20 matmul programs, one on each: 1.7–1.9× one chain's time, not 1×).

**The memory.** ``stored_MiB``: the caches a stage keeps at once (the schedule's slots × one micro-batch's caches of
its blocks, read from shapes); ``temp_MiB``: XLA's ``memory_analysis`` temporaries of the compiled pipelined
gradient program (per device: the SPMD program every device runs). ``*_vs_gpipe``: a schedule's over GPipe's, beside
``P / M``. When the process has fewer CPU devices than the stages, the suite runs itself in a child process with 4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from jnnex import pipeline as PP
from jnnex.bench.harness import interleaved, table
from jnnex.layers import cross_entropy_backward, cross_entropy_forward
from jnnex.memory import nbytes
from jnnex.models.gpt import GPTConfig, gpt

DEVICES = 4
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("1f1b", 2), ("alternating", 1))  # (name, a backward's ticks)


def _model(n_layer: int, T: int, C: int):
    return gpt(GPTConfig(vocab_size=65, block_size=T, n_layer=n_layer, n_head=4, n_embd=C, bias=False, tie=True))


def stage_times(model, stages: int, rows: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds for one micro-batch of ``rows`` rows, per stage: its forward and its backward, each the work that
    :func:`jnnex.pipeline.pipeline_value_and_grad` does in that stage's tick, compiled as one program and timed on its
    own — the forward runs the stage's blocks (:func:`jnnex.pipeline.run_stage`) and returns the caches it keeps
    (:func:`jnnex.pipeline.pack`), the backward reads them back (:func:`jnnex.pipeline.unpack`) and runs
    :func:`jnnex.pipeline.run_stage_backward`; the first stage's forward also embeds, its backward also runs the
    embedding's; the last stage's forward also runs the head, the loss and their backward. (The backwards were once timed as forward + backward minus the forward: a difference of two
    medians, whose noise put the first stage's backward below the others' in half the runs.)"""
    cfg, pipe = model.cfg, model.pipe
    params, _ = model.init(jax.random.key(0))
    blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *params.blocks[:cfg.n_layer // stages])  # one stage's, stacked
    x = jax.random.randint(jax.random.key(1), (rows, cfg.block_size), 0, cfg.vocab_size)
    y = jax.random.randint(jax.random.key(2), (rows, cfg.block_size), 0, cfg.vocab_size)
    h = jax.random.normal(jax.random.key(3), (rows, cfg.block_size, cfg.n_embd), jnp.float32)
    static = {}  # the caches' Python part, from the forward's trace: only their arrays cross the jit boundary

    def stage_forward(blocks, h):
        out, (arrays, static["caches"]), _ = PP.run_stage(pipe, cfg, blocks, h, 0)
        return out, arrays

    def blocks_backward(blocks, arrays, dh):
        return PP.run_stage_backward(pipe, cfg, blocks, PP.unpack((arrays, static["caches"]), blocks), dh)

    def top(params, h):  # the head, the loss and their backward: in the last stage's forward tick
        logits, c = pipe.top_forward(cfg, params, h)
        _, c_ce = cross_entropy_forward(logits, y)
        return pipe.top_backward(cfg, cross_entropy_backward(jnp.float32(1), c_ce)[0], c)

    def middle_f(params, blocks, arrays, dh):
        return stage_forward(blocks, h)

    def first_f(params, blocks, arrays, dh):
        return stage_forward(blocks, pipe.embed_forward(cfg, params, x, True)[0])

    def last_f(params, blocks, arrays, dh):
        out, arrays = stage_forward(blocks, h)
        return top(params, out), arrays

    def middle_b(params, blocks, arrays, dh):  # (the last stage's backward too: its head's ran in its forward)
        return blocks_backward(blocks, arrays, dh)

    def first_b(params, blocks, arrays, dh):  # the embedding's cache made again, as the pipeline's backward tick does
        dh, grads = blocks_backward(blocks, arrays, dh)
        return pipe.embed_backward(cfg, dh, pipe.embed_forward(cfg, params, x, True)[1]), grads

    _, arrays = jax.jit(stage_forward)(blocks, h)
    dh = jax.random.normal(jax.random.key(4), h.shape, h.dtype)
    programs = {"middle_f": middle_f, "first_f": first_f, "last_f": last_f, "middle_b": middle_b, "first_b": first_b}
    calls = {}
    for name, fn in programs.items():
        jitted = jax.jit(fn)
        calls[name] = lambda jitted=jitted: jax.block_until_ready(jitted(params, blocks, arrays, dh))
        calls[name]()
    t = {k: v["median"] for k, v in interleaved(calls, repeats).items()}
    forward = [t["first_f"]] + [t["middle_f"]] * (stages - 2) + [t["last_f"]]
    backward = [t["first_b"]] + [t["middle_b"]] * (stages - 1)
    return forward, backward


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
    repeats = 3 if quick else 41
    model = _model(size["n_layer"], size["T"], size["C"])
    rows = []
    for P, M in grid:
        forward, backward = stage_times(model, P, size["rows"], repeats)
        work = [f + b for f, b in zip(forward, backward)]  # a stage's seconds per micro-batch
        mem = memory(model, P, M, size["rows"])
        for name, parts in SCHEDULES:
            sched = PP.schedule(name, P, M, parts)
            name = sched.label
            bubble = {}
            for lockstep in (False, True):
                makespan, busy = sched.replay(forward, backward, lockstep=lockstep)
                bubble[lockstep] = 1 - sum(busy) / (P * makespan)
            rows.append({"P": P, "M": M, "schedule": name, "formula": (P - 1) / (M + P - 1),
                         "tick_bubble": sched.bubble, "bubble_mpmd": bubble[False], "bubble_jnnex": bubble[True],
                         "F_first_ms": 1e3 * forward[0], "F_last_ms": 1e3 * forward[-1],
                         "B_first_ms": 1e3 * backward[0], "B_last_ms": 1e3 * backward[-1],
                         "slowest_vs_mean": max(work) / (sum(work) / P), "slots": mem[name]["slots"],
                         "stored_MiB": mem[name]["stored"] / 2**20, "temp_MiB": mem[name]["temp"] / 2**20})
        gp = rows[-len(SCHEDULES)]
        for r in rows[-len(SCHEDULES):]:
            r["mpmd_vs_formula"] = r["bubble_mpmd"] / r["formula"]
            r["jnnex_vs_formula"] = r["bubble_jnnex"] / r["formula"]
            r["stored_vs_gpipe"] = r["stored_MiB"] / gp["stored_MiB"]
            r["temp_vs_gpipe"] = r["temp_MiB"] / gp["temp_MiB"]
            r["P/M"] = P / M
    cols = ["P", "M", "schedule", "formula", "tick_bubble", "bubble_mpmd", "mpmd_vs_formula", "bubble_jnnex",
            "jnnex_vs_formula", "F_first_ms", "F_last_ms", "B_first_ms", "B_last_ms", "slowest_vs_mean", "slots",
            "stored_MiB", "stored_vs_gpipe", "temp_MiB", "temp_vs_gpipe", "P/M"]
    text = (f"Pipeline parallelism, GPT {size['n_layer']} blocks, n_embd {size['C']}, {size['T']} tokens, "
            f"{size['rows']} rows a micro-batch, float32, on {DEVICES} forced CPU devices: the bubble (ticks; "
            "replayed with measured stage times, devices each running their own program and jnnex's lockstep one) "
            "and the activations a stage holds (stored caches; XLA's "
            "temporaries)\n\n" + table(rows, cols))
    return {"name": "pipeline", "rows": rows, "device": str(jax.devices()[0]), "table": text,
            "settings": {**size, "grid": grid, "repeats": repeats}}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:])))
