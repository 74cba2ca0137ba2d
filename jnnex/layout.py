"""One parallel value: how a training run lays itself over devices.

A :class:`Parallel` is what a user asks for — a scheme and its sizes (``jnnex train --devices N``, with
``--shard-params`` or ``--model-parallel M``, or ``--parallel NAME``). :func:`make_layout` turns it, with the model,
the optimiser and the shapes of a training state, into a :class:`Layout`: the mesh, the training state's shardings,
the step, and the moves of the state onto the devices and back. :func:`jnnex.train.fit` takes that one value and
never branches on the scheme; the run driver records the :class:`Parallel` in ``metrics.json``.

:data:`SCHEMES` is the one place the schemes are listed — a scheme is a function ``(model, optimizer, parallel,
ts_like, *, diagnostics) -> Layout`` and a row here. A new one (pipeline stages, experts) is its own module and one
row; ``fit``, the run driver and the command line pick it up by name.

* ``single`` — one device: the step as it is;
* ``dp`` — data parallel in the global view (:mod:`jnnex.parallel`): the batch split along ``"data"``, everything
  else replicated;
* ``fsdp`` — ZeRO-3 / FSDP: the parameters and optimiser state split along ``"data"`` too, gathered for the step;
* ``tp`` — Megatron's tensor parallelism on a ``data × model`` mesh (:mod:`jnnex.tensor_parallel`): the model's own
  forward and backward on each device's slices;
* ``ep`` — expert parallelism (:mod:`jnnex.expert_parallel`): a mixture of experts' experts split over the
  ``"data"`` axis with the batch, the tokens exchanged with ``all_to_all``;
* ``pp`` — pipeline parallelism on a ``data × stage × model`` mesh (:mod:`jnnex.pipeline`): the blocks cut into
  ``stages``, each device's rows into ``micro_batches``, run by the ``schedule`` (GPipe, 1F1B or alternating); with
  ``model_parallel`` each stage's blocks split Megatron's way too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jnnex import expert_parallel, parallel, pipeline, tensor_parallel
from jnnex.step import make_run, make_step


def _same(ts):
    return ts


@dataclasses.dataclass(frozen=True)
class Parallel:
    """What a user asks for: a scheme of :data:`SCHEMES` over ``devices`` (a number, a device list or a mesh; ``None``:
    one device), with a model axis of ``model_parallel`` devices for the schemes that split the model (tp, pp), and
    for a pipeline (pp) its ``stages``, ``micro_batches`` and ``schedule`` (``"1f1b"`` by default, ``"gpipe"`` or
    ``"alternating"``)."""

    scheme: str = "single"
    devices: int | Sequence | jax.sharding.Mesh | None = None
    model_parallel: int | None = None
    stages: int | None = None
    micro_batches: int | None = None
    schedule: str | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"parallel: the scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.scheme != "single" and self.devices is None:
            raise ValueError(f"parallel: {self.scheme} splits over devices: give devices too (--devices N)")
        if self.scheme == "single" and self.devices is not None:
            raise ValueError(f"parallel: single is one device, but devices {self.devices!r} were given: drop them, or "
                             f"name a scheme that splits ({', '.join(s for s in SCHEMES if s != 'single')})")
        if self.scheme == "tp" and self.model_parallel is None:
            raise ValueError("parallel: tp splits each block over a model axis: give its size too "
                             "(model_parallel, --model-parallel M)")
        if self.model_parallel is not None and self.scheme not in ("tp", "pp"):
            raise ValueError(f"parallel: model_parallel is the model axis of tp (and pp), not of {self.scheme}")
        piped = {"stages": self.stages, "micro_batches": self.micro_batches, "schedule": self.schedule}
        if self.scheme != "pp" and any(v is not None for v in piped.values()):
            raise ValueError(f"parallel: {', '.join(k for k, v in piped.items() if v is not None)} belong to the "
                             f"pipeline (pp), not to {self.scheme}")
        if self.scheme == "pp" and (self.stages is None or self.micro_batches is None):
            raise ValueError("parallel: pp cuts the blocks into stages and the batch into micro-batches: give both "
                             "(stages, micro_batches; --stages P --micro-batches M)")
        if self.scheme == "pp":
            pipeline.schedule(self.schedule or "1f1b", self.stages, self.micro_batches)  # (named errors)

    @classmethod
    def from_flags(cls, devices=None, shard_params: bool = False, model_parallel: int | None = None,
                   scheme: str | None = None, stages: int | None = None, micro_batches: int | None = None,
                   schedule: str | None = None) -> Parallel:
        """The scheme the command line's flags name: ``--parallel NAME`` as given, else ``--stages P`` (pp, with
        ``--model-parallel M`` too if given), ``--model-parallel M`` (tp), ``--shard-params`` (fsdp), ``--devices N``
        alone (dp), nothing (single); a clear error for a mix."""
        piped = stages is not None or micro_batches is not None or schedule is not None
        if piped and scheme in (None, "pp"):
            if shard_params:
                raise ValueError("--shard-params and --stages together (FSDP × pipeline) are not a training mode yet: "
                                 "choose one")
            if devices is None:
                raise ValueError("--stages cuts the blocks over devices: give --devices N too (a multiple of the "
                                 "stages)")
            return cls("pp", devices, model_parallel, stages, micro_batches, schedule)
        if piped:
            raise ValueError(f"--parallel {scheme} and --stages/--micro-batches/--pipeline-schedule (a pipeline) "
                             "name two schemes: give one")
        if scheme == "pp":
            return cls("pp", devices, model_parallel)  # (names the missing stages and micro-batches)
        if shard_params and model_parallel is not None:
            raise ValueError("shard_params and model_parallel together (FSDP × tensor parallel) are not a training "
                             "mode yet: choose one (jnnex plan shows both on paper)")
        if shard_params and devices is None:
            raise ValueError("--shard-params splits the parameters over devices: give --devices N too")
        if model_parallel is not None and devices is None:
            raise ValueError("--model-parallel splits each block over devices: give --devices N too (a multiple of "
                             "it)")
        implied = "tp" if model_parallel is not None else "fsdp" if shard_params else None
        if scheme is not None and implied is not None and scheme != implied:
            raise ValueError(f"--parallel {scheme} and --{'model-parallel' if implied == 'tp' else 'shard-params'} "
                             "name two schemes: give one")
        if scheme is None:
            scheme = implied or ("dp" if devices is not None else "single")
        return cls(scheme, devices, model_parallel)

    def record(self) -> dict:
        """What ``metrics.json`` says of the layout a run trained on (nothing for one device)."""
        if self.scheme == "single":
            return {}
        devices = self.devices if isinstance(self.devices, int) else np.size(getattr(self.devices, "devices",
                                                                                    self.devices))
        out = {"parallel": self.scheme, "devices": devices, "processes": jax.process_count(),
               "shard_params": self.scheme == "fsdp", "model_parallel": self.model_parallel or 1}
        if self.scheme == "pp":
            out.update(stages=self.stages, micro_batches=self.micro_batches, pipeline_schedule=self.schedule or "1f1b")
        return out


@dataclasses.dataclass(frozen=True)
class Layout:
    """A training run laid over devices: everything :func:`jnnex.train.fit` needs of the scheme, as one value.

    Attributes:
        optimizer: the optax optimiser the step applies (``fit`` initialises its state).
        step: ``step(ts, batch, key) -> (ts, metrics)`` in this layout.
        mesh: the devices (``None``: one device, nothing placed).
        shardings: the training state's shardings on ``mesh`` (a tree like the state), or ``None``: replicated.
        to_devices, to_host: a host training state (the parameters' own layout) to this layout's, and back (a
            split model reorders its columns, a pipeline stacks its blocks; the identity otherwise).
        micro_batches: what each data shard's rows are cut into (a pipeline's; 1 otherwise): the batch must divide
            by the data axis times this.
    """

    optimizer: Any
    step: Callable
    mesh: jax.sharding.Mesh | None = None
    shardings: Any = None
    to_devices: Callable = _same
    to_host: Callable = _same
    micro_batches: int = 1

    def run(self, batch_size: int | None, window: int | None = None) -> Callable:
        """:func:`jnnex.step.make_run` of this layout's step, its batch split over the mesh."""
        return make_run(self.step, batch_size, mesh=self.mesh, window=window, state_shardings=self.shardings)

    def place(self, ts):
        """A host training state onto the devices, in this layout (any layout's checkpoint resumes into any other)."""
        if self.mesh is None:
            return ts
        host = self.to_devices(parallel.local(ts))
        return parallel.replicate(host, self.mesh) if self.shardings is None else parallel.place(host, self.shardings)

    def here(self, ts):
        """The training state as this process holds it, in the parameters' own layout: what evaluation and files
        read."""
        if self.mesh is None:
            return ts
        return jax.tree.map(jnp.asarray, self.to_host(parallel.local(ts)))

    def inputs(self, *arrays):
        """The step's inputs (the data, the key's bits), replicated over the mesh; as they are on one device."""
        if self.mesh is None:
            return arrays
        return parallel.replicate(tuple(np.asarray(a) for a in arrays), self.mesh)

    def check(self, ts_like, batch_size: int | None, n_examples: int, what: str) -> None:
        """Clear errors, before anything is placed: a batch the data axis does not divide, a state too large for the
        devices."""
        if self.mesh is None:
            return
        d, mb = self.mesh.shape[parallel.DATA], self.micro_batches
        parallel.check_batch_size(batch_size, d, n_examples)
        rows = n_examples if batch_size is None else batch_size
        if rows % (d * mb):
            raise ValueError(f"pipeline: the micro-batches ({mb}) must divide each data shard's rows ({rows // d} of "
                             f"the {'batch_size' if batch_size is not None else 'full batch'}'s {rows}): choose a "
                             f"batch that divides by data {d} × micro-batches {mb} = {d * mb}")
        parallel.check_state_fits(jax.eval_shape(self.to_devices, ts_like), self.shardings, self.mesh, what=what)


# ----------------------------------------------------------------------------------------------------------------------
# The schemes


def single(model, optimizer, par: Parallel, ts_like, *, diagnostics: bool = False) -> Layout:
    """One device: the step as it is."""
    return Layout(optimizer, make_step(model, optimizer, diagnostics=diagnostics))


def data_parallel(model, optimizer, par: Parallel, ts_like, *, diagnostics: bool = False) -> Layout:
    """Data parallel in the global view: the same step, the batch split along ``"data"``, the state replicated."""
    return Layout(optimizer, make_step(model, optimizer, diagnostics=diagnostics), parallel.data_mesh(par.devices))


def fsdp(model, optimizer, par: Parallel, ts_like, *, diagnostics: bool = False) -> Layout:
    """ZeRO-3 / FSDP: the parameters and optimiser state split along ``"data"``, gathered whole for each step's
    forward and backward, the gradients split back (:func:`jnnex.parallel.fsdp_layout`)."""
    mesh = parallel.data_mesh(par.devices)
    shardings, step_shardings = parallel.fsdp_layout(ts_like, mesh)
    return Layout(optimizer, make_step(model, optimizer, diagnostics=diagnostics, shardings=step_shardings), mesh,
                  shardings)


def tensor(model, optimizer, par: Parallel, ts_like, *, diagnostics: bool = False) -> Layout:
    """Megatron's tensor parallelism on a ``devices / model_parallel × model_parallel`` mesh: the model's split rules
    lay the parameters out, its own forward and backward run on each device's slices
    (:func:`jnnex.tensor_parallel.split_step`)."""
    devices, m = par.devices, par.model_parallel
    tensor_parallel.rules_of(model)  # (a model without a split: named first)
    if not (isinstance(devices, int) and isinstance(m, int) and m >= 1 and devices % m == 0):
        raise ValueError(f"model_parallel {m!r}: give devices as a number that divides by it (the mesh is devices / "
                         f"model_parallel × model_parallel), got devices {devices!r}")
    mesh = tensor_parallel.mesh_2d(devices // m, m)
    to_devices, to_host, shardings = tensor_parallel.train_layout(model, optimizer, mesh, ts_like)
    step = tensor_parallel.split_step(model, optimizer, mesh, ts_like.params, diagnostics=diagnostics)
    return Layout(optimizer, step, mesh, shardings, to_devices, to_host)


def pipelined(model, optimizer, par: Parallel, ts_like, *, diagnostics: bool = False) -> Layout:
    """Pipeline parallelism on a ``devices / (stages · model_parallel) × stages × model_parallel`` mesh: the blocks
    cut into stages, the rows into micro-batches, run by the schedule (:func:`jnnex.pipeline.pipeline_step`)."""
    if diagnostics:
        raise ValueError("pipeline: diagnostics are not read from a pipelined step yet (its activations stay on "
                         "their stages): train with --parallel tp or dp to read them")
    devices, m, stages = par.devices, par.model_parallel or 1, par.stages
    pipeline.check_pipeline(model, stages)
    if not (isinstance(devices, int) and devices % (stages * m) == 0):
        raise ValueError(f"pipeline: devices ({devices!r}) must be a number that divides by stages × model_parallel "
                         f"({stages} × {m}): the mesh is data × stage × model")
    mesh = pipeline.mesh_3d(devices // (stages * m), stages, m)
    sched = pipeline.schedule(par.schedule or "1f1b", stages, par.micro_batches)
    to_devices, to_host, shardings = pipeline.train_layout(model, optimizer, mesh, ts_like)
    step = pipeline.pipeline_step(model, optimizer, mesh, sched, ts_like.params)
    return Layout(optimizer, step, mesh, shardings, to_devices, to_host, par.micro_batches)


def experts(model, optimizer, par: Parallel, ts_like, *, diagnostics: bool = False) -> Layout:
    """Expert parallelism over a ``("data",)`` mesh (:mod:`jnnex.expert_parallel`): each device its rows and
    ``n_expert / devices`` experts, the tokens exchanged with ``all_to_all``; the rest data parallel."""
    if not isinstance(par.devices, int):
        raise ValueError(f"expert parallelism: give devices as a number, got {par.devices!r}")
    expert_parallel.check_experts(model, par.devices)
    mesh = parallel.data_mesh(par.devices)
    shardings = expert_parallel.train_layout(model, optimizer, mesh, ts_like)
    step = expert_parallel.split_step(model, optimizer, mesh, ts_like.params, diagnostics=diagnostics)
    return Layout(optimizer, step, mesh, shardings)


SCHEMES: dict[str, Callable[..., Layout]] = {"single": single, "dp": data_parallel, "fsdp": fsdp, "tp": tensor,
                                             "pp": pipelined, "ep": experts}


def make_layout(par: Parallel, model, optimizer, ts_like, *, diagnostics: bool = False) -> Layout:
    """The :class:`Layout` of ``par``'s scheme for ``model`` and ``optimizer``; ``ts_like``: the training state's
    tree (shapes will do)."""
    return SCHEMES[par.scheme](model, optimizer, par, ts_like, diagnostics=diagnostics)
