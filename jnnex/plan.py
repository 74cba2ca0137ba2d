"""A memory plan: what training a transformer holds on each device under each way of splitting it, before anything
is allocated — and XLA's own figures for the same step beside it, where it compiles.

For ``devices`` devices, one of four schemes (``model_parallel`` ``M`` for the last two):

* ``dp``      — data parallel: every device a whole copy of the parameters, gradients and optimiser state;
* ``fsdp``    — ZeRO-3 / FSDP (``jnnex train --shard-params``): parameters, gradients and moments split ``1/N``
  (:func:`jnnex.parallel.fsdp_spec`), and during the step the whole parameters and gradients *gathered* — at once,
  as jnnex's global-view step compiles; a layer-by-layer gather (PyTorch FSDP's) would hold one block instead;
* ``tp``      — Megatron's tensor parallelism over ``M`` devices (``--model-parallel M``; :mod:`jnnex.tensor_parallel`):
  every block's matrices ``1/M``, the embeddings, norms and head whole; activations inside a block split too;
* ``fsdp+tp`` — on paper only (not a training mode yet): the tensor-parallel slices, split ``1/(N/M)`` again by FSDP.

Per device, in bytes: **parameters**, **gradients**, **optimizer** (the optimiser's state, read by shape from the
optimiser: AdamW's two float32 moments by default), **gathered** (FSDP's
transient whole copies), **activations** (one step's forward caches at the device's micro-batch, read off shapes:
``jax.eval_shape`` of the very forward that trains — the split one under ``jax.vmap`` over a stand-in model axis — and
the logits three times: themselves, their softmax, their gradient). Everything is float32 (the parameters' dtype).

:func:`xla_check` compiles the step for the scheme (on forced CPU devices; never run, nothing allocated: its
arguments are shapes) and reads ``memory_analysis()``: arguments (parameters + optimiser state + batch), outputs
(the new state: a step does not donate its input), temporaries (gradients, gathered copies, activations).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jnnex import optim, parallel, tensor_parallel
from jnnex.memory import nbytes
from jnnex.models.registry import get_spec

SCHEMES = ("dp", "fsdp", "tp", "fsdp+tp")
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

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations

    def row(self) -> dict:
        return {"scheme": self.scheme, "mesh": f"{self.data} x {self.model}",
                **{k: getattr(self, k) / GB for k in ("params", "grads", "optimizer", "gathered", "activations")},
                "total_GB": self.total / GB}


def build_model(name: str = "gpt", preset: str | None = "gpt2-124m", **over):
    """A registered model at a preset's shape (its vocabulary from ``over``, default GPT-2's padded 50,304)."""
    spec = get_spec(name)
    if preset is not None and preset not in spec.presets:
        raise ValueError(f"plan: model {name!r} has no preset {preset!r}; it has {sorted(spec.presets)}")
    shape = dict(spec.presets[preset][0]) if preset is not None else {}
    return spec.build(spec.config(**{"vocab_size": 50_304, **shape, **over}))


def axes(scheme: str, devices: int, model_parallel: int | None) -> tuple[int, int]:
    """``(data, model)`` devices of ``scheme`` on ``devices``; a clear error for what does not fit together."""
    if scheme not in SCHEMES:
        raise ValueError(f"plan: --parallel must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if not (isinstance(devices, int) and devices >= 1):
        raise ValueError(f"plan: --devices must be an integer >= 1, got {devices!r}")
    if scheme in ("dp", "fsdp"):
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
    tensor_parallel.rules_of(model)  # (a model without a split: named)
    one, two = (_row_bytes(model.name, dataclasses.replace(model.cfg, n_layer=n), T, m) for n in (1, 2))
    return batch * (one + (model.cfg.n_layer - 1) * (two - one))


@functools.cache
def _row_bytes(name: str, cfg, T: int, m: int) -> int:
    """The bytes one row adds to the activations of model ``name`` at ``cfg`` (read off traced shapes: a pure function
    of its arguments, so each is traced once a process — the schemes with the same model axis, ``dp`` and ``fsdp``,
    plan the same activations)."""
    model = get_spec(name).build(cfg)
    params = _param_shapes(name, cfg)
    local = jax.tree.map(lambda p: jax.ShapeDtypeStruct((m, *p.shape), p.dtype), _tp_shapes(model, params, m))
    tensor_parallel.check_split(model, m)
    split = dataclasses.replace(model, cfg=dataclasses.replace(cfg, model_axis=tensor_parallel.MODEL))

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


def plan(model, scheme: str, devices: int, *, model_parallel: int | None = None, batch: int = 1,
         T: int | None = None, optimizer=None) -> Plan:
    """The per-device memory of training ``model`` under ``scheme`` on ``devices`` devices, ``batch`` sequences of
    ``T`` tokens (default: the model's block) per data shard, with ``optimizer`` (an optax transformation; default
    AdamW) — its state read from the optimiser itself, by shape, over a device's slice of the parameters
    (:func:`jnnex.optim.state_shapes`: SGD keeps nothing, AdamW two moments, Muon one momentum per matrix)."""
    d, m = axes(scheme, devices, model_parallel)
    T = model.block_size if T is None else T
    optimizer = adamw_if_none(optimizer)
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
    return Plan(scheme, d, m, held, held, resident(state), gathered, activation_bytes(model, batch, T, m))


def largest_fitting(devices: int, scheme: str, size: float, *, model_parallel: int | None = None,
                    batch: int = 1, T: int = 1024, vocab: int = 50_304) -> str | None:
    """The largest of :data:`FAMILY` whose plan fits ``size`` bytes a device (``None``: not even the smallest)."""
    return largest_fitting_each(devices, scheme, [size], model_parallel=model_parallel, batch=batch, T=T,
                                vocab=vocab)[0]


def largest_fitting_each(devices: int, scheme: str, sizes, *, model_parallel: int | None = None, batch: int = 1,
                         T: int = 1024, vocab: int = 50_304, optimizer=None) -> list[str | None]:
    """:func:`largest_fitting` for each of ``sizes``, each family member planned once."""
    best = [None] * len(sizes)
    m = axes(scheme, devices, model_parallel)[1]
    for name, shape in FAMILY.items():
        if shape["n_head"] % m or (4 * shape["n_embd"]) % m:
            continue
        model = build_model("gpt", None, vocab_size=vocab, block_size=T, bias=True, tie=True, **shape)
        total = plan(model, scheme, devices, model_parallel=model_parallel, batch=batch, T=T,
                     optimizer=optimizer).total
        best = [name if total <= size else b for b, size in zip(best, sizes)]
    return best


def xla_check(model, scheme: str, devices: int, *, model_parallel: int | None = None, batch: int = 1,
              T: int | None = None, optimizer=None) -> dict:
    """XLA's memory analysis of the training step for ``scheme`` with ``optimizer`` (default AdamW), compiled for
    ``devices`` of ``jax.devices()`` from shapes alone: ``{"arguments", "outputs", "temporaries"}`` bytes per
    device."""
    from jnnex.train import init_train_state, make_step

    d, m = axes(scheme, devices, model_parallel)
    if scheme == "fsdp+tp":
        raise ValueError("plan: fsdp+tp is on paper only (not a training mode yet): nothing to compile")
    if devices > len(jax.devices()):
        raise ValueError(f"plan --check: {devices} devices asked for, but only {len(jax.devices())} exist (on CPU, "
                         f"JAX_NUM_CPU_DEVICES={devices})")
    T = model.block_size if T is None else T
    opt = adamw_if_none(optimizer)
    ts = jax.eval_shape(lambda k: init_train_state(model, opt, k), jax.random.key(0))
    rep_of = lambda mesh: jax.sharding.NamedSharding(mesh, P())  # noqa: E731
    if m > 1:
        mesh = tensor_parallel.mesh_2d(d, m)
        _, _, layout = tensor_parallel.train_layout(model, opt, mesh, ts)
        step = tensor_parallel.split_step(model, opt, mesh, ts.params)
    else:
        mesh = parallel.data_mesh(devices)
        rep = rep_of(mesh)
        if scheme == "fsdp":
            layout, step_shardings = parallel.fsdp_layout(ts, mesh)
            step = make_step(model, opt, shardings=step_shardings)
        else:
            layout = jax.tree.map(lambda _: rep, ts)
            step = make_step(model, opt)
    shaped = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ts, layout)
    rows = jax.ShapeDtypeStruct((batch * d, T), jnp.int32, sharding=parallel.batch_sharded(mesh))
    compiled = jax.jit(step, out_shardings=(layout, rep_of(mesh))).lower(shaped, (rows, rows), None).compile()
    mem = compiled.memory_analysis()
    return {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes)}


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


def report(model, devices: int, *, schemes=SCHEMES, model_parallel: int | None = None, batch: int = 1,
           T: int | None = None, check: bool = False, optimizer: str = "adamw") -> dict:
    """Every scheme's plan on ``devices`` (``tp``: ``model_parallel``, default the widest split of the heads that
    divides ``devices``; ``fsdp+tp``: ``model_parallel``, default the widest up to 2), XLA's figures beside the plans
    that compile (``check``), and the largest model of :data:`FAMILY` that fits each device size under each scheme.
    ``optimizer``: the name of the optimiser (:data:`jnnex.optim.OPTIMIZERS`, at its default settings) whose state is
    planned and compiled. ``{"rows", "family", "table"}``."""
    from jnnex.bench.harness import table

    opt = optim.make_optimizer(optim.TrainConfig(optimizer=optimizer))

    rows, family = [], []
    T = model.block_size if T is None else T
    for scheme in schemes:
        m = None if scheme in ("dp", "fsdp") else (model_parallel or widest_split(model, devices,
                                                                                  None if scheme == "tp" else 2))
        p = plan(model, scheme, devices, model_parallel=m, batch=batch, T=T, optimizer=opt)
        row = p.row()
        if check and scheme != "fsdp+tp":
            if p.total > XLA_COUNTS:  # (XLA's heap simulator aborts the process past its 64-bit byte counts)
                raise ValueError(f"plan --check: {scheme} needs about {p.total / GB:,.0f} GB per device (the plan), "
                                 f"more than XLA's memory analysis can count (its temporaries ran to ~3x the plan's "
                                 f"figure at these sizes, and it counts bytes in 64 bits): nothing compiled. Without "
                                 f"--check the plan is printed; or give a smaller --block or --batch-size")
            xla = xla_check(model, scheme, devices, model_parallel=m, batch=batch, T=T, optimizer=opt)
            row.update({"xla_arguments": xla["arguments"] / GB, "xla_temporaries": xla["temporaries"] / GB,
                        "xla_outputs": xla["outputs"] / GB,
                        "resident/xla_args": (p.params + p.optimizer) / xla["arguments"],
                        "step/xla_temp": (p.grads + p.gathered + p.activations) / xla["temporaries"]})
        rows.append(row)
        fits = largest_fitting_each(devices, scheme, DEVICE_SIZES.values(), model_parallel=m, batch=batch, T=T,
                                    optimizer=opt)
        family.append({"scheme": scheme, "mesh": row["mesh"],
                       **{label: name or "none" for label, name in zip(DEVICE_SIZES, fits)}})
    cols = ["scheme", "mesh", "params", "grads", "optimizer", "gathered", "activations", "total_GB"]
    if check:
        cols += ["xla_arguments", "xla_temporaries", "resident/xla_args", "step/xla_temp"]
    n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0))))
    text = (f"{model.name}, {n:,} parameters, on {devices} devices: GB per device, float32, {optimizer}, {batch} x "
            f"{T} tokens per data shard\n\n{table(rows, cols)}\n\nThe largest of the GPT-2/GPT-3 shapes that fits one device"
            f" (this micro-batch, vocabulary 50,304):\n\n{table(family, ['scheme', 'mesh', *DEVICE_SIZES])}")
    if check:
        text += ("\n\nxla_*: XLA's memory analysis of the compiled step (arguments: parameters, optimiser state, batch; "
                 "temporaries: gradients, gathered copies, activations, the optimiser's intermediates). The plan's "
                 "resident bytes are the arguments to the batch's; its step bytes are what the hand-written step keeps, which "
                 "XLA's temporaries exceed where it holds intermediates of its own and undercut where it fuses a cache "
                 "away.")
    return {"rows": rows, "family": family, "table": text}
