"""A memory plan: what training a transformer holds on each device under each way of splitting it, before anything
is allocated — and XLA's own figures for the same step beside it, where it compiles.

For ``devices`` devices, one of six schemes (``model_parallel`` ``M`` for ``tp`` and ``fsdp+tp``):

* ``dp``      — data parallel: every device a whole copy of the parameters, gradients and optimiser state;
* ``fsdp``    — ZeRO-3 / FSDP (``jnnex train --shard-params``): parameters, gradients and moments split ``1/N``
  (:func:`jnnex.parallel.fsdp_spec`), and during the step the whole parameters and gradients *gathered* — at once,
  as jnnex's global-view step compiles; a layer-by-layer gather (PyTorch FSDP's) would hold one block instead;
* ``tp``      — Megatron's tensor parallelism over ``M`` devices (``--model-parallel M``; :mod:`jnnex.tensor_parallel`):
  every block's matrices ``1/M`` (a mixture of experts' every expert by its hidden units, the router whole), the
  embeddings, norms and head whole; activations inside a block split too;
* ``fsdp+tp`` — on paper only (not a training mode yet): the tensor-parallel slices, split ``1/(N/M)`` again by FSDP;
* ``pp``      — pipeline parallelism over ``P`` stages (``--stages P --micro-batches K``; :mod:`jnnex.pipeline`,
  1F1B by default, ``--pipeline-schedule``): each device ``1/P`` of the blocks and the embedding and head whole; the
  activations of the micro-batches the busiest stage holds (1F1B: stage 0's ``min(P, K)``; GPipe ``K``; alternating
  ``min(2P − 1, K)``), the last stage's with one micro-batch's logits;
* ``ep``      — expert parallelism for a mixture of experts (:mod:`jnnex.expert_parallel`): each device ``1/N`` of
  every block's experts, the rest whole.

**Communication**: the bytes of the results of one step's collectives on a device (what XLA's program produces,
:func:`hlo_collectives`), by formula: a data-parallel gradient all-reduce (the gradients' bytes, a tied table's
twice: the global-view step all-reduces its two gradients apiece); FSDP's all-gather of the parameters and
reduce-scatter of the gradients; Megatron's four all-reduces of ``B·T·C`` per block along the model axis (Shoeybi et
al. 2019, §3; a block of experts adds its gates' gradients, ``B·T·E``: :func:`model_axis_bytes`); the pipeline's
activation and gradient per micro-batch across each stage boundary, ``2 · K · (B/K)·T·C`` (jnnex's program sends on
every tick of the schedule, idle ticks sending zeros: ``comm_jnnex`` — ``2 (K + P − 1)`` ticks for GPipe and 1F1B,
more for the alternating schedule and a backward cut into ticks); expert parallelism's four all-to-alls of
``E · cap · C`` per block (two each way, forward and backward; ``cap``: a device's tokens, dropless). A ring moves
about ``2 (n − 1)/n`` of an all-reduce's bytes over each device's link.

Per device, in bytes: **parameters**, **gradients**, **optimizer** (the optimiser's state, read by shape from the
optimiser: AdamW's two float32 moments by default), **gathered** (FSDP's
transient whole copies), **activations** (one step's forward caches at the device's micro-batch, read off shapes:
``jax.eval_shape`` of the very forward that trains — the split one under ``jax.vmap`` over a stand-in model axis — and
the logits three times: themselves, their softmax, their gradient). Everything is float32 (the parameters' dtype).

:func:`xla_check` compiles the step for the scheme — the step ``fit`` runs, from the same layout (on forced CPU
devices; never run, nothing allocated: its arguments are shapes) — and reads ``memory_analysis()``: arguments
(parameters + optimiser state + batch), outputs (the new state: a step does not donate its input), temporaries
(gradients, gathered copies, activations); and the bytes its collectives produce, a loop's counted each time it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jnnex import optim, parallel, tensor_parallel
from jnnex.memory import nbytes
from jnnex.models.registry import get_spec

SCHEMES = ("dp", "fsdp", "tp", "fsdp+tp", "pp", "ep")
GB = 1e9
DEVICE_SIZES = {"80 GB (A100/H100)": 80 * GB, "141 GB (H200)": 141 * GB}

# The GPT-2 and GPT-3 shapes (Radford et al. 2019; Brown et al. 2020, table 2.1), for the largest-that-fits table.
FAMILY = {
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, n_embd=1600),
    "gpt3-2.7b": dict(n_layer=32, n_head=32, n_embd=2560),
    "gpt3-6.7b": dict(n_layer=32, n_head=32, n_embd=4096),
    "gpt3-13b": dict(n_layer=40, n_head=40, n_embd=5120),
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288),
}


XLA_COUNTS = 2**60  # the largest per-device plan `--check` compiles: XLA's byte counts are signed 64-bit (2^63)


class Plan(NamedTuple):
    scheme: str
    data: int  # devices along "data"
    model: int  # devices along "model"
    params: int  # bytes per device, resident
    grads: int
    optimizer: int
    gathered: int  # FSDP's whole copies of parameters and gradients during the step
    activations: int
    stages: int = 1  # devices along "stage" (pp)
    comm: int = 0  # bytes of one step's collective results on a device, by formula
    comm_jnnex: int = 0  # the same for jnnex's program where it differs from the formula (the pipeline's idle ticks)
    bubble: float | None = None  # pp: the idle fraction of jnnex's lockstep program, equal stages, a backward 2F

    PARTS = ("params", "grads", "optimizer", "gathered", "activations")  # what the memory total sums

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations

    def row(self) -> dict:
        mesh = f"{self.data} x {self.model}" if self.stages == 1 else f"{self.data} x {self.stages} stages"
        return {"scheme": self.scheme, "mesh": mesh, **{k: getattr(self, k) / GB for k in self.PARTS},
                "total_GB": self.total / GB, "comm_GB": self.comm / GB,
                **({"comm_jnnex_GB": self.comm_jnnex / GB} if self.comm_jnnex else {}),
                **({"bubble": self.bubble} if self.bubble is not None else {})}


def build_model(name: str = "gpt", preset: str | None = "gpt2-124m", **over):
    """A registered model at a preset's shape (its vocabulary from ``over``, default GPT-2's padded 50,304)."""
    spec = get_spec(name)
    if preset is not None and preset not in spec.presets:
        raise ValueError(f"plan: model {name!r} has no preset {preset!r}; it has {sorted(spec.presets)}")
    shape = dict(spec.presets[preset][0]) if preset is not None else {}
    return spec.build(spec.config(**{"vocab_size": 50_304, **shape, **over}))


def axes(scheme: str, devices: int, model_parallel: int | None, stages: int | None = None) -> tuple[int, int]:
    """``(data, model)`` devices of ``scheme`` on ``devices`` (``pp``: data = devices / ``stages``); a clear error for
    what does not fit together."""
    if scheme not in SCHEMES:
        raise ValueError(f"plan: --parallel must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if not (isinstance(devices, int) and devices >= 1):
        raise ValueError(f"plan: --devices must be an integer >= 1, got {devices!r}")
    if scheme == "pp":
        if not (isinstance(stages, int) and stages >= 1 and devices % stages == 0):
            raise ValueError(f"plan: pp needs --stages P dividing --devices {devices}, got {stages!r}")
        return devices // stages, 1
    if scheme in ("dp", "fsdp", "ep"):
        return devices, 1
    m = devices if scheme == "tp" and model_parallel is None else model_parallel
    if m is None:
        raise ValueError("plan: fsdp+tp needs --model-parallel M (the model axis; the rest is FSDP's data axis)")
    if not (isinstance(m, int) and m >= 1 and devices % m == 0):
        raise ValueError(f"plan: --model-parallel {m!r} must divide --devices {devices}")
    return devices // m, m


def _local_shape(shape, spec, m: int):
    """A tensor's shape on one device of the model axis, given its spec there."""
    spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    return tuple(s // m if a == tensor_parallel.MODEL else s for s, a in zip(shape, spec))


def _tp_shapes(model, params, m: int):
    """Each parameter as one device of an ``m``-way model axis holds it (``ShapeDtypeStruct``s; the whole for
    ``m == 1``)."""
    if m == 1:
        return params
    specs = tensor_parallel.specs(model, params)
    return jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(_local_shape(p.shape, s, m), p.dtype), params, specs,
                        is_leaf=lambda x: isinstance(x, P))


def activation_bytes(model, batch: int, T: int, m: int) -> int:
    """One step's activations on a device holding ``batch`` rows of ``T`` tokens and a ``1/m`` slice of every block:
    the bytes each row adds to the split forward's caches (the difference between 2 rows and 1: weights held by
    reference cost nothing), plus the logits twice more, times ``batch``. Read off the model with 1 and 2 blocks
    (every block keeps the same), so a 96-block model costs what a 2-block one does."""
    if m > 1:
        tensor_parallel.rules_of(model)  # (a model without a split: named)
    return batch * row_bytes(model, T, m, model.cfg.n_layer)


def row_bytes(model, T: int, m: int, blocks: int, logits: bool = True) -> int:
    """The bytes one row of ``T`` tokens adds to the caches of ``blocks`` of the model's blocks (each split ``m``
    ways), with the logits three times (``logits``) or without."""
    one, two = (_row_bytes(model.name, dataclasses.replace(model.cfg, n_layer=n), T, m) for n in (1, 2))
    return one + (blocks - 1) * (two - one) - (0 if logits else 3 * 4 * T * model.cfg.vocab_size // m)


@functools.cache
def _row_bytes(name: str, cfg, T: int, m: int) -> int:
    """The bytes one row adds to the activations of model ``name`` at ``cfg`` (read off traced shapes: a pure function
    of its arguments, so each is traced once a process — the schemes with the same model axis, ``dp`` and ``fsdp``,
    plan the same activations)."""
    model = get_spec(name).build(cfg)
    params = _param_shapes(name, cfg)
    local = jax.tree.map(lambda p: jax.ShapeDtypeStruct((m, *p.shape), p.dtype), _tp_shapes(model, params, m))
    if m > 1:
        tensor_parallel.check_split(model, m)
    split = dataclasses.replace(model, cfg=dataclasses.replace(cfg, model_axis=tensor_parallel.MODEL if m > 1 else
                                                               None))

    def arrays(p, x):
        out = split.forward(p, (), x, train=False)  # the model's own forward, each block split m ways
        return out.logits, [leaf for leaf in jax.tree.leaves(out.caches) if isinstance(leaf, jax.Array)]

    def made(rows):
        x = jax.ShapeDtypeStruct((rows, T), jnp.int32)
        logits, caches = jax.eval_shape(jax.vmap(arrays, in_axes=(0, None), axis_name=tensor_parallel.MODEL,
                                                 axis_size=m), local, x)
        return (nbytes(caches) + 3 * nbytes(logits)) // m

    return made(2) - made(1)


@functools.cache
def _param_shapes(name: str, cfg):
    """Model ``name``'s parameters at ``cfg`` as ``ShapeDtypeStruct``s (traced once a process: every scheme plans the
    same model, and a 96-block model's initialisation takes a second to trace)."""
    model = get_spec(name).build(cfg)
    return jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0))


def adamw_if_none(optimizer):
    """The optimiser a plan is for: the one given, or AdamW at its default settings."""
    return optim.make_optimizer(optim.TrainConfig(optimizer="adamw")) if optimizer is None else optimizer


def check_scheme(model, scheme: str) -> None:
    """A clear error for a scheme the model cannot train under: ``ep`` needs experts."""
    if scheme == "ep" and not _has_experts(model):
        raise ValueError(f"plan: ep splits a mixture of experts' experts; model {model.name!r} has none (the llama "
                         f"with n_expert has: --preset mixtral-8x7b)")


def _has_experts(model) -> bool:
    return getattr(model.cfg, "n_expert", None) is not None


def schemes_for(model) -> tuple[str, ...]:
    """The schemes a plan of ``model`` covers by default: those it can train under (and ``fsdp+tp``, on paper)."""
    return SCHEMES if _has_experts(model) else tuple(s for s in SCHEMES if s != "ep")


def model_axis_bytes(model, batch: int, T: int) -> int:
    """The bytes Megatron's split all-reduces along the model axis in one step, a device's ``batch`` rows of ``T``
    tokens: four ``(B, T, C)`` a block — the attention's ``g`` (forward) and ``f`` (backward), and the MLP's; in a
    block of experts split by their hidden units the MLP's are the gated outputs' and the inputs' gradients, and the
    gates' gradients ``(B, T, E)`` are summed too (each device's hidden units give a part of each expert's output)."""
    cfg = model.cfg
    per_block = 4 * batch * T * cfg.n_embd * 4
    if _has_experts(model):
        per_block += batch * T * cfg.n_expert * 4
    return cfg.n_layer * per_block


def plan(model, scheme: str, devices: int, *, model_parallel: int | None = None, batch: int = 1,
         T: int | None = None, optimizer=None, stages: int | None = None, micro_batches: int | None = None,
         schedule: str = "1f1b") -> Plan:
    """The per-device memory of training ``model`` under ``scheme`` on ``devices`` devices, ``batch`` sequences of
    ``T`` tokens (default: the model's block) per data shard, with ``optimizer`` (an optax transformation; default
    AdamW) — its state read from the optimiser itself, by shape, over a device's slice of the parameters
    (:func:`jnnex.optim.state_shapes`: SGD keeps nothing, AdamW two moments, Muon one momentum per matrix) — and the
    bytes its collectives produce in one step, by formula. ``pp``: ``stages``, ``micro_batches`` (default: the
    batch, one row each) and the ``schedule`` (:func:`jnnex.pipeline.schedule`: what a stage holds, how many ticks
    send)."""
    check_scheme(model, scheme)
    d, m = axes(scheme, devices, model_parallel, stages)
    T = model.block_size if T is None else T
    optimizer = adamw_if_none(optimizer)
    if scheme == "pp":
        return _pipeline_plan(model, d, stages, batch, micro_batches or batch, T, optimizer, schedule)
    if scheme == "ep":
        return _expert_plan(model, d, batch, T, optimizer)
    params = _param_shapes(model.name, model.cfg)
    local_tree = _tp_shapes(model, params, m)
    local, state = jax.tree.leaves(local_tree), jax.tree.leaves(optim.state_shapes(optimizer, local_tree))
    whole = nbytes(local)  # a device's TP slice, before FSDP

    def resident(leaves) -> int:  # FSDP splits each tensor (parameters, optimiser state) along an axis that divides
        if not scheme.startswith("fsdp"):
            return nbytes(leaves)
        return sum(nbytes(p) // (d if parallel.fsdp_spec(p.shape, d) != P() else 1) for p in leaves)

    held = resident(local)
    gathered = 2 * (whole - held)  # FSDP: the rest of the parameters and of the gradients, during the step
    cfg = model.cfg
    megatron = model_axis_bytes(model, batch, T) if m > 1 else 0
    if scheme.startswith("fsdp"):
        comm = megatron + (whole + held if d > 1 else 0)  # all-gather the parameters, reduce-scatter the gradients
    else:
        comm = megatron + (whole if d > 1 else 0)  # the gradients' all-reduce over "data"
        if scheme == "dp" and d > 1 and getattr(cfg, "tie", False):  # the global-view step all-reduces a tied
            comm += nbytes(params.wte)  # table's two gradients (the embedding's, the head's) apiece, then adds them
    return Plan(scheme, d, m, held, held, resident(state), gathered, activation_bytes(model, batch, T, m), comm=comm)


def _pipeline_plan(model, d: int, P: int, batch: int, K: int, T: int, optimizer, schedule: str = "1f1b") -> Plan:
    """A stage's memory under ``schedule``: ``1/P`` of the blocks and the rest whole (jnnex's stages each hold the
    embedding and head); the caches of the micro-batches the busiest stage holds at once (the schedule's slots: 1F1B
    ``min(P, K)``, GPipe ``K``, alternating ``min(2P − 1, K)``), and on the last stage one micro-batch's logits (its
    head's forward and backward share a tick), whichever stage holds more. Its sends: one activation and one gradient
    each way on every tick of the schedule (``comm_jnnex``; the formula's, only those that carry a micro-batch). Its
    ``bubble``: the idle fraction of jnnex's lockstep program running it, with equal stages and a backward twice a
    forward (:meth:`jnnex.pipeline.Schedule.replay`; ``1f1b/2``, its backward in two ticks, idles the formula's)."""
    from jnnex import pipeline

    cfg = model.cfg
    sched = pipeline.schedule(schedule, P, K)
    pipeline.check_pipeline(model, P, sched.parts)
    if batch % K:
        raise ValueError(f"plan: --micro-batches {K} must divide --batch-size {batch}")
    params = _param_shapes(model.name, cfg)
    stage = params._replace(blocks=params.blocks[:cfg.n_layer // P])
    held = nbytes(stage)
    state = nbytes(optim.state_shapes(optimizer, stage))
    rows, Lp = batch // K, cfg.n_layer // P
    caches = rows * row_bytes(model, T, 1, Lp, logits=False)  # one micro-batch's, on one stage
    logits = rows * row_bytes(model, T, 1, Lp) - caches
    activations = max(sched.held(s) * caches + (logits if s == P - 1 else 0) for s in range(P))
    shared = nbytes(params._replace(blocks=()))
    boundary = rows * T * cfg.n_embd * 4  # one micro-batch's activation (or its gradient) across a stage boundary
    # the blocks' gradients all-reduced over "data"; the embedding's and head's over "data" and "stage" at once
    grads = (held - shared if d > 1 else 0) + (shared if d * P > 1 else 0)
    makespan, busy = sched.replay([1.0] * P, [2.0] * P, lockstep=True)  # (a backward's FLOPs: twice a forward's)
    return Plan("pp", d, 1, held, held, state, 0, activations, stages=P,
                comm=(2 * K * boundary if P > 1 else 0) + grads,
                comm_jnnex=(2 * sched.ticks * boundary if P > 1 else 0) + grads, bubble=1 - sum(busy) / (P * makespan))


def _expert_plan(model, d: int, batch: int, T: int, optimizer) -> Plan:
    """Expert parallelism on ``d`` devices: each ``1/d`` of every block's experts, the rest whole; the activations as
    one device's forward caches them for ``batch`` rows (its dispatch buffers included)."""
    from jnnex import expert_parallel

    cfg = model.cfg
    expert_parallel.check_experts(model, d)
    params = _param_shapes(model.name, cfg)
    specs = expert_parallel.specs(params)
    local = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(((p.shape[0] // d,) + p.shape[1:]) if s == P(
        parallel.DATA) else p.shape, p.dtype), params, specs)
    held = nbytes(local)
    state = nbytes(optim.state_shapes(optimizer, local))
    non_expert = nbytes(jax.tree.map(lambda p, s: None if s == P(parallel.DATA) else p, params, specs))
    tokens = batch * T
    cap = tokens if cfg.expert_capacity is None else math.ceil(cfg.expert_capacity * tokens * cfg.expert_top_k /
                                                                 cfg.n_expert)
    all_to_all = 4 * cfg.n_layer * cfg.n_expert * cap * cfg.n_embd * 4 if d > 1 else 0
    return Plan("ep", d, 1, held, held, state, 0, batch * row_bytes(model, T, 1, cfg.n_layer),
                comm=all_to_all + (non_expert if d > 1 else 0))


def largest_fitting(devices: int, scheme: str, size: float, *, model_parallel: int | None = None,
                    batch: int = 1, T: int = 1024, vocab: int = 50_304) -> str | None:
    """The largest of :data:`FAMILY` whose plan fits ``size`` bytes a device (``None``: not even the smallest)."""
    return largest_fitting_each(devices, scheme, [size], model_parallel=model_parallel, batch=batch, T=T,
                                vocab=vocab)[0]


def largest_fitting_each(devices: int, scheme: str, sizes, *, model_parallel: int | None = None, batch: int = 1,
                         T: int = 1024, vocab: int = 50_304, optimizer=None, stages: int | None = None,
                         micro_batches: int | None = None, schedule: str = "1f1b") -> list[str | None]:
    """:func:`largest_fitting` for each of ``sizes``, each family member planned once."""
    best = [None] * len(sizes)
    m = axes(scheme, devices, model_parallel, stages)[1]
    for name, shape in FAMILY.items():
        if shape["n_head"] % m or (4 * shape["n_embd"]) % m or (scheme == "pp" and shape["n_layer"] % stages):
            continue
        model = build_model("gpt", None, vocab_size=vocab, block_size=T, bias=True, tie=True, **shape)
        total = plan(model, scheme, devices, model_parallel=model_parallel, batch=batch, T=T,
                     optimizer=optimizer, stages=stages, micro_batches=micro_batches, schedule=schedule).total
        best = [name if total <= size else b for b, size in zip(best, sizes)]
    return best


def xla_check(model, scheme: str, devices: int, *, model_parallel: int | None = None, batch: int = 1,
              T: int | None = None, optimizer=None, stages: int | None = None,
              micro_batches: int | None = None, schedule: str = "1f1b") -> dict:
    """XLA's figures for the training step of ``scheme`` with ``optimizer`` (default AdamW), compiled for ``devices``
    of ``jax.devices()`` from shapes alone — the step :func:`jnnex.train.fit` runs, from the same
    :class:`jnnex.layout.Layout` (``pp``: ``stages``, ``micro_batches``, default the batch a row each, ``schedule``):
    ``{"arguments", "outputs", "temporaries"}``, its memory analysis in bytes per device, and ``"comm"``, the bytes
    its collectives produce on a device in one step (:func:`hlo_collectives`, a loop's counted each time it runs)."""
    from jnnex.layout import Parallel, make_layout
    from jnnex.train import init_train_state

    d, m = axes(scheme, devices, model_parallel, stages)
    if scheme == "fsdp+tp":
        raise ValueError("plan: fsdp+tp is on paper only (not a training mode yet): nothing to compile")
    check_scheme(model, scheme)
    if devices > len(jax.devices()):
        raise ValueError(f"plan --check: {devices} devices asked for, but only {len(jax.devices())} exist (on CPU, "
                         f"JAX_NUM_CPU_DEVICES={devices})")
    T = model.block_size if T is None else T
    opt = adamw_if_none(optimizer)
    ts = jax.eval_shape(lambda k: init_train_state(model, opt, k), jax.random.key(0))
    par = Parallel(scheme, devices, m if scheme == "tp" else None, stages if scheme == "pp" else None,
                   (micro_batches or batch) if scheme == "pp" else None, schedule if scheme == "pp" else None)
    layout = make_layout(par, model, opt, ts)
    mesh = layout.mesh
    rep = jax.sharding.NamedSharding(mesh, P())
    there = jax.eval_shape(layout.to_devices, ts)
    shardings = jax.tree.map(lambda _: rep, there) if layout.shardings is None else layout.shardings
    shaped = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), there, shardings)
    rows = jax.ShapeDtypeStruct((batch * d, T), jnp.int32, sharding=parallel.batch_sharded(mesh))
    compiled = jax.jit(layout.step, out_shardings=(shardings, rep)).lower(shaped, (rows, rows), None).compile()
    mem = compiled.memory_analysis()
    return {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes),
            "comm": collective_bytes(hlo_collectives(compiled.as_text(), mesh))}


OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"(f64|f32|bf16|f16|s32|u32|s64|pred)\[([0-9,]*)\]")
_BYTES = {"f64": 8, "s64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}


_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")  # a computation's first line in XLA's text


def _computation_counts(text: str) -> dict:
    """How many times each computation of a compiled program's text runs in one call of the program, summed over
    the places that call it: the entry once, a ``while`` loop's body its ``known_trip_count`` times its caller's
    count (a loop of unknown count: once), any other computation it calls (a fusion, a call, a conditional's every
    branch, as if taken) its caller's count."""
    calls, entry, current = {}, None, None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(2)
            entry = current if head.group(1) else entry
            calls.setdefault(current, [])
            continue
        if current is None:
            continue
        trip = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
        body = re.search(r"body=%?([\w.\-]+)", line) if " while(" in line else None
        for callee in re.findall(r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)",
                                 line) + [c for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
                                          for c in re.findall(r"%?([\w.\-]+)", group)]:
            times = int(trip.group(1)) if body and callee == body.group(1) and trip else 1
            calls[current].append((callee, times))
    callers: dict = {}
    for caller, callees in calls.items():
        for callee, times in callees:
            callers.setdefault(callee, []).append((caller, times))

    @functools.cache
    def runs(name) -> int:  # (an HLO module's calls form no cycle)
        return 1 if name == entry else sum(runs(c) * t for c, t in callers.get(name, []))

    return {name: runs(name) for name in calls}


def hlo_collectives(text: str, mesh) -> list[dict]:
    """Every collective of a compiled program's text: its kind, the mesh axis its replica groups span, the bytes of
    its result(s), and how many times one call of the program runs it (``times``: a loop's trip count — a pipeline's
    sends, once a tick)."""
    counts = _computation_counts(text)
    current = None
    axis_of = {}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    for i, name in enumerate(mesh.axis_names):
        moved = np.moveaxis(ids, i, -1).reshape(-1, ids.shape[i])
        axis_of[frozenset(tuple(sorted(g)) for g in moved.tolist())] = name
    found = []
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(2)
            continue
        m = re.search(r"=\s*(.*?)\s(" + "|".join(OPS) + r")(-start)?\(", line)
        if not m or "-done" in line:
            continue
        result, op = m.group(1), m.group(2)
        size = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                   for t, dims in _SHAPE.findall(result))
        groups = re.search(r"replica_groups=\{(\{[0-9,{} ]*\})\}", line)
        named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
        axis = "?"
        if named:  # XLA's mesh form: mesh['axis_0'=2,'axis_1'=2] {'axis_1'}: its non-trivial axes are ours, in order
            sizes = [(a, int(n)) for a, n in re.findall(r"'([^']+)'=(\d+)", named.group(1))]
            theirs = [a for a, n in sizes if n > 1]
            ours = [a for a in mesh.axis_names if mesh.shape[a] > 1]
            reduced = [a for a in re.findall(r"'([^']+)'", named.group(2)) if a in theirs]
            if not reduced:
                continue  # over axes of one device: moves nothing
            if len(theirs) == len(ours) and [dict(sizes)[a] for a in theirs] == [mesh.shape[a] for a in ours]:
                names = [ours[theirs.index(a)] for a in reduced]
                axis = names[0] if len(names) == 1 else "all" if len(names) == len(ours) else "+".join(names)
        elif groups:
            sets = frozenset(tuple(sorted(int(x) for x in g.split(",") if x.strip()))
                             for g in re.findall(r"\{([0-9, ]*)\}", groups.group(1)))
            if all(len(g) <= 1 for g in sets):
                continue  # groups of one device: moves nothing
            axis = axis_of.get(sets, "all" if len(sets) == 1 else "?")
        elif "replica_groups={}" in line:
            axis = "all"
        found.append({"op": op, "axis": axis, "bytes": size, "times": counts.get(current, 1)})
    return found


def collective_bytes(found: list[dict]) -> int:
    """The bytes :func:`hlo_collectives`' collectives produce in one call of their program (each times it runs)."""
    return sum(f["bytes"] * f["times"] for f in found)


def describe(plans: list[Plan], extra: list[dict] | None = None) -> list[dict]:
    rows = [p.row() for p in plans]
    for row, more in zip(rows, extra or []):
        row.update(more)
    return rows

def widest_split(model, devices: int, most: int | None = None) -> int:
    """The largest model axis (at most ``most``, default ``devices``) that divides ``devices``, the model's heads
    (GPT-2 small's 12 heads on 8 devices: 4) and a Llama's SwiGLU width (the GPT's 4C divides as its heads do)."""
    cfg = model.cfg
    sizes = [cfg.n_head, getattr(cfg, "n_kv_head", cfg.n_head), getattr(cfg, "hidden", cfg.n_head)]
    return max(m for m in range(1, (most or devices) + 1) if devices % m == 0 and all(s % m == 0 for s in sizes))


def default_stages(model, devices: int) -> int:
    """The most pipeline stages that divide both ``devices`` and the model's blocks."""
    return max(p for p in range(1, devices + 1) if devices % p == 0 and model.cfg.n_layer % p == 0)


def report(model, devices: int, *, schemes=None, model_parallel: int | None = None, batch: int = 1,
           T: int | None = None, check: bool = False, optimizer: str = "adamw", stages: int | None = None,
           micro_batches: int | None = None, schedule: str = "1f1b") -> dict:
    """Every scheme's plan on ``devices`` (``tp``: ``model_parallel``, default the widest split of the heads that
    divides ``devices``; ``fsdp+tp``: ``model_parallel``, default the widest up to 2), XLA's figures beside the plans
    that compile (``check``), and the largest model of :data:`FAMILY` that fits each device size under each scheme.
    ``optimizer``: the name of the optimiser (:data:`jnnex.optim.OPTIMIZERS`, at its default settings) whose state is
    planned and compiled; ``schedule``: the pipeline's (pp). ``{"rows", "family", "table"}``."""
    from jnnex.bench.harness import table

    opt = optim.make_optimizer(optim.TrainConfig(optimizer=optimizer))

    rows, family = [], []
    T = model.block_size if T is None else T
    schemes = schemes_for(model) if schemes is None else schemes
    stages = default_stages(model, devices) if stages is None else stages
    for scheme in schemes:
        m = None if scheme in ("dp", "fsdp", "pp", "ep") else (model_parallel or widest_split(
            model, devices, None if scheme == "tp" else 2))
        p = plan(model, scheme, devices, model_parallel=m, batch=batch, T=T, optimizer=opt, stages=stages,
                 micro_batches=micro_batches, schedule=schedule)
        row = p.row()
        if check and scheme != "fsdp+tp":
            if p.total > XLA_COUNTS:  # (XLA's heap simulator aborts the process past its 64-bit byte counts)
                raise ValueError(f"plan --check: {scheme} needs about {p.total / GB:,.0f} GB per device (the plan), "
                                 f"more than XLA's memory analysis can count (its temporaries ran to ~3x the plan's "
                                 f"figure at these sizes, and it counts bytes in 64 bits): nothing compiled. Without "
                                 f"--check the plan is printed; or give a smaller --block or --batch-size")
            xla = xla_check(model, scheme, devices, model_parallel=m, batch=batch, T=T, optimizer=opt,
                            stages=stages, micro_batches=micro_batches, schedule=schedule)
            row.update({"xla_arguments": xla["arguments"] / GB, "xla_temporaries": xla["temporaries"] / GB,
                        "xla_outputs": xla["outputs"] / GB,
                        "resident/xla_args": (p.params + p.optimizer) / xla["arguments"],
                        "step/xla_temp": (p.grads + p.gathered + p.activations) / xla["temporaries"],
                        "xla_comm_GB": xla["comm"] / GB,
                        **({"comm/xla_comm": (p.comm_jnnex or p.comm) / xla["comm"]} if xla["comm"] else {})})
        rows.append(row)
        if scheme == "ep":  # (the family is dense GPTs)
            continue
        fits = largest_fitting_each(devices, scheme, DEVICE_SIZES.values(), model_parallel=m, batch=batch, T=T,
                                    optimizer=opt, stages=stages, micro_batches=micro_batches, schedule=schedule)
        family.append({"scheme": scheme, "mesh": row["mesh"],
                       **{label: name or "none" for label, name in zip(DEVICE_SIZES, fits)}})
    cols = ["scheme", "mesh", "params", "grads", "optimizer", "gathered", "activations", "total_GB", "comm_GB"]
    if "pp" in schemes:
        cols += ["comm_jnnex_GB", "bubble"]
    if check:
        cols += ["xla_arguments", "xla_temporaries", "resident/xla_args", "step/xla_temp", "xla_comm_GB",
                 "comm/xla_comm"]
    n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0))))
    text = (f"{model.name}, {n:,} parameters, on {devices} devices: GB per device, float32, {optimizer}, {batch} x "
            f"{T} tokens per data shard\n\n{table(rows, cols)}")
    if family:  # (none for ep alone: the family is dense GPTs)
        text += (f"\n\nThe largest of the GPT-2/GPT-3 shapes that fits one device (this micro-batch, vocabulary "
                 f"50,304):\n\n{table(family, ['scheme', 'mesh', *DEVICE_SIZES])}")
    if check:
        text += ("\n\nxla_*: XLA's memory analysis of the compiled step (arguments: parameters, optimiser state, batch; "
                 "temporaries: gradients, gathered copies, activations, the optimiser's intermediates). The plan's "
                 "resident bytes are the arguments to the batch's; its step bytes are what the hand-written step keeps, which "
                 "XLA's temporaries exceed where it holds intermediates of its own and undercut where it fuses a cache "
                 "away. xla_comm: the bytes the compiled step's collectives produce on a device (a loop's each time it "
                 "runs), against the formula's (jnnex's program's, for pp).")
    return {"rows": rows, "family": family, "table": text}
