"""Expert parallelism (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021) on the model's one definition.

A mixture of experts holds ``E`` experts per block; here they are split over the devices of the ``"data"`` axis,
``E / n`` each, as the batch's rows are: each device routes its own tokens, sends every expert's buffer to the device
that holds the expert and gets the outputs back — ``jax.lax.all_to_all``, written out in the MoE layer's forward and
again in its hand-written backward (:mod:`jnnex.models.moe`, ``axis``). Everything else is data parallel: replicated,
its gradients summed over the devices.

The model runs its own forward and backward under ``jax.shard_map`` with ``expert_axis="data"`` in its config (and
``batch_axis="data"``: dropout masks drawn for the whole batch): no second copy of any model. Each device seeds the
cross-entropy's backward with its share of the batch's targets (``n_d / n``); the balancing loss counts every
device's tokens (its ``f_e`` and ``P_e`` summed over the axis), so it is the whole batch's, as on one device. An
expert's gradient is whole on its device (every token it served, from every device, sent its gradient back); the
router's and the rest are summed over ``"data"``.

Dropless (``expert_capacity`` none), a run on ``n`` devices is one device's run. With a capacity factor, each
device's tokens are one group (GShard's): a device drops what its own tokens overflow, where one device drops over
the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jnnex.diagnostics import step_diagnostics
from jnnex.layers import cross_entropy_backward, cross_entropy_forward
from jnnex.lm import LanguageModel
from jnnex.parallel import DATA


def check_experts(model: LanguageModel, n: int) -> None:
    """Clear errors for a model whose experts cannot split ``n`` ways."""
    E = getattr(model.cfg, "n_expert", None)
    if E is None:
        raise ValueError(f"expert parallelism: model {model.name!r} has no experts (the llama with --n-expert E has)")
    if E % n:
        raise ValueError(f"expert parallelism: the experts (n_expert {E}) must divide over the {n} devices; "
                         f"{E} experts split over {[d for d in range(1, E + 1) if E % d == 0]}")


def _is_experts(node) -> bool:
    return type(node).__name__ == "Experts"


def specs(params):
    """Each tensor's ``PartitionSpec``: every expert's weights split along ``"data"`` by expert (``W1``, ``W2``:
    their leading axis), everything else (the routers included) replicated."""
    def one(node):
        if _is_experts(node):
            return type(node)(P(), P(DATA), P(DATA))
        return jax.tree.map(lambda _: P(), node)

    return jax.tree.map(one, params, is_leaf=_is_experts)


def split_value_and_grad(model: LanguageModel, mesh: jax.sharding.Mesh, params_like, *,
                         diagnostics: bool = False) -> Callable:
    """``f(params, state, x, y, key) -> (loss, grads, acts, act_grads)`` over a ``("data",)`` mesh: the experts split
    by :func:`specs`, ``x, y`` by rows; the model's own forward and hand-written backward on each device, the
    non-expert gradients summed over ``"data"``. ``acts`` and ``act_grads`` (``diagnostics``) come back whole."""
    check_experts(model, mesh.shape[DATA])
    local_model = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, expert_axis=DATA, batch_axis=DATA),
                                      gradients="manual")
    param_specs = specs(params_like)

    def local(params, state, x, y, key):
        out = local_model.forward(params, state, x, train=True, key=key)
        loss_d, c_ce = cross_entropy_forward(out.logits, y)
        n_d = (y >= 0).sum(dtype=jnp.int32)
        dt = jnp.result_type(float)
        share = n_d.astype(dt) / jax.lax.psum(n_d, DATA).astype(dt)  # dL/dL_d
        dlogits, _ = cross_entropy_backward(share.astype(out.logits.dtype), c_ce)
        grads, act_grads = local_model.backward_fn(local_model.cfg, params, out.caches, dlogits)
        grads = jax.tree.map(lambda g, s: g if s == P(DATA) else jax.lax.psum(g, DATA), grads, param_specs)
        loss = jax.lax.psum(loss_d * share.astype(loss_d.dtype), DATA) + out.aux  # (the aux: the whole batch's)
        return loss, grads, (out.acts, tuple(act_grads)) if diagnostics else ((), ())

    rows = P(DATA)
    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, P(), rows, rows, P()),
                         out_specs=(P(), param_specs, (rows, rows) if diagnostics else ((), ())), check_vma=False)


def split_step(model: LanguageModel, optimizer, mesh: jax.sharding.Mesh, params_like, *,
               diagnostics: bool = False) -> Callable:
    """``step(ts, batch, key) -> (ts, metrics)``: the gradients from :func:`split_value_and_grad`, the optimiser in
    the global view (an expert's moments split with it)."""
    value_and_grad = split_value_and_grad(model, mesh, params_like, diagnostics=diagnostics)

    def step(ts, batch, key):
        key = jax.random.key(0) if key is None else key
        loss, grads, (acts, act_grads) = value_and_grad(ts.params, ts.state, *batch, key)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        metrics = {"loss": loss}
        if diagnostics:
            metrics.update(step_diagnostics(acts, act_grads, ts.params, grads, params))
        return type(ts)(params, ts.state, opt_state, ts.step + 1), metrics

    return step


def train_layout(model: LanguageModel, optimizer, mesh: jax.sharding.Mesh, ts):
    """The training state's ``NamedSharding``s: the experts' weights and moments split by expert, the rest
    replicated."""
    from jnnex.tensor_parallel import optimizer_state_map

    rep = NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs(ts.params), is_leaf=lambda x: isinstance(
        x, P))
    opt_shardings = optimizer_state_map(optimizer, lambda _, sh: sh, ts.opt_state, param_shardings,
                                        other=lambda x: None if x is None else rep)
    return type(ts)(param_shardings, jax.tree.map(lambda _: rep, ts.state), opt_shardings, rep)
