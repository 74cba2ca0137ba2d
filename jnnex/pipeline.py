"""Pipeline parallelism (GPipe, Huang et al. 2019; 1F1B, PipeDream-Flush, Narayanan et al. 2021), written out on the
model's one definition.

The ``n_layer`` blocks are cut into ``P`` **stages** of ``n_layer / P`` consecutive blocks, one stage per device of
the mesh's ``"stage"`` axis; the first stage also embeds the tokens, the last also runs the final norm, the head and
the loss. Each device's share of the batch is cut into ``M`` **micro-batches**. A micro-batch's activations go
forward from stage to stage (``jax.lax.ppermute`` to the next device), its gradients come back the same way (to the
previous device); each stage runs the model's own :class:`jnnex.lm.Pipe` pairs — its blocks' ``block_forward`` and
``block_backward``, the embedding's and the head's pairs — and nothing else.

**A schedule** (:class:`Schedule`) says what each stage does at each clock tick: the forward of micro-batch ``m``,
its backward, or nothing (the **bubble**). GPipe and 1F1B take ``2 (M + P − 1)`` ticks, each stage busy for ``2M``
of them, so the idle fraction is ``(P − 1) / (M + P − 1)``; they differ in memory:

* ``gpipe`` — every forward, then every backward: a stage holds the caches of all ``M`` micro-batches at once;
* ``1f1b`` — stage ``s`` runs ``P − 1 − s`` forwards, then alternates one forward and one backward, then drains the
  backwards: it never holds more than ``P − s`` micro-batches' caches;
* ``alternating`` — 1F1B for a lockstep program: every stage's forwards at even ticks and backwards at odd ones,
  ``2 (P − 1 − s) + 1`` forwards before the first backward; stage 0 holds ``2P − 1`` micro-batches.

The program below is one SPMD program, and every tick ends in a ``ppermute`` between neighbouring stages, so a tick
lasts as long as the slowest work among a stage and its neighbours (:meth:`Schedule.replay` with ``lockstep``). With
equal stages GPipe idles the formula's fraction in lockstep too (a tick is all forwards or all backwards), and so
does ``alternating``; 1F1B, whose steady state pairs one stage's forward with its neighbour's backward, idles more —
its ticks last a backward each. ``alternating`` trades ``2P − 1`` micro-batches' memory for the formula's bubble.
Or a backward is cut into ticks (``parts``, ``--pipeline-schedule 1f1b/2``): each tick the backward of ``1/parts``
of the stage's blocks, the gradient so far kept in its slot between them; a backward twice a forward then fits two
ticks of a forward's length, and 1F1B idles the formula's fraction in lockstep at its own memory (more ticks: more
sends). Devices that each run their own programs (MPMD: Megatron-LM's processes) run 1F1B at the formula's bubble
whatever a forward and a backward take: :func:`host_value_and_grad` is that runtime, the same stage functions as
each stage's own compiled programs on its device, dispatched by the host in the table's order.

The schedule is data (a table, built by simulating each stage's order of work against the dependencies), and one
compiled program runs any table: a ``lax.scan`` over the ticks in which each device reads its own action and takes
that branch (``lax.switch``: an idle stage computes nothing), then every device sends what it produced. A stage keeps
its micro-batches' caches in a buffer of as many slots as the schedule ever holds at once (:attr:`Schedule.slots`):
that is where GPipe's ``M`` against 1F1B's ``P`` shows in XLA's memory accounting.

The mesh is ``data × stage × model`` (:func:`mesh_3d`): the batch split along ``"data"``, the blocks along
``"stage"``, each block along ``"model"`` (Megatron's tensor parallelism, :mod:`jnnex.tensor_parallel`: the model
runs with ``model_axis="model"``). The loss is the mean over the whole batch: each micro-batch's cross-entropy seeds
its backward with its share of the batch's targets (``n_m / n``). The block gradients are summed over ``"data"``,
the embedding's and head's over ``"data"`` and ``"stage"`` (a tied table gets its two uses, first and last stage,
added: Megatron's embedding all-reduce).

In the devices' layout the blocks are stacked, ``(n_layer, ...)`` per tensor, split along ``"stage"``
(:func:`stack_blocks`). Each device runs the optimiser on its own stage's blocks, one block at a time
(:func:`stage_update`: a global-norm clip's norm summed over the stages), so every optimiser and mask behaves as on
one device and no block leaves its stage; with a model axis the optimiser sees the parameters' own tree in the
global view (:func:`per_block`), where Muon sees whole matrices. Dropout is not pipelined yet (a clear error): its
masks are drawn per batch, and a micro-batch would draw different ones.

A mixture of experts (the Llama's ``n_expert``) routes, fills its capacity and counts its balancing loss per
micro-batch on each data shard, the balancing losses averaged over them: Megatron-LM's objective under a pipeline,
since under 1F1B the first backward starts before the batch's last forward, when the whole batch's expert loads are
not yet known. On one device that objective is :func:`jnnex.lm.grouped_objective`, and the pipeline equals it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jnnex import tensor_parallel
from jnnex.collectives import MODEL
from jnnex.layers import (
    combine_static, compute_params, cross_entropy_backward, cross_entropy_forward, keep, param_grads, partition_static,
    recomputed,
)
from jnnex.lm import LanguageModel, grouped_config, merge_grads
from jnnex.parallel import DATA

STAGE = "stage"  # the mesh axis the blocks are cut along
FORWARD, BACKWARD = "F", "B"


# ----------------------------------------------------------------------------------------------------------------------
# Schedules: what each stage does at each tick


def _orders_gpipe(P: int, M: int) -> list[list[tuple[str, int]]]:
    return [[(FORWARD, m) for m in range(M)] + [(BACKWARD, m) for m in range(M)] for _ in range(P)]


def _orders_1f1b(P: int, M: int, warm_up: Callable[[int], int] | None = None) -> list[list[tuple[str, int]]]:
    """Stage ``s``: ``warm_up(s)`` forwards (1F1B's ``P − 1 − s``), then one forward and one backward in turn, then
    the backwards left."""
    orders = []
    for s in range(P):
        warm = min(P - 1 - s if warm_up is None else warm_up(s), M)  # forwards before the steady state
        order = [(FORWARD, m) for m in range(warm)]
        for i in range(M - warm):  # the steady state: one forward, one backward
            order += [(FORWARD, warm + i), (BACKWARD, i)]
        orders.append(order + [(BACKWARD, m) for m in range(M - warm, M)])  # the drain
    return orders


def _orders_alternating(P: int, M: int) -> list[list[tuple[str, int]]]:
    """1F1B's order with the warm-up a lockstep program needs: stage ``s`` runs ``2 (P − 1 − s) + 1`` forwards before
    its first backward — the ticks a micro-batch takes to reach the last stage and its gradient to come back, when
    forwards and backwards take turns (:func:`_simulate`'s ``alternate``)."""
    return _orders_1f1b(P, M, lambda s: 2 * (P - 1 - s))


ORDERS = {"gpipe": _orders_gpipe, "1f1b": _orders_1f1b, "alternating": _orders_alternating}
ALTERNATE = {"alternating"}  # the schedules whose ticks take turns: every stage's forwards even, backwards odd


def _needs(kind: str, s: int, m: int, P: int) -> list[tuple[str, int, int]]:
    """What stage ``s``'s ``kind`` of micro-batch ``m`` waits for, as ``(kind, stage, micro-batch)``: a forward, the
    previous stage's forward; a backward, its own forward and the next stage's backward."""
    if kind == FORWARD:
        return [(FORWARD, s - 1, m)] if s > 0 else []
    return [(FORWARD, s, m)] + ([(BACKWARD, s + 1, m)] if s < P - 1 else [])


def _simulate(orders, P: int, alternate: bool = False, parts: int = 1) -> tuple:
    """The tick table of per-stage ``orders``: at each tick a stage does its next action if what it needs was done at
    an earlier tick (a forward: the previous stage's forward of the micro-batch; a backward: its own forward and the
    next stage's backward), else waits. ``alternate``: forwards only at even ticks, backwards only at odd ones (a
    tick's work is then all forwards or all backwards, on every stage at once). ``parts``: a backward takes that many
    ticks, one after another (:class:`Schedule`'s ``parts``); it is done when its last is."""
    done: dict = {}
    pos, table = [0] * P, []
    orders = [[a for a in order for _ in range(parts if a[0] == BACKWARD else 1)] for order in orders]
    begun: dict = {}  # (stage, micro-batch): (the backward's parts done, the tick of the last)
    while any(pos[s] < len(orders[s]) for s in range(P)):
        t, row = len(table), []
        for s in range(P):
            if pos[s] == len(orders[s]):
                row.append(None)
                continue
            kind, m = orders[s][pos[s]]
            turn = not alternate or (t % 2 == 0) == (kind == FORWARD)
            if kind == BACKWARD and (s, m) in begun:  # a later part: the one before it done at an earlier tick
                ready = begun[(s, m)][1] < t
            else:
                ready = all(done.get(n, t) < t for n in _needs(kind, s, m, P))
            row.append((kind, m) if turn and ready else None)
        for s, action in enumerate(row):
            if action is None:
                continue
            pos[s] += 1
            kind, m = action
            if kind == BACKWARD:
                n_done = begun.get((s, m), (0, t))[0] + 1
                begun[(s, m)] = (n_done, t)
                if n_done < parts:
                    continue
            done[(kind, s, m)] = t
        table.append(tuple(row))
    return tuple(table)


def _slots(messages) -> int:
    """The fewest slots ``K`` a buffer needs when message ``m`` goes in slot ``m % K``: ``messages`` is ``[(m, put,
    taken)]``, put at the end of tick ``put``, taken at the start of tick ``taken``; no message may be put in a slot
    before the one there is taken."""
    if not messages:
        return 1
    for K in range(1, len(messages) + 1):
        by_slot: dict = {}
        for m, put, taken in sorted(messages, key=lambda x: x[1]):
            by_slot.setdefault(m % K, []).append((put, taken))
        if all(b[0] >= a[1] for q in by_slot.values() for a, b in zip(q, q[1:])):
            return K
    return len(messages)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: ``table[t][s]`` is stage ``s``'s action at tick ``t`` — ``("F", m)``, ``("B", m)`` or
    ``None`` (idle). ``parts``: the ticks a backward takes, one after another — the stage's blocks cut into ``parts``
    groups, the last first (``("B", m)`` appears ``parts`` times, the ``j``-th its ``j``-th group): in a lockstep
    program a tick lasts its slowest work, and a backward that is ``k`` times a forward fits ``k`` ticks of a
    forward's length."""

    name: str
    stages: int
    micro: int
    table: tuple
    parts: int = 1

    @property
    def ticks(self) -> int:
        return len(self.table)

    @property
    def label(self) -> str:
        """The name, and the ticks of a backward where they are more than one (``1f1b/2``)."""
        return self.name if self.parts == 1 else f"{self.name}/{self.parts}"

    def tick_of(self, kind: str, s: int, m: int) -> int:
        """The tick of stage ``s``'s forward or backward of micro-batch ``m`` (a backward's first part)."""
        return next(t for t, row in enumerate(self.table) if row[s] == (kind, m))

    def end_of(self, kind: str, s: int, m: int) -> int:
        """The tick where stage ``s``'s forward or backward of micro-batch ``m`` ends (a backward's last part)."""
        return max(t for t, row in enumerate(self.table) if row[s] == (kind, m))

    def part_of(self, t: int, s: int) -> int:
        """Which part of its backward stage ``s`` runs at tick ``t`` (0 for a forward, or a backward of one part)."""
        return sum(row[s] == self.table[t][s] for row in self.table[:t])

    @property
    def bubble(self) -> float:
        """The idle fraction of the stage-ticks: ``(P − 1) / (M + P − 1)`` for ``gpipe`` and ``1f1b``;
        ``alternating``'s ticks are ``2 (M + 2P − 2)``, its fill's backward ticks and its drain's forward ticks idle on
        every stage at once (they take no time: :meth:`replay`)."""
        busy = sum(a is not None for row in self.table for a in row)
        return 1 - busy / (self.ticks * self.stages)

    def held(self, s: int) -> int:
        """The most micro-batches whose caches stage ``s`` holds at once (from a forward to its backward's last
        tick)."""
        F = [self.tick_of(FORWARD, s, m) for m in range(self.micro)]
        B = [self.end_of(BACKWARD, s, m) for m in range(self.micro)]
        return max(sum(F[m] <= t <= B[m] for m in range(self.micro)) for t in range(self.ticks))

    @property
    def slots(self) -> tuple[int, int, int]:
        """``(caches, activations in, gradients in)``: the slots each buffer of a stage needs, the most over stages."""
        Pn, M = self.stages, self.micro
        cache = max(_slots([(m, self.tick_of(FORWARD, s, m), self.end_of(BACKWARD, s, m)) for m in range(M)])
                    for s in range(Pn))
        acts = max([_slots([(m, self.tick_of(FORWARD, s - 1, m), self.tick_of(FORWARD, s, m)) for m in range(M)])
                    for s in range(1, Pn)] or [1])
        # (a gradient's slot holds a backward's partial gradient between its parts: it is free after the last)
        grads = max([_slots([(m, self.end_of(BACKWARD, s + 1, m) if s < Pn - 1 else self.tick_of(FORWARD, s, m),
                              self.end_of(BACKWARD, s, m)) for m in range(M)]) for s in range(Pn)])
        return cache, acts, grads

    def replay(self, forward: Sequence[float], backward: Sequence[float],
               lockstep: bool = False) -> tuple[float, list[float]]:
        """The schedule run with durations: stage ``s``'s forward of a micro-batch takes ``forward[s]`` seconds, its
        backward ``backward[s]``. Returns ``(makespan, busy seconds per stage)``; the bubble is ``1 − Σ busy / (P ·
        makespan)``.

        * ``lockstep=False`` — each stage does its actions in the table's order, each as soon as the stage is free
          and what it needs is done: a runtime whose devices each run their own program (MPMD, Megatron's processes).
        * ``lockstep=True`` — jnnex's program (:func:`pipeline_value_and_grad`): every tick ends in the ``ppermute``
          that trades a stage's output with its neighbours, so a device leaves tick ``t`` when it and both its
          neighbours have finished their work of tick ``t``: a tick where one stage runs a forward and its neighbour a
          backward lasts the longer of the two."""
        P, end = self.stages, {}
        free, busy = [0.0] * P, [0.0] * P
        for row in self.table:
            reached = list(free)
            for s, action in enumerate(row):
                if action is None:
                    continue
                kind, m = action
                took = forward[s] if kind == FORWARD else backward[s] / self.parts  # (a backward's part: its share)
                later = kind == BACKWARD and (kind, s, m) in end  # a backward's later part: after the one before
                start = max([free[s]] + ([end[(kind, s, m)]] if later else [end[n] for n in _needs(kind, s, m, P)]))
                end[(kind, s, m)] = reached[s] = start + took
                busy[s] += took
            free = [max(reached[max(s - 1, 0):s + 2]) for s in range(P)] if lockstep else reached
        return max(free), busy

    def draw(self) -> str:
        """The timeline, one row per stage: ``F3`` a forward of micro-batch 3, ``B3`` its backward, ``·`` idle."""
        width = len(str(self.micro - 1)) + 1
        rows = []
        for s in range(self.stages):
            cells = [("·" if a is None else f"{a[0]}{a[1]}").rjust(width) for a in (row[s] for row in self.table)]
            rows.append(f"stage {s}  " + " ".join(cells))
        return "\n".join(rows)


def parse_schedule(text: str) -> tuple[str, int]:
    """A schedule as a user types it (``--pipeline-schedule``): its name, then ``/K`` for a backward in ``K`` ticks —
    ``"1f1b"`` is ``("1f1b", 1)``, ``"1f1b/2"`` is ``("1f1b", 2)``; a ``ValueError`` naming what is wrong."""
    name, slash, k = str(text).partition("/")
    if name not in ORDERS or (slash and not (k.isdigit() and int(k) >= 1)):
        raise ValueError(f"pipeline: the schedule must be one of {', '.join(ORDERS)}, optionally with /K for a "
                         f"backward in K ticks (1f1b/2), got {text!r}")
    return name, int(k) if slash else 1


def schedule(name: str, stages: int, micro: int, parts: int = 1) -> Schedule:
    """The :class:`Schedule` ``name`` (``"gpipe"``, ``"1f1b"`` or ``"alternating"``; or with ``/K``, for ``parts=K``:
    :func:`parse_schedule`) of ``stages`` stages and ``micro`` micro-batches, each backward taking ``parts`` ticks (its
    stage's blocks in ``parts`` groups: 1F1B with a backward twice a forward keeps the formula's bubble in jnnex's
    lockstep program at ``parts=2``)."""
    if isinstance(name, str) and "/" in name:
        name, parts = parse_schedule(name)
    if name not in ORDERS:
        raise ValueError(f"pipeline: the schedule must be one of {', '.join(ORDERS)}, got {name!r}")
    for what, n in (("stages", stages), ("micro-batches", micro), ("a backward's ticks (parts)", parts)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"pipeline: {what} must be an integer >= 1, got {n!r}")
    if name in ALTERNATE and parts > 1:
        raise ValueError(f"pipeline: the {name} schedule's backward takes one tick (its ticks are all forwards or all "
                         f"backwards in turn), got parts {parts}: cut a backward into ticks with gpipe or 1f1b")
    return Schedule(name, stages, micro, _simulate(ORDERS[name](stages, micro), stages, name in ALTERNATE, parts),
                    parts)


# ----------------------------------------------------------------------------------------------------------------------
# The devices' layout: blocks stacked along a leading axis, split by stage


def mesh_3d(data: int, stage: int, model: int = 1, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A ``("data", "stage", "model")`` mesh of ``data × stage × model`` devices: a device's model-axis neighbours
    adjacent in the device list (the tensor-parallel all-reduces stay on the fastest links), then its stage
    neighbours."""
    for name, size in (("data", data), ("stage", stage), ("model", model)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh: the {name} axis must be an integer >= 1, got {size!r}")
    available = list(jax.devices()) if devices is None else list(devices)
    n = data * stage * model
    if n > len(available):
        raise ValueError(f"mesh: data {data} × stage {stage} × model {model} = {n} devices, but only "
                         f"{len(available)} exist (on CPU, start with JAX_NUM_CPU_DEVICES={n} for more)")
    grid = np.array(available[:n]).reshape(data, stage, model)
    return jax.sharding.Mesh(grid, (DATA, STAGE, MODEL), axis_types=(AxisType.Auto,) * 3)


def check_pipeline(model: LanguageModel, stages: int, parts: int = 1) -> None:
    """Clear errors for a model a pipeline cannot cut ``stages`` ways, each stage's backward in ``parts`` ticks."""
    if model.pipe is None:
        raise ValueError(f"pipeline: model {model.name!r} is not cut into stages (it declares no Pipe: the "
                         "transformers, gpt and llama, do)")
    L = model.cfg.n_layer
    if L % stages:
        raise ValueError(f"pipeline: the stages ({stages}) must divide the blocks (n_layer {L}); it divides by "
                         f"{[d for d in range(1, L + 1) if L % d == 0]}")
    if (L // stages) % parts:
        raise ValueError(f"pipeline: a backward's ticks ({parts}) must divide each stage's blocks ({L // stages} = "
                         f"n_layer {L} / {stages} stages): each tick runs the backward of an equal group of them")
    if getattr(model.cfg, "dropout", 0) > 0:
        raise ValueError(f"pipeline: dropout ({model.cfg.dropout}) is not pipelined yet (a micro-batch would draw "
                         "other masks than its batch's): train with dropout 0, or another scheme")


def _is(tree_type):
    return lambda x: isinstance(x, tree_type)


def stack_blocks(tree):
    """Every node of the parameters' type in ``tree`` (the parameters, their gradients, an optimiser's moments) with
    its ``blocks`` (a tuple of ``n_layer`` blocks) stacked into one block of ``(n_layer, ...)`` tensors."""
    def one(node):
        if not isinstance(node, tuple) or not hasattr(node, "blocks") or type(node.blocks) is not tuple:
            return node
        return node._replace(blocks=jax.tree.map(lambda *xs: jnp.stack(xs), *node.blocks))

    return jax.tree.map(one, tree, is_leaf=lambda x: hasattr(x, "blocks"))


def unstack_blocks(tree, n_layer: int):
    """The inverse of :func:`stack_blocks`."""
    def one(node):
        if not hasattr(node, "blocks") or type(node.blocks) is tuple:
            return node
        return node._replace(blocks=tuple(jax.tree.map(lambda a: a[i], node.blocks) for i in range(n_layer)))

    return jax.tree.map(one, tree, is_leaf=lambda x: hasattr(x, "blocks"))


def per_block(optimizer: optax.GradientTransformation, n_layer: int) -> optax.GradientTransformation:
    """``optimizer`` on stacked parameters (:func:`stack_blocks`), as it is on the parameters' own tree: each block's
    tensors are handed to it one block at a time (a weight-decay mask by rank, Muon's per-matrix step and a
    global-norm clip see what they see on one device), its updates and state stacked again."""
    def init(params):
        return stack_blocks(optimizer.init(unstack_blocks(params, n_layer)))

    def update(grads, state, params=None):
        updates, state = optimizer.update(*(unstack_blocks(t, n_layer) for t in (grads, state, params)))
        return stack_blocks(updates), stack_blocks(state)

    return optax.GradientTransformation(init, update)


def specs(model: LanguageModel, params_like, n_model: int):
    """Each tensor's ``PartitionSpec`` in the devices' layout (stacked blocks): the blocks' leading axis along
    ``"stage"``, each block's tensors along ``"model"`` as tensor parallelism splits them (with a model axis of
    more than one device), the rest replicated."""
    host = params_like if type(params_like.blocks) is tuple else unstack_blocks(params_like, model.cfg.n_layer)
    one = tensor_parallel.specs(model, host) if n_model > 1 else jax.tree.map(lambda _: P(), host)
    return one._replace(blocks=jax.tree.map(lambda s: P(STAGE, *s), one.blocks[0], is_leaf=_is(P)))


# ----------------------------------------------------------------------------------------------------------------------
# The pipelined forward and backward


def _branch_codes(sched: Schedule):
    """The branches the table uses, ``(kind, first, last, part)`` each (``part``: which of a backward's parts), and
    per tick and stage: the branch, the micro-batch, the micro-batch arriving from the previous stage (``-1``: none)
    and from the next (after a backward's last part)."""
    Pn, T = sched.stages, sched.ticks
    branches, code = [None], np.zeros((T, Pn), np.int32)  # branch 0: idle
    mb, act_in, grad_in = np.zeros((T, Pn), np.int32), np.full((T, Pn), -1, np.int32), np.full((T, Pn), -1, np.int32)
    for t, row in enumerate(sched.table):
        for s, a in enumerate(row):
            if a is None:
                continue
            part = sched.part_of(t, s) if a[0] == BACKWARD else 0
            b = (a[0], s == 0, s == Pn - 1, part)
            if b not in branches:
                branches.append(b)
            code[t, s], mb[t, s] = branches.index(b), a[1]
            if a[0] == FORWARD and s < Pn - 1:
                act_in[t, s + 1] = a[1]
            if a[0] == BACKWARD and s > 0 and part == sched.parts - 1:
                grad_in[t, s - 1] = a[1]
    return branches, code, mb, act_in, grad_in


def pipeline_value_and_grad(model: LanguageModel, mesh: jax.sharding.Mesh, sched: Schedule, params_like) -> Callable:
    """``f(params, x, y) -> (loss, grads)`` over ``mesh`` (:func:`mesh_3d`) by the schedule ``sched``: ``params`` and
    ``grads`` in the devices' layout (:func:`stack_blocks`), ``x, y (B, T)`` whole (split by rows along
    ``"data"``). ``loss`` is the batch's mean cross-entropy, ``grads`` its gradients, as one device computes them.

    A mixture of experts' balancing loss (and its capacity) is each micro-batch's on each data shard, averaged over
    them — the objective Megatron-LM's pipeline trains too: under 1F1B a micro-batch's backward starts before the
    batch's last forward, so the whole batch's expert loads are not known then. It equals one device running the model
    on each of those row groups (:func:`jnnex.lm.grouped_objective`)."""
    cfg = model.cfg
    Pn, M, n_model = mesh.shape[STAGE], sched.micro, mesh.shape[MODEL]
    if sched.stages != Pn:
        raise ValueError(f"pipeline: the schedule has {sched.stages} stages, the mesh's stage axis {Pn} devices")
    check_pipeline(model, Pn, sched.parts)
    if n_model > 1:
        tensor_parallel.check_split(model, n_model)
    cfg = dataclasses.replace(cfg, model_axis=MODEL if n_model > 1 else None)
    cfg = grouped_config(cfg, M * mesh.shape[DATA])  # each (data shard, micro-batch)'s balancing loss, averaged
    pipe, Lp, parts = model.pipe, cfg.n_layer // Pn, sched.parts
    branches, code, mb_of, act_from, grad_from = _branch_codes(sched)
    K_cache, K_act, K_grad = sched.slots
    param_specs = specs(model, params_like, n_model)

    def local(params, x, y):
        if x.shape[0] % M:
            raise ValueError(f"pipeline: the micro-batches ({M}) must divide each data shard's rows ({x.shape[0]} of "
                             f"the batch's {x.shape[0] * mesh.shape[DATA]}); choose a batch of data × micro-batches "
                             f"× k rows")
        s = jax.lax.axis_index(STAGE)
        cp = compute_params(params, cfg.precision)  # bfloat16: every layer below computes in it
        blocks = cp.blocks  # this stage's Lp blocks, stacked
        xs, ys = x.reshape(M, -1, x.shape[1]), y.reshape(M, -1, y.shape[1])
        dt = jnp.result_type(float)
        n = (ys >= 0).sum((1, 2), dtype=jnp.int32)
        shares = n.astype(dt) / jax.lax.psum(n.sum(), DATA).astype(dt)  # (M,) each micro-batch's part of the mean

        def stage_forward(h):
            return run_stage(pipe, cfg, blocks, h, s * Lp)

        def embed(m):
            return pipe.embed_forward(cfg, cp, jax.lax.dynamic_index_in_dim(xs, m, keepdims=False), True)

        def top(h, m):
            return run_top(pipe, cfg, cp, h, jax.lax.dynamic_index_in_dim(ys, m, keepdims=False), shares[m])

        # The shapes of what the branches carry, from one micro-batch traced through every piece (dead code to XLA).
        h0, c_emb0 = embed(0)
        h1, packed0, _ = stage_forward(h0)
        caches0 = unpack(packed0, blocks)
        loss0, dh0, g_top0 = top(h1, 0)
        dh1, dblocks0 = run_stage_backward(pipe, cfg, blocks, caches0, dh0)
        g_shared0 = merge_grads(pipe.embed_backward(cfg, dh1, c_emb0), g_top0)
        cache_arrays0, cache_static = packed0

        def zeros(tree):  # gradient sums over the micro-batches
            return jax.tree.map(lambda a: jnp.zeros(a.shape, _sum_dtype(a.dtype)), tree)

        init = (
            [None if a is None else jnp.zeros((K_cache,) + a.shape, a.dtype) for a in cache_arrays0],
            jnp.zeros((K_act,) + h0.shape, h0.dtype),  # activations received, by micro-batch slot
            jnp.zeros((K_grad,) + h0.shape, h0.dtype),  # gradients received (the last stage's: its own head's)
            zeros(g_shared0), zeros(dblocks0), jnp.zeros((), loss0.dtype),
        )

        def run_branch(b, m, carry):
            kind, first, last, part = b
            cache_buf, acts, grads_in, g_shared, g_blocks, loss = carry
            out_h, out_dh = jnp.zeros_like(h0), jnp.zeros_like(h0)
            if kind == FORWARD:
                h = embed(m)[0] if first else acts[m % K_act]
                h, (arrays, _), aux = stage_forward(h)
                loss = loss + aux  # (a mixture of experts' balancing loss, weighted: 0 without experts)
                cache_buf = [None if buf is None else buf.at[m % K_cache].set(a) for buf, a in zip(cache_buf, arrays)]
                if last:
                    loss_m, dh, g_top = top(h, m)
                    loss = loss + loss_m
                    g_shared = _accumulate(g_shared, g_top)
                    grads_in = grads_in.at[m % K_grad].set(dh)
                else:
                    out_h = h
            else:  # the backward's part `part`: its group of blocks, the last group first
                caches = jax.tree.map(lambda buf: buf[m % K_cache], list(cache_buf))
                lo, hi = Lp - (part + 1) * (Lp // parts), Lp - part * (Lp // parts)
                dh, dblocks = run_stage_backward(pipe, cfg, blocks, unpack((caches, cache_static), blocks),
                                                 grads_in[m % K_grad], lo, hi)
                g_blocks = _accumulate(g_blocks, dblocks) if parts == 1 else jax.tree.map(
                    lambda a, g: a.at[lo:hi].add(g.astype(a.dtype)), g_blocks, dblocks)
                if part < parts - 1:  # the gradient so far waits in its slot for the next part
                    grads_in = grads_in.at[m % K_grad].set(dh)
                elif first:
                    g_emb = pipe.embed_backward(cfg, dh, embed(m)[1])
                    g_shared = _accumulate(g_shared, g_emb)
                else:
                    out_dh = dh
            return (cache_buf, acts, grads_in, g_shared, g_blocks, loss), (out_h, out_dh)

        def idle(m, carry):
            return carry, (jnp.zeros_like(h0), jnp.zeros_like(h0))

        fns = [idle] + [lambda m, carry, b=b: run_branch(b, m, carry) for b in branches[1:]]

        def tick(carry, row):
            code_t, mb_t, act_t, grad_t = (r[s] for r in row)
            carry, (out_h, out_dh) = jax.lax.switch(code_t, fns, mb_t, carry)
            if Pn > 1:  # the activations to the next stage, the gradients to the previous
                h_next = jax.lax.ppermute(out_h, STAGE, [(k, k + 1) for k in range(Pn - 1)])
                dh_prev = jax.lax.ppermute(out_dh, STAGE, [(k + 1, k) for k in range(Pn - 1)])
                cache_buf, acts, grads_in, *rest = carry
                acts = _receive(acts, act_t, h_next, K_act)
                grads_in = _receive(grads_in, grad_t, dh_prev, K_grad)
                carry = (cache_buf, acts, grads_in, *rest)
            return carry, None

        rows = tuple(jnp.asarray(a) for a in (code, mb_of, act_from, grad_from))
        (_, _, _, g_shared, g_blocks, loss), _ = jax.lax.scan(tick, init, rows)
        loss = jax.lax.psum(loss, (STAGE, DATA))
        g_shared = jax.lax.psum(g_shared, (STAGE, DATA))
        grads = cp._replace(blocks=jax.lax.psum(g_blocks, DATA), **g_shared)
        return loss, param_grads(grads, params) if cfg.precision != "float32" else grads

    rows = P(DATA)
    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, rows, rows), out_specs=(P(), param_specs),
                         check_vma=False)  # (the branches of one tick vary over the stages by design)


def _sum_dtype(dtype):
    """A gradient sum's dtype: float32 at least (bfloat16's gradients are summed wide)."""
    return jnp.float32 if dtype == jnp.bfloat16 else dtype


def _accumulate(total, part):
    """``total + part``, leaf for leaf, in the sums' dtype; a dict ``part`` (gradients by field) adds to its fields."""
    if isinstance(part, dict):
        return {**total, **{k: _accumulate(total[k], g) for k, g in part.items() if g is not None}}
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), total, part)


def run_stage(pipe, cfg, blocks, h, i0):
    """A stage's blocks (``blocks``: stacked, ``(Lp, ...)`` per tensor; the first is block ``i0``) on ``h``: ``(h,
    packed caches, aux)``, the caches as :func:`pack` keeps them for the stage's backward, ``aux`` the blocks'
    auxiliary losses as the objective weighs them (a mixture of experts' balancing loss, times the weight its
    backward is seeded with; 0 for blocks without one)."""
    caches, blks, aux = [], [], 0.0
    for j in range(jax.tree.leaves(blocks)[0].shape[0]):
        blk = jax.tree.map(lambda a: a[j], blocks)
        h_in = h
        h, c = pipe.block_forward(cfg, blk, h, i0 + j, train=True, key=None)
        if getattr(c, "aux", None) is not None:
            aux = aux + c.aux * c.daux
        caches.append(keep(cfg.recompute, h_in, i0 + j, None, True, c))
        blks.append(blk)
    return h, pack(tuple(caches), blks), aux


def run_top(pipe, cfg, params, h, y, share):
    """The last stage's head, its cross-entropy on ``y`` and their backward, seeded with ``share`` (the micro-batch's
    part of the batch's mean): ``(loss × share, dh, the head's gradients by field)``."""
    logits, c_top = pipe.top_forward(cfg, params, h)
    loss, c_ce = cross_entropy_forward(logits, y)
    dlogits, _ = cross_entropy_backward(share.astype(logits.dtype), c_ce)
    dh, g_top = pipe.top_backward(cfg, dlogits, c_top)
    return loss * share.astype(loss.dtype), dh, g_top


def run_stage_backward(pipe, cfg, blocks, caches, dh, lo: int = 0, hi: int | None = None):
    """:func:`run_stage`'s backward for blocks ``lo .. hi − 1`` of the stage (default all of them), the last first:
    ``(dh, dblocks)``, ``dblocks`` stacked ``(hi − lo, ...)``; ``caches`` as :func:`unpack` gives them back, a
    recomputed block's forward run again here (:func:`jnnex.layers.recomputed`)."""
    hi = jax.tree.leaves(blocks)[0].shape[0] if hi is None else hi
    dblocks = [None] * (hi - lo)
    for j in reversed(range(lo, hi)):
        blk = jax.tree.map(lambda a: a[j], blocks)
        c, dh = recomputed(pipe.block_forward, cfg, blk, caches[j], dh)
        dh, dblocks[j - lo] = pipe.block_backward(dh, c)
    return dh, jax.tree.map(lambda *g: jnp.stack(g), *dblocks)


def pack(caches, blks):
    """``(arrays, static)``: what a stage keeps of its blocks' caches between a micro-batch's forward and backward —
    the activations; not the block's own weights, which a layer's cache holds too (a linear's ``W``) and which the
    stage has already: they are left out, and :func:`unpack` puts the stage's weights back in their place."""
    where = {id(leaf): (j, k) for j, blk in enumerate(blks) for k, leaf in enumerate(jax.tree.leaves(blk))}
    arrays, static = partition_static(caches)
    refs = tuple(None if a is None else where.get(id(a)) for a in arrays)
    return [None if r is not None else a for a, r in zip(arrays, refs)], (static, refs)


def unpack(packed, blocks):
    """The caches :func:`pack` packed, with the stage's block weights (``blocks``, stacked) back in place."""
    arrays, (static, refs) = packed
    leaves = [jax.tree.leaves(jax.tree.map(lambda a: a[j], blocks)) for j in range(jax.tree.leaves(blocks)[0].shape[0])]
    return combine_static([a if r is None else leaves[r[0]][r[1]] for a, r in zip(arrays, refs)], static)


def _receive(buf, m, value, K: int):
    """``buf`` with ``value`` in micro-batch ``m``'s slot if ``m >= 0`` (something arrived), else as it was."""
    slot = jnp.maximum(m, 0) % K
    return buf.at[slot].set(jnp.where(m >= 0, value, buf[slot]))


# ----------------------------------------------------------------------------------------------------------------------
# The host-driven runtime: each stage's programs on its own device (MPMD)


class StagePrograms(NamedTuple):
    """Stage ``s``'s two compiled programs, as the host-driven runtime (:func:`host_value_and_grad`) runs them on the
    stage's device — the same work as the lockstep program's forward and backward branches for that stage:

    * ``forward(params, x, y, h, share) -> (out, arrays, loss, g_top)`` — the first stage embeds the micro-batch's
      tokens ``x`` (the others read ``h``, the previous stage's activation); the stage's blocks run
      (:func:`run_stage`) and keep their caches (:func:`pack`'s ``arrays``). The last stage also runs the head, the
      cross-entropy on ``y`` and their backward, seeded with ``share`` (the micro-batch's part of the batch's mean):
      ``out`` is then the gradient into its blocks and ``g_top`` the head's gradients by field; elsewhere ``out`` is
      the activation for the next stage and ``g_top`` ``None``. ``loss``: the micro-batch's weighted cross-entropy
      (last stage) plus the blocks' balancing losses as the objective weighs them.
    * ``backward(params, arrays, dh, x) -> (out, dblocks, g_emb)`` — the stage's blocks' backward
      (:func:`run_stage_backward`) on the caches ``arrays``: ``out`` the gradient for the previous stage; on the first
      stage the embedding's backward too (its cache made again from ``x``, as the lockstep program does), ``g_emb``
      its gradients by field (``None`` elsewhere).

    ``params`` is what the stage's device holds: the parameters' tree with only the stage's blocks, stacked."""

    forward: Callable
    backward: Callable


def stage_programs(model: LanguageModel, stages: int, s: int, micro: int = 1) -> StagePrograms:
    """:class:`StagePrograms` for stage ``s`` of ``stages``; ``micro``: the micro-batches a batch is cut into (a mixture
    of experts' balancing loss is each micro-batch's, weighted ``1 / micro``: :func:`jnnex.lm.grouped_config`)."""
    cfg = grouped_config(model.cfg, micro)
    pipe, Lp = model.pipe, cfg.n_layer // stages
    first, last = s == 0, s == stages - 1
    static = {}  # the caches' Python part, from the forward's trace: only their arrays cross the program's boundary

    def forward(params, x, y, h, share):
        cp = compute_params(params, cfg.precision)
        if first:
            h = pipe.embed_forward(cfg, cp, x, True)[0]
        h, (arrays, static["caches"]), aux = run_stage(pipe, cfg, cp.blocks, h, s * Lp)
        if not last:
            return h, arrays, aux, None
        loss, dh, g_top = run_top(pipe, cfg, cp, h, y, share)
        return dh, arrays, aux + loss, g_top

    def backward(params, arrays, dh, x):
        cp = compute_params(params, cfg.precision)
        dh, dblocks = run_stage_backward(pipe, cfg, cp.blocks, unpack((arrays, static["caches"]), cp.blocks), dh)
        if not first:
            return dh, dblocks, None
        return None, dblocks, pipe.embed_backward(cfg, dh, pipe.embed_forward(cfg, cp, x, True)[1])

    return StagePrograms(jax.jit(forward), jax.jit(backward))


@jax.jit
def _add(total, part):
    return _accumulate(total, part)


def _add_to(total, part):
    """A gradient sum with ``part`` added (on ``part``'s device); ``total`` ``None``: the sum's first term."""
    if total is None:
        return jax.tree.map(lambda a: a.astype(_sum_dtype(a.dtype)), part)
    return _add(total, part)


def host_value_and_grad(model: LanguageModel, sched: Schedule, devices: Sequence | None = None) -> Callable:
    """``f(params, x, y, trace=None) -> (loss, grads)`` by the schedule ``sched``, run from the host: stage ``s``'s
    forward and backward are its own compiled programs (:func:`stage_programs`) on ``devices[s]`` (default the first
    ``P`` devices), and the host walks the schedule's table dispatching each action. JAX dispatches without waiting, so
    each device runs its own queue of programs in its stage's order, each waiting only for the arrays it reads; an
    activation or a gradient goes to the neighbour's device as it is made (``jax.device_put``). There is no lockstep:
    this is MPMD (Megatron-LM's processes, JaxPP's runtime), and 1F1B runs at the formula's bubble holding ``P − s``
    micro-batches (:meth:`Schedule.replay` without ``lockstep``).

    ``params``, ``grads``: the parameters' own tree (``blocks`` a tuple), ``grads`` on ``devices[0]``; ``x, y (B,
    T)``. The loss is the batch's mean cross-entropy (a mixture of experts: each micro-batch's balancing loss, averaged,
    as :func:`pipeline_value_and_grad`). The stage axis alone: each stage one device, no data or model axis.

    ``trace``: a list, to which each action appends ``{"stage", "kind", "micro", "seconds", "held_bytes"}`` — the
    host then waits for each action before the next (its seconds: from its dispatch to its output on the neighbour's
    device, its gradients summed), and ``held_bytes`` is what the stage's device holds of caches after it (the arrays
    themselves, summed)."""
    Pn, M = sched.stages, sched.micro
    check_pipeline(model, Pn)
    if sched.parts > 1:
        raise ValueError(f"pipeline: the host-driven runtime runs each backward whole, got {sched.label} (a backward "
                         f"in ticks is for the lockstep program, pipeline_value_and_grad)")
    devices = list(jax.devices())[:Pn] if devices is None else list(devices)
    if len(devices) < Pn:
        raise ValueError(f"pipeline: {Pn} stages need {Pn} devices, got {len(devices)} (on CPU, start with "
                         f"JAX_NUM_CPU_DEVICES={Pn} for more)")
    Lp = model.cfg.n_layer // Pn
    programs = [stage_programs(model, Pn, s, M) for s in range(Pn)]

    def value_and_grad(params, x, y, trace: list | None = None):
        if type(params.blocks) is not tuple:
            raise ValueError("pipeline: host_value_and_grad takes the parameters' own tree (blocks a tuple of "
                             "n_layer blocks), got stacked blocks (pipeline.unstack_blocks gives them back)")
        if x.shape[0] % M:
            raise ValueError(f"pipeline: the micro-batches ({M}) must divide the batch's rows ({x.shape[0]})")
        on = [jax.device_put(stack_blocks(params._replace(blocks=params.blocks[s * Lp:(s + 1) * Lp])), devices[s])
              for s in range(Pn)]
        xs = jax.device_put(x.reshape(M, -1, x.shape[1]), devices[0])
        ys = jax.device_put(y.reshape(M, -1, y.shape[1]), devices[-1])
        n = np.asarray(y >= 0).reshape(M, -1).sum(1)
        shares = (n / n.sum()).astype(jnp.result_type(float))  # each micro-batch's part of the batch's mean
        held = [{} for _ in range(Pn)]  # stage: {micro-batch: the caches it keeps for its backward}
        inbox: dict = {}  # (stage, kind, micro-batch): the activation or gradient that stage's action reads
        g_blocks, g_ends, losses = [None] * Pn, {}, []  # g_ends: the embedding's sums (first stage), the head's (last)
        for row in sched.table:
            for s, action in enumerate(row):
                if action is None:
                    continue
                kind, m = action
                start, sent = time.perf_counter(), None
                if kind == FORWARD:
                    out, held[s][m], loss, g_top = programs[s].forward(
                        on[s], xs[m] if s == 0 else None, ys[m] if s == Pn - 1 else None, inbox.pop((s, kind, m), None),
                        shares[m])
                    losses.append(loss)
                    if s == Pn - 1:
                        inbox[(s, BACKWARD, m)] = out
                        g_ends["top"] = _add_to(g_ends.get("top"), g_top)
                    else:
                        sent = inbox[(s + 1, kind, m)] = jax.device_put(out, devices[s + 1])
                else:
                    out, dblocks, g_emb = programs[s].backward(on[s], held[s].pop(m), inbox.pop((s, kind, m)),
                                                               xs[m] if s == 0 else None)
                    g_blocks[s] = _add_to(g_blocks[s], dblocks)
                    if s == 0:
                        g_ends["emb"] = _add_to(g_ends.get("emb"), g_emb)
                    else:
                        sent = inbox[(s - 1, kind, m)] = jax.device_put(out, devices[s - 1])
                if trace is not None:
                    jax.block_until_ready((sent, g_blocks[s], g_ends, losses[-1], held[s]))
                    trace.append({"stage": s, "kind": kind, "micro": m, "seconds": time.perf_counter() - start,
                                  "held_bytes": sum(a.nbytes for c in held[s].values() for a in c if a is not None)})
        home = devices[0]
        loss = sum(jax.device_put(v, home) for v in losses)
        shared = merge_grads(*(jax.device_put(g_ends[k], home) for k in ("emb", "top")))  # (a tied table's two, added)
        blocks = tuple(b for g in g_blocks for b in unstack_blocks(params._replace(blocks=g), Lp).blocks)
        return loss, param_grads(jax.device_put(params._replace(blocks=blocks, **shared), home), params)

    return value_and_grad


# ----------------------------------------------------------------------------------------------------------------------
# Training: the step, and the layout jnnex.layout's "pp" row builds


def stage_update(model: LanguageModel, optimizer, mesh: jax.sharding.Mesh, params_like) -> Callable:
    """``update(grads, opt_state, params) -> (updates, opt_state)`` in the devices' layout, each device running
    ``optimizer`` on what it holds: its stage's blocks, one block at a time (a weight-decay mask by rank and Muon's
    per-matrix step see each block as on one device), and the embedding and head, which every device holds whole and
    updates alike. Nothing is sent but a global-norm clip's one number (:func:`jnnex.optim.clip_by_global_norm`: the
    stages' block norms summed, the shared tensors' once). For a ``"model"`` axis of one device."""
    from jnnex import optim

    L, Lp = model.cfg.n_layer, model.cfg.n_layer // mesh.shape[STAGE]
    host = params_like if type(params_like.blocks) is tuple else unstack_blocks(params_like, L)
    param_specs = specs(model, host, 1)
    with jax.numpy_dtype_promotion("standard"):
        opt_specs = state_specs(model, optimizer, host, jax.eval_shape(optimizer.init, host), 1)

    def squared_norm(tree):
        if not hasattr(tree, "blocks"):
            raise ValueError("pipeline: a global-norm clip must see the whole parameters' tree (put it first in the "
                             "optimiser's chain, as jnnex.optim.make_optimizer does)")
        sq = lambda t: optax.tree.norm(t, squared=True)  # noqa: E731
        return jax.lax.psum(sq(tree.blocks), STAGE) + sq(tree._replace(blocks=()))

    def local(grads, state, params):
        g, st, p = (unstack_blocks(t, Lp) for t in (grads, state, params))
        with optim.global_norm_by(squared_norm), jax.numpy_dtype_promotion("standard"):
            updates, st = optimizer.update(g, st, p)
        return stack_blocks(updates), stack_blocks(st)

    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, opt_specs, param_specs),
                         out_specs=(param_specs, opt_specs), check_vma=False)


def pipeline_step(model: LanguageModel, optimizer, mesh: jax.sharding.Mesh, sched: Schedule, params_like) -> Callable:
    """``step(ts, batch, key) -> (ts, metrics)`` with the pipelined gradients. ``ts`` in the devices' layout. The
    optimiser runs on each stage's own blocks (:func:`stage_update`); with a ``"model"`` axis of more than one device
    it runs in the global view (:func:`per_block`), where Muon sees whole matrices — and XLA gathers each block to
    every device for it."""
    value_and_grad = pipeline_value_and_grad(model, mesh, sched, params_like)
    update = (stage_update(model, optimizer, mesh, params_like) if mesh.shape[MODEL] == 1
              else per_block(optimizer, model.cfg.n_layer).update)

    def step(ts, batch, key):
        loss, grads = value_and_grad(ts.params, *batch)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        return type(ts)(params, ts.state, opt_state, ts.step + 1), {"loss": loss}

    return step


def train_layout(model: LanguageModel, optimizer, mesh: jax.sharding.Mesh, ts):
    """For :func:`jnnex.train.fit`: ``(to_devices, to_host, shardings)`` — a host training state (the parameters'
    own tree) to the devices' layout (stacked blocks, a split model's columns reordered) and back, and its
    ``NamedSharding``s."""
    n_model, L = mesh.shape[MODEL], model.cfg.n_layer
    apply = lambda fn, a: fn(a)  # noqa: E731
    if n_model > 1:
        there, back = (tensor_parallel.layout(model, ts.params, n_model, inverse=inv) for inv in (False, True))
    else:
        there = back = jax.tree.map(lambda _: (lambda a: a), ts.params)

    def to_devices(ts):
        params = jax.tree.map(apply, there, ts.params)
        opt_state = tensor_parallel.optimizer_state_map(optimizer, lambda a, fn: fn(a), ts.opt_state, there)
        return type(ts)(stack_blocks(params), ts.state, stack_blocks(opt_state), ts.step)

    def to_host(ts):
        params, opt_state = unstack_blocks(ts.params, L), unstack_blocks(ts.opt_state, L)
        params = jax.tree.map(apply, back, params)
        opt_state = tensor_parallel.optimizer_state_map(optimizer, lambda a, fn: fn(a), opt_state, back)
        return type(ts)(params, ts.state, opt_state, ts.step)

    rep = NamedSharding(mesh, P())
    param_shardings = tensor_parallel.shardings(mesh, specs(model, ts.params, n_model))
    opt_shardings = tensor_parallel.shardings(mesh, state_specs(model, optimizer, ts.params, ts.opt_state, n_model))
    state = type(ts)(param_shardings, jax.tree.map(lambda _: rep, ts.state), opt_shardings, rep)
    return to_devices, to_host, state


def state_specs(model: LanguageModel, optimizer, params_like, opt_state_like, n_model: int):
    """Each tensor of the optimiser's state (``opt_state_like``, for the parameters' own tree ``params_like``) in the
    devices' layout: a parameter-shaped one as its parameter (:func:`specs`: the blocks' stacked along ``"stage"``),
    the rest (step counts) replicated."""
    one = specs(model, params_like, n_model)
    per_block = one._replace(blocks=(one.blocks,) * model.cfg.n_layer)  # (the stacked block's, for each block)
    return stack_blocks_specs(tensor_parallel.optimizer_state_map(
        optimizer, lambda _, spec: spec, opt_state_like, per_block, other=lambda x: None if x is None else P()))


def stack_blocks_specs(tree):
    """:func:`stack_blocks` for a tree of shardings: one block's shardings stand for the stacked block's."""
    def one(node):
        if not hasattr(node, "blocks") or type(node.blocks) is not tuple:
            return node
        return node._replace(blocks=node.blocks[0])

    return jax.tree.map(one, tree, is_leaf=lambda x: hasattr(x, "blocks"))
