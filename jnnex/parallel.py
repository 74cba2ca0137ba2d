"""Data parallelism over devices and machines, with JAX's own sharding and distributed runtime — two ways to write it.

**The global view** (what :func:`jnnex.train.fit` uses with ``parallel=Parallel("dp", N)``). One mesh axis, ``"data"``. The parameters,
the model state (BatchNorm's running statistics) and the optimiser state are *replicated* on every device; the
minibatch — and the draw of its example indices — is *sharded* along ``"data"``. The jitted training step is the
same function as on one device: XLA partitions it, each device computes the forward and backward of its rows, and
the gradient's sum over the batch becomes an all-reduce. Nothing in the model changes, the hand-written backward
included; a BatchNorm's batch mean is a mean over the *global* batch (synchronised BatchNorm, for free). ::

    mesh = data_mesh(4)                  # the first 4 of jax.devices()
    fit(model, train, tcfg, parallel=Parallel("dp", 4))   # or: jnnex train --devices 4

**The explicit view** (:func:`explicit_step`, for learning how it works). The same step under ``jax.shard_map``: the
function sees one device's shard of the batch, and the communication is written out — ``psum`` of the local
losses and gradients, ``pmean`` of BatchNorm's statistics when synchronised (:func:`synchronised`: the BatchNorm
kernels' explicit ``axis_name``), or
no communication in the forward at all with ``sync_batchnorm=False`` (per-device statistics: what an unsynchronised
BatchNorm does, a different model in training). A pitfall it avoids: ``pmean`` of per-device ``jax.grad`` of the
local loss is N× too large, because the gradient of a replicated input is already summed over devices by autodiff's
transpose; differentiate the globally reduced loss instead.

**Many machines.** :func:`initialize` wraps ``jax.distributed.initialize`` (coordinator address, number of processes,
process id; or nothing on Slurm, Open MPI, Kubernetes, TPU, where JAX detects the cluster). Afterwards
``jax.devices()`` lists every process's devices, and a mesh over them spans the machines; each process computes its
own devices' rows of every batch, collectives travel over NCCL (GPU) or gloo (CPU). Only process 0 writes files.
The first run after joining starts together (:func:`start_together`): a process that stops while setting up tells
the others why, and they stop with it at once.

On CPU, ``JAX_NUM_CPU_DEVICES=N`` (before JAX starts) gives one process N devices — how the tests run every path on
2 cores (it shows the overhead of partitioning, not a speed-up: the cores are the same).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jnnex.lm import LanguageModel, manual_gradients

DATA = "data"  # the mesh axis the batch is split along


def data_mesh(devices: int | Sequence | jax.sharding.Mesh | None = None) -> jax.sharding.Mesh:
    """A one-axis mesh ``("data",)`` over the first ``devices`` of ``jax.devices()`` (every process's, after
    :func:`initialize`), over the given device list, or over all devices for ``None``.

    The axis type is ``Auto``: XLA propagates the shardings through the unchanged model code (``Explicit``, JAX
    0.10's default, would ask every reshape of a sharded axis to say where its result lives).
    """
    if isinstance(devices, jax.sharding.Mesh):
        return devices
    available = jax.devices()
    if devices is None:
        chosen = available
    elif isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        if devices > len(available):
            raise ValueError(f"devices={devices} asked for, but only {len(available)} {available[0].platform} "
                             f"device(s) exist (on CPU, start with JAX_NUM_CPU_DEVICES={devices} for more)")
        chosen = available[:devices]
    else:
        chosen = list(devices)
    return jax.make_mesh((len(chosen),), (DATA,), axis_types=(AxisType.Auto,), devices=chosen)


def check_batch_size(batch_size: int | None, n_devices: int, n_examples: int) -> None:
    """The batch must split evenly: a ``ValueError`` naming both numbers otherwise."""
    if batch_size is None:
        if n_examples % n_devices:
            raise ValueError(f"full-batch training (batch_size None) on {n_devices} devices needs the training set's "
                             f"{n_examples} examples to divide by {n_devices}")
    elif batch_size % n_devices:
        raise ValueError(f"batch_size {batch_size} does not divide evenly over {n_devices} devices (each device takes "
                         f"batch_size / devices rows); choose a multiple of {n_devices}")


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh, leading: int = 0) -> NamedSharding:
    """The batch axis (after ``leading`` unsharded axes) split along ``"data"``."""
    return NamedSharding(mesh, P(*([None] * leading), DATA))


def replicate(tree, mesh):
    """Every leaf (host data, the same on every process) as a global array with a full copy on every device."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def local(tree):
    """This process's copy of global arrays, as host arrays (what files and evaluation need: a global array that
    spans other processes cannot be read whole); arrays split across processes (FSDP) are gathered first."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if a.sharding.is_fully_replicated:
                a = a.addressable_data(0)
            else:  # split across processes (FSDP): every process gathers the whole
                from jax.experimental import multihost_utils
                a = multihost_utils.process_allgather(a, tiled=True)
        return np.asarray(a)

    return jax.tree.map(one, tree)


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Where FSDP splits a tensor of ``shape`` over ``n`` devices: along its largest axis whose size divides by ``n``
    (the first of equals), ``P()`` (replicated) when none does — a scalar, a 27-wide bias on 4 devices."""
    axes = [i for i, size in enumerate(shape) if size % n == 0 and size >= n]
    if n == 1 or not axes:
        return P()
    best = max(axes, key=lambda i: (shape[i], -i))
    return P(*([None] * best), DATA)


def fsdp_shardings(tree, mesh):
    """The :class:`NamedSharding` of every leaf of ``tree`` (parameters, optimiser state) under FSDP: split along
    ``"data"`` by :func:`fsdp_spec`."""
    n = mesh.shape[DATA]
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(np.shape(a), n)), tree)


def fsdp_layout(ts, mesh):
    """FSDP's layout of a training state ``ts`` (a ``TrainState``) on ``mesh``: ``(layout, step_shardings)`` — the
    state's shardings (parameters and optimiser state split by :func:`fsdp_shardings`, model state and step count
    replicated) and :func:`jnnex.train.make_step`'s ``shardings=(gathered, split)`` for the parameters."""
    rep = replicated(mesh)
    params, opt_state = fsdp_shardings((ts.params, ts.opt_state), mesh)
    layout = type(ts)(params, jax.tree.map(lambda _: rep, ts.state), opt_state, rep)
    return layout, (jax.tree.map(lambda _: rep, ts.params), params)


def unsplit(tree, n: int) -> list[str]:
    """The paths of the leaves FSDP leaves replicated on ``n`` devices (none of their axes divides by ``n``)."""
    return [jax.tree_util.keystr(path) for path, a in jax.tree_util.tree_leaves_with_path(tree)
            if np.size(a) > 1 and fsdp_spec(np.shape(a), n) == P()]


def place(tree, shardings):
    """Host data (the same on every process) as global arrays laid out by ``shardings`` (a matching tree of
    shardings): each process builds only its own devices' shards, so it works across processes too."""
    def one(a, sharding):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(one, tree, shardings)


def bytes_per_device(tree) -> dict:
    """``{device: bytes}`` the leaves of ``tree`` (global arrays) hold on each device, read from their shards."""
    held: dict = {}
    for a in jax.tree.leaves(tree):
        for shard in a.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def state_bytes_per_device(tree, shardings) -> int:
    """The bytes the largest share of ``tree`` (arrays or shapes) takes on one device, laid out by ``shardings`` (a
    matching tree; ``None``: whole on every device) — before anything is placed."""
    per: dict = {}
    shard_list = jax.tree.leaves(shardings) if shardings is not None else None
    for i, a in enumerate(jax.tree.leaves(tree)):
        itemsize = np.dtype(a.dtype).itemsize
        if shard_list is None:
            per[None] = per.get(None, 0) + int(np.prod(a.shape)) * itemsize
            continue
        sharding = shard_list[i]
        for device in sharding.device_set:
            per[device] = per.get(device, 0) + int(np.prod(sharding.shard_shape(a.shape))) * itemsize
    return max(per.values(), default=0)


def check_state_fits(ts, shardings, mesh, *, available: int | None = None, what: str = "devices") -> None:
    """A ``ValueError`` with the figures and what would work, when the training state (parameters, model and
    optimiser state) laid out by ``shardings`` on ``mesh`` cannot be held: per device on an accelerator (its free
    memory), all devices together on CPU (forced CPU devices share the host's memory: splitting does not help)."""
    from jnnex.memory import available_bytes, gib

    per_device = state_bytes_per_device(ts, shardings)
    device = mesh.devices.flat[0]
    cpu = device.platform == "cpu"
    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    need = per_device * (local if cpu else 1)
    available = available_bytes(device) if available is None else available
    if need <= available:
        return
    whole = state_bytes_per_device(ts, None)
    if cpu:
        hint = ("CPU devices share this machine's memory, so splitting over more of them does not help: run on "
                "accelerators, or make the model smaller")
    else:
        k = next((k for k in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if whole / k <= available), None)
        hint = (f"split them over {k} devices or more (--devices {k} --shard-params: about {gib(whole // k)} each)"
                if k else "no split over up to 1,024 devices holds them: make the model smaller")
    raise ValueError(f"{what}: the parameters and optimiser state take {gib(per_device)} per device as laid out on "
                     f"{mesh.size} device(s) ({gib(need)} in all on this {'machine' if cpu else 'device'}), but "
                     f"{gib(available)} are available; {hint}")


def is_writer() -> bool:
    """Only process 0 writes run files."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------------------------------
# Many machines


ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:port"`` for IPv6) as ``(host, port)``; a ``ValueError`` saying what was expected."""
    host, sep, port = str(address).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"distributed: the coordinator address must be host:port (e.g. 10.0.0.1:1234, port 1-65535), "
                         f"got {address!r}")
    return host, int(port)


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Return once something listens at ``address``; a ``ValueError`` naming it after ``timeout`` seconds. JAX's
    own client, given an address nobody answers at, aborts the process with a C++ stack after its timeout; this
    wait is what turns that into a message."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            why = e.strerror or str(e) or type(e).__name__
        if time.monotonic() >= deadline:
            raise ValueError(f"distributed: cannot reach the coordinator at {address} within {timeout:g} s ({why}); "
                             "is process 0 started, and is the address right? (--coordinator-timeout sets the wait)")
        time.sleep(0.25)  # the coordinator's process may still be starting: try again


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False, timeout: float = 60) -> bool:
    """Join the distributed runtime (``jax.distributed.initialize``) before any JAX computation.

    Explicit settings come from the arguments, else from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; all three, or none. With none and ``auto=True``, JAX detects the cluster (Slurm, Open MPI,
    Kubernetes, TPU). With none and ``auto=False``, nothing happens (one process). Returns whether it initialised.

    ``timeout`` (seconds) bounds the wait for the coordinator and the other processes: a process other than 0 that
    cannot reach the coordinator in that time gets a ``ValueError`` naming the address; process 0 says on stderr
    whom it waits for (if they never come, JAX itself ends the process after ``timeout``).
    """
    global _start_within
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for k, env in ENV.items():
        if given[k] is None and os.environ.get(env):
            given[k] = os.environ[env]
    missing = [k for k, v in given.items() if v is None]
    if not timeout > 0:
        raise ValueError(f"distributed: the timeout must be > 0 seconds, got {timeout!r}")
    if len(missing) == 3:
        if auto:
            jax.distributed.initialize(initialization_timeout=int(max(1, timeout)))
            _keep_sigterm()
            _start_within = timeout
            return True
        return False
    if missing:
        raise ValueError(f"distributed: give the coordinator address, the number of processes and this process's id "
                         f"together (flags or {', '.join(ENV.values())}); missing {missing}")
    try:
        n, i = int(given["num_processes"]), int(given["process_id"])
    except ValueError:
        raise ValueError(f"distributed: the number of processes and the process id must be integers, got "
                         f"{given['num_processes']!r} and {given['process_id']!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"distributed: process_id must be in [0, {n}) for num_processes {n}, got {i}")
    address = str(given["coordinator"])
    parse_address(address)
    if i == 0:
        print(f"jnnex: process 0 of {n}: coordinating at {address}, waiting up to {timeout:g} s for the others",
              file=sys.stderr, flush=True)
    else:
        wait_for_coordinator(address, timeout)
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=i,
                               initialization_timeout=int(max(1, timeout)))
    _keep_sigterm()
    # Start the backend now, while every process is here: it exchanges the device topology through the coordinator,
    # a wait of its own (5 minutes, not `timeout`). Left to the first array, a process that stops in between (bad
    # input seen by process 0 alone) would leave the others in that wait, then a traceback.
    jax.devices()
    _start_within = timeout  # the first run starts together: start_together
    return True


# Starting together. The first collective of a run (its first training chunk) gives the processes gloo's 30 s to
# arrive, and a process that stops before it (bad input it alone meets: its data file, say) leaves the others waiting
# and then a message that cannot say why. So the first run after joining starts with a barrier of the distributed
# runtime, not a collective: it waits for every process's set-up (up to initialize's timeout), and a process that
# stops instead checks in there with its reason, so that every other one stops with it, naming it, at once.

_start_within: float | None = None  # joined, the first run not yet started together: how long to wait for it


def _client():
    """The distributed runtime's client where this process joined others, else None. JAX keeps it private
    (``jax._src.distributed``, what ``jax.experimental.multihost_utils`` uses); a JAX without it: None, and no
    barrier."""
    if jax.process_count() == 1:
        return None
    try:
        from jax._src import distributed
        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None


def _take_start() -> tuple[object, float] | None:
    """``(client, timeout)`` for the first run after joining, once (the next call: ``None``); ``None`` when this
    process never joined — asked without starting JAX's backend — or JAX's client is missing."""
    global _start_within
    timeout = _start_within
    client = None if timeout is None else _client()
    if client is None:
        return None
    _start_within = None
    return client, timeout


def start_together() -> None:
    """Called by :func:`jnnex.train.fit` before its first collective: wait until every process has set its run up
    (at most :func:`initialize`'s ``timeout``). A ``ValueError`` naming each process that stopped instead
    (:func:`stopped_before_start`), and why. Only the first run after joining waits; later ones go straight on."""
    taken = _take_start()
    if taken is None:
        return
    client, timeout = taken
    who = f"process {jax.process_index()} of {jax.process_count()}"
    try:
        client.wait_at_barrier("jnnex-start", int(timeout * 1000))
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(f"{who}: the other processes did not finish setting up within {timeout:g} s (a slow one: "
                         f"raise --coordinator-timeout; a killed one: see its own output); XLA: "
                         f"{str(e).splitlines()[0][:200]}") from None
    stopped = sorted(client.key_value_dir_get("jnnex-stopped/"), key=lambda kv: int(kv[0].rsplit("/", 1)[1]))
    if stopped:
        raise ValueError(f"{who}: stopping, as " + "; ".join(f"process {k.rsplit('/', 1)[1]} stopped before "
                                                            f"training: {v}" for k, v in stopped))


def stopped_before_start(error: BaseException) -> None:
    """This process stops (``error``) before its first run started together: tell the others, waiting in
    :func:`start_together`, and wait until they have heard. Nothing once the run has started, or in one process.
    The command line calls it on any error it reports; :func:`tells_the_others` wraps the library's entry points."""
    taken = _take_start()
    if taken is None:
        return
    client, timeout = taken
    said = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    try:
        client.key_value_set(f"jnnex-stopped/{jax.process_index()}", said)
        client.wait_at_barrier("jnnex-start", int(timeout * 1000))
    except jax.errors.JaxRuntimeError:  # the others are gone already, or never came: nothing more to tell
        pass


def tells_the_others(fn: Callable) -> Callable:
    """``fn``, but an exception it raises before the first run started together is told to the other processes
    first (:func:`stopped_before_start`)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            stopped_before_start(e)
            raise
    return wrapped


def _keep_sigterm() -> None:
    """JAX's distributed runtime installs a SIGTERM handler of its own (for its preemption service), silently taking
    the signal from Python's; put Python's back, so that SIGTERM stops training as Ctrl-C does (jnnex.train)."""
    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGTERM)
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


# ----------------------------------------------------------------------------------------------------------------------
# The explicit form


def synchronised(model: LanguageModel, axis_name: str | None) -> LanguageModel:
    """``model`` with its BatchNorm statistics taken over every device along mesh axis ``axis_name`` (its config's
    ``batch_axis``, which each BatchNorm kernel receives as its ``axis_name``); a model without BatchNorm as it is."""
    if not any(f.name == "batch_axis" for f in dataclasses.fields(model.cfg)):
        return model
    return dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, batch_axis=axis_name))


def explicit_step(model: LanguageModel, optimizer: optax.GradientTransformation, mesh, *,
                  sync_batchnorm: bool = True) -> Callable:
    """``step(ts, batch, key) -> (ts, metrics)`` written with ``jax.shard_map``: each device gets its shard of the
    batch and a full copy of ``ts``; jit it. The same update as :func:`jnnex.train.make_step` on the global batch.

    Inside, per device ``d`` with ``n_d`` valid targets of the ``n = psum(n_d)`` in the batch, the global loss is
    ``L = Σ_d n_d · L_d / n`` (the token-weighted mean over the whole batch):

    * autodiff (``model.gradients == "autodiff"``): ``jax.grad`` of ``psum(n_d · L_d) / n`` — the reduced loss, so
      the gradient of the replicated parameters comes out right (see :func:`pitfall_step` for the wrong way);
    * hand-written: the local forward, the cross-entropy backward seeded with ``dL/dL_d = n_d / n``, the model's
      backward; then ``psum`` of the local parameter gradients.

    ``sync_batchnorm``: BatchNorm statistics (and their gradients) over the global batch, by ``pmean`` across
    devices; ``False``: each device normalises with its own shard's statistics.
    """

    model = synchronised(model, DATA if sync_batchnorm else None)

    def local_step(ts, x, y, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(DATA))  # dropout: each shard its own masks
        n_local = (y >= 0).sum(dtype=jnp.int32)
        n = jax.lax.psum(n_local, DATA)
        if model.gradients == "manual":
            dt = jnp.result_type(float)  # float64 under jax_enable_x64: the seed keeps the model's precision
            share = n_local.astype(dt) / n.astype(dt)  # dL/dL_d
            out = manual_gradients(model, ts.params, ts.state, x, y, key, dloss=share)
            share = share.astype(out.loss.dtype)
            grads = jax.lax.psum(out.grads, DATA)
            loss, new_state = jax.lax.psum(out.loss * share, DATA), out.state
        else:
            def global_loss(params):
                loss_d, new_state = model.objective(params, ts.state, x, y, key)
                share = n_local.astype(loss_d.dtype) / n.astype(loss_d.dtype)
                return jax.lax.psum(loss_d * share, DATA), new_state

            (loss, new_state), grads = jax.value_and_grad(global_loss, has_aux=True)(ts.params)
        if not sync_batchnorm:  # each device's running statistics differ; keep their mean, replicated
            new_state = jax.lax.pmean(new_state, DATA)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        return type(ts)(params, new_state, opt_state, ts.step + 1), {"loss": loss}

    sharded = jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(DATA), P(DATA), P()), out_specs=(P(), P()))
    return lambda ts, batch, key: sharded(ts, *batch, key)


def pitfall_step_gradients(model: LanguageModel, mesh) -> Callable:
    """``grads(params, state, x, y)``: the common mistake, kept to be tested — ``pmean`` over devices of each device's
    ``jax.grad`` of its *local* loss. Under ``shard_map`` the parameters are a replicated input, whose cotangent
    autodiff already sums over the devices; the extra ``pmean`` leaves that sum, ``N`` times the right gradient."""

    def local(params, state, x, y):
        g = jax.grad(lambda p: model.objective(p, state, x, y)[0])(params)
        return jax.lax.pmean(g, DATA)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(DATA), P(DATA)), out_specs=P())
