"""Tensor parallelism, Megatron-LM's way, on the model's one definition.

The kernels are :mod:`jnnex.collectives`: Megatron's conjugate ``f``/``g`` and the column- and row-parallel linears,
each forward above its hand-written backward, the all-reduces written out. A model that can be split calls them where
it calls a linear, with the mesh axis its config carries (``cfg.model_axis``; ``None`` on one device, where they are
the plain linear), and declares its split as data (``LanguageModel.split_fn``: which linear of each block splits by
columns, which by rows, and how a fused output's columns group into heads or gate/value pairs). This module turns
that declaration into the devices' layout and runs the model's own forward and backward under ``jax.shard_map`` — no
second copy of any model:

* :func:`specs` — each parameter's ``PartitionSpec`` along ``"model"``: column-split weights ``P(None, "model")``
  (their biases with them), row-split ``P("model", None)`` (their biases replicated: added once, after the
  all-reduce), everything else replicated;
* :func:`for_devices` / :func:`from_devices` — a column-split weight's columns reordered so that the ``n`` contiguous
  blocks ``P(..., "model")`` hands the devices are each one device's heads (its queries, keys and values side by side)
  or hidden units (its gate and value), and back;
* :func:`split_value_and_grad` — on a ``data × model`` mesh (:func:`mesh_2d`), each device runs the model with
  ``model_axis="model"`` and ``batch_axis="data"`` on its rows and slices, seeds the cross-entropy's backward with its
  share of the global mean, runs the model's hand-written backward and sums the gradients over ``"data"``;
  :func:`split_step` adds the optimiser in the global view (a global-norm clip sums every slice, Muon sees whole
  matrices). Dropout masks are drawn for the whole batch (``batch_axis``), so a split run drops what one device does;
  bfloat16 is the model's own; diagnostics read the same forward's activations.

``jnnex.train.fit(..., devices=N, model_parallel=M)`` (``jnnex train --devices N --model-parallel M``) trains with it
(:func:`train_layout`). Every pair and the models' steps are proven against the unsplit layers and models in float64
(``tests/test_tensor_parallel.py``), where the all-reduces are also counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jnnex.collectives import MODEL, Column, ExpertsSplit, Row, check_divides
from jnnex.diagnostics import step_diagnostics
from jnnex.layers import Linear, cross_entropy_backward, cross_entropy_forward
from jnnex.lm import LanguageModel, grouped_config
from jnnex.parallel import DATA


def model_mesh(devices: int | Sequence | None = None) -> jax.sharding.Mesh:
    """A one-axis mesh ``("model",)`` over the first ``devices`` of ``jax.devices()`` (or the given devices; all for
    ``None``), for ``jax.shard_map``; its axis type is ``Auto``, so a jitted ``shard_map`` splits whole arrays by its
    ``in_specs`` itself."""
    if devices is None:
        devices = jax.devices()
    elif isinstance(devices, int):
        if not 1 <= devices <= len(jax.devices()):
            raise ValueError(f"devices: the model axis needs 1 to {len(jax.devices())} devices (those JAX sees), got "
                             f"{devices}")
        devices = jax.devices()[:devices]
    return jax.sharding.Mesh(np.array(devices), (MODEL,), axis_types=(AxisType.Auto,))


def mesh_2d(data: int, model: int, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A ``("data", "model")`` mesh of ``data × model`` devices (the first of ``jax.devices()``, or those given):
    the batch split along ``"data"``, each layer along ``"model"`` (a device's neighbours on the model axis are
    adjacent in the device list: on a GPU node, the tensor-parallel all-reduces stay on its fastest links)."""
    for name, size in (("data", data), ("model", model)):
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"mesh: the {name} axis must be an integer >= 1, got {size!r}")
    available = list(jax.devices()) if devices is None else list(devices)
    if data * model > len(available):
        raise ValueError(f"mesh: data {data} × model {model} = {data * model} devices, but only {len(available)} "
                         f"exist (on CPU, start with JAX_NUM_CPU_DEVICES={data * model} for more)")
    grid = np.array(available[:data * model]).reshape(data, model)
    return jax.sharding.Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


# ----------------------------------------------------------------------------------------------------------------------
# The split, from the model's rules


def rules_of(model: LanguageModel) -> dict:
    """The model's split (``{block field: Column | Row}``); a clear error for a model that declares none (the run
    driver names the registered models that do: :func:`jnnex.models.registry.splittable`)."""
    if model.split_fn is None:
        raise ValueError(f"tensor parallel: model {model.name!r} has no split across devices (its layers are not "
                         "Megatron's column/row pairs: it declares no split_fn)")
    return model.split_fn(model.cfg)


def check_split(model: LanguageModel, n: int) -> None:
    """A clear error for a split ``n`` ways that a rule's units (heads, hidden units) do not divide."""
    for rule in rules_of(model).values():
        if isinstance(rule, Column):
            for part in rule.parts:
                check_divides(part.name, part.count, n)
        if isinstance(rule, ExpertsSplit):
            check_divides(rule.hidden.name, rule.hidden.count, n)


def for_devices(W, parts, n: int):
    """A column-split weight (or bias) ``W (..., width)`` whose fused output is ``parts`` side by side, with its
    columns reordered so that ``n`` equal contiguous blocks (what ``P(..., "model")`` hands the devices) are each
    ``n``-th of every part's units, side by side: the GPT's ``qkv`` becomes each device's heads' ``[q | k | v]``, the
    Llama's ``[q | k | v]`` of its query heads and the key/value heads their groups share, a SwiGLU's ``fc`` each
    device's ``[gate | value]``. One part (a plain ``fc``) needs no reordering. :func:`from_devices` undoes it.

    >>> from jnnex.collectives import Part
    >>> heads = Part("n_head", 4, 1)  # q0 q1 q2 q3 | k0 .. | v0 .., head size 1, over 2 devices
    >>> for_devices(jnp.arange(12, dtype=jnp.int32), (heads, heads, heads), n=2)
    Array([ 0,  1,  4,  5,  8,  9,  2,  3,  6,  7, 10, 11], dtype=int32)
    """
    for part in parts:
        check_divides(part.name, part.count, n)
    if len(parts) == 1:
        return W
    *lead, width = W.shape
    bounds = np.cumsum([p.count * p.width for p in parts])[:-1].tolist()
    per_device = [a.reshape(*lead, n, a.shape[-1] // n) for a in jnp.split(W, bounds, axis=-1)]  # (..., device, cols)
    return jnp.concatenate(per_device, axis=-1).reshape(*lead, width)


def from_devices(W, parts, n: int):
    """The inverse of :func:`for_devices`: the columns back in the parts' own order."""
    if len(parts) == 1:
        return W
    *lead, width = W.shape
    bounds = np.cumsum([p.count * p.width // n for p in parts])[:-1].tolist()
    blocks = jnp.split(W.reshape(*lead, n, width // n), bounds, axis=-1)  # each (..., device, its columns)
    return jnp.concatenate([a.reshape(*lead, a.shape[-2] * a.shape[-1]) for a in blocks], axis=-1)


def _per_block(model: LanguageModel, tree, leaf: Callable, linear: Callable):
    """``tree`` (the parameters' structure) with every leaf ``leaf(x)``, except each block's split linears, which get
    ``linear(layer, rule)``."""
    rules = rules_of(model)
    out = jax.tree.map(leaf, tree)

    def block(b, mapped):
        return mapped._replace(**{name: linear(getattr(b, name), rule) for name, rule in rules.items()})

    return out._replace(blocks=tuple(block(b, m) for b, m in zip(tree.blocks, out.blocks)))


def specs(model: LanguageModel, params):
    """Where each of ``params``' tensors lives on the model axis (``PartitionSpec``s, the tree of ``params``):
    :class:`jnnex.collectives.Column` layers' weights by columns (their biases with them), :class:`~jnnex.collectives.
    Row` layers' by rows (their biases replicated), everything else replicated."""
    def linear(layer, rule):
        if isinstance(rule, ExpertsSplit):  # (every expert's hidden units; the router replicated)
            return jax.tree.map(lambda _: P(), layer)._replace(**{rule.column: P(None, None, MODEL),
                                                                   rule.row: P(None, MODEL, None)})
        if isinstance(rule, Row):
            return Linear(P(MODEL, None), None if layer.b is None else P())
        return Linear(P(None, MODEL), None if layer.b is None else P(MODEL))

    return _per_block(model, params, lambda _: P(), linear)


def layout(model: LanguageModel, params_like, n: int, inverse: bool = False):
    """One function per leaf of ``params_like``: :func:`for_devices` (or, with ``inverse``, :func:`from_devices`) for
    the column-split layers, the identity elsewhere — for whatever has the parameters' tree leaf by leaf (gradients,
    the optimiser's moments: :func:`optimizer_state_map`)."""
    move = from_devices if inverse else for_devices

    def linear(layer, rule):
        if isinstance(rule, ExpertsSplit):  # (one part: contiguous units, nothing to reorder)
            return jax.tree.map(lambda _: (lambda a: a), layer)
        if isinstance(rule, Row):
            return Linear(lambda a: a, None if layer.b is None else (lambda a: a))
        fn = lambda a: move(a, rule.parts, n)  # noqa: E731
        return Linear(fn, None if layer.b is None else fn)

    return _per_block(model, params_like, lambda _: (lambda a: a), linear)


def on_mesh(model: LanguageModel) -> LanguageModel:
    """The model as each device of a ``data × model`` mesh runs it: its kernels split along ``"model"``, its dropout
    masks drawn for the batch split along ``"data"``, its hand-written backward."""
    cfg = dataclasses.replace(model.cfg, model_axis=MODEL, batch_axis=DATA)
    return dataclasses.replace(model, cfg=cfg, gradients="manual")


# ----------------------------------------------------------------------------------------------------------------------
# The step


def split_value_and_grad(model: LanguageModel, mesh: jax.sharding.Mesh, params_like, *,
                         diagnostics: bool = False) -> Callable:
    """``f(params, state, x, y, key) -> (loss, grads, acts, act_grads)`` over ``mesh`` (:func:`mesh_2d`), written
    with ``jax.shard_map``: ``params`` whole in the device layout (:func:`specs` says what each device holds), ``x,
    y (B, T)`` split by rows along ``"data"``. Each device runs the model's own forward (:func:`on_mesh`) on its rows
    and slices, seeds the cross-entropy's backward with its share of the global mean (``n_d / n``: its valid targets
    over the batch's), runs the model's backward and sums the gradients over ``"data"`` (``psum``). ``acts`` and
    ``act_grads`` (``diagnostics``; else ``()``) come back whole, the batch's rows put together. A mixture of
    experts routes and counts its balancing loss on each data shard's rows, the shards' losses averaged: on one
    device, :func:`jnnex.lm.grouped_objective` with a group a data shard."""
    check_split(model, mesh.shape[MODEL])
    local_model = on_mesh(model)  # (and each data shard's balancing loss, averaged over them)
    local_model = dataclasses.replace(local_model, cfg=grouped_config(local_model.cfg, mesh.shape[DATA]))
    param_specs = specs(model, params_like)

    def local(params, state, x, y, key):
        out = local_model.forward(params, state, x, train=True, key=key)
        loss_d, c_ce = cross_entropy_forward(out.logits, y)
        n_d = (y >= 0).sum(dtype=jnp.int32)
        dt = jnp.result_type(float)  # float64 under jax_enable_x64: the seed keeps the model's precision
        share = n_d.astype(dt) / jax.lax.psum(n_d, DATA).astype(dt)  # dL/dL_d
        dlogits, _ = cross_entropy_backward(share.astype(out.logits.dtype), c_ce)
        grads, act_grads = local_model.backward_fn(local_model.cfg, params, out.caches, dlogits)
        grads = jax.lax.psum(grads, DATA)
        loss = jax.lax.psum(loss_d * share.astype(loss_d.dtype) + out.aux, DATA)  # (aux: experts' balancing loss)
        return loss, grads, (out.acts, tuple(act_grads)) if diagnostics else ((), ())

    rows = P(DATA)
    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, P(), rows, rows, P()),
                         out_specs=(P(), param_specs, (rows, rows) if diagnostics else ((), ())))


def split_step(model: LanguageModel, optimizer, mesh: jax.sharding.Mesh, params_like, *,
               diagnostics: bool = False) -> Callable:
    """``step(ts, batch, key) -> (ts, metrics)`` (:func:`jnnex.train.make_step`'s signature): the gradients from
    :func:`split_value_and_grad`, the optimiser in the global view outside ``shard_map``. ``diagnostics``: the
    per-layer figures of :mod:`jnnex.diagnostics` in the metrics, as one device's step gives them (means and
    standard deviations: the devices' column order does not change them). Jit it; ``ts.params`` in the device
    layout."""
    value_and_grad = split_value_and_grad(model, mesh, params_like, diagnostics=diagnostics)

    def step(ts, batch, key):
        key = jax.random.key(0) if key is None else key  # (unused without dropout; shard_map wants an array)
        loss, grads, (acts, act_grads) = value_and_grad(ts.params, ts.state, *batch, key)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        metrics = {"loss": loss}
        if diagnostics:
            metrics.update(step_diagnostics(acts, act_grads, ts.params, grads, params))
        return type(ts)(params, ts.state, opt_state, ts.step + 1), metrics

    return step


def shardings(mesh: jax.sharding.Mesh, specs):
    """``NamedSharding``s for a tree of ``PartitionSpec``s (``None`` leaves kept)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


# ----------------------------------------------------------------------------------------------------------------------
# What training needs of a split model


def optimizer_state_map(optimizer, fn: Callable, opt_state, *trees, other: Callable = lambda x: x):
    """``fn(leaf, *matching leaves of trees)`` applied to every parameter-shaped leaf of ``opt_state`` (Adam's moments,
    momentum; ``optax.tree_utils.tree_map_params``), ``other`` to the other fields (step counts: kept). The parts of
    a partitioned optimiser's state that belong to its other half (``optax.MaskedNode``), and absent tensors (a
    bias-free layer's ``None``), stay as they are."""
    def one(leaf, *rest):
        return leaf if leaf is None or isinstance(leaf, optax.MaskedNode) else fn(leaf, *rest)

    return optax.tree_utils.tree_map_params(optimizer, one, opt_state, *trees, transform_non_params=other,
                                            is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode))


def train_layout(model: LanguageModel, optimizer, mesh: jax.sharding.Mesh, ts):
    """For :func:`jnnex.train.fit`: ``(to_devices, to_host, shardings)`` — functions taking a training state (host
    arrays, the parameters' own layout) to the device layout and back, and the state's ``NamedSharding``s there."""
    n = mesh.shape[MODEL]
    check_split(model, n)
    apply = lambda fn, a: fn(a)  # noqa: E731
    there, back = layout(model, ts.params, n), layout(model, ts.params, n, inverse=True)

    def moved(fns, ts):
        params = jax.tree.map(apply, fns, ts.params)
        opt_state = optimizer_state_map(optimizer, lambda a, fn: fn(a), ts.opt_state, fns)
        return type(ts)(params, ts.state, opt_state, ts.step)

    rep = NamedSharding(mesh, P())
    param_shardings = shardings(mesh, specs(model, ts.params))
    opt_shardings = optimizer_state_map(optimizer, lambda _, s: s, ts.opt_state, param_shardings,
                                        other=lambda x: None if x is None else rep)
    state_layout = type(ts)(param_shardings, jax.tree.map(lambda _: rep, ts.state), opt_shardings, rep)
    return (lambda ts: moved(there, ts)), (lambda ts: moved(back, ts)), state_layout
