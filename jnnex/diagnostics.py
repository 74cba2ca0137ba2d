"""Seeing inside training (makemore part 3): activation, gradient and update statistics per layer, per step.

Everything is computed **inside the jitted training step**, from the forward and backward the step does anyway:

* per hidden layer (the tanh outputs): mean, std, saturation (fraction with ``|tanh| > 0.97``), and the mean and std
  of the loss gradient w.r.t. those activations;
* per weight matrix (every 2-D parameter, embeddings included): gradient mean and std, the grad:data ratio
  ``std(grad) / std(W)``, and the update:data ratio ``log10(std(ΔW) / std(W))`` of the update actually applied
  (``ΔW = -lr·grad`` for SGD).

What healthy looks like: saturation of a few percent (not 0 %, not 50 %); activation std steady across layers;
update:data near ``-3`` (updates about 1/1000 of the weights). Far below, the net learns too slowly; far above, too fast.

The activation gradients come from zero "probes" added to the activations: differentiating w.r.t. the probes gives
``dloss/dact`` in the same ``jax.value_and_grad`` call, so no second forward pass is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jnnex.layers import cross_entropy_forward
from jnnex.lm import LanguageModel

SATURATION = 0.97  # |tanh| above this counts as saturated: its gradient (1 - t²) is below 0.06


def weight_names(params) -> list[str]:
    """Names of the 2-D parameters (weight matrices and embedding tables), in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [jax.tree_util.keystr(path) for path, leaf in leaves if jnp.ndim(leaf) == 2]


def _weights(tree) -> list:
    return [leaf for leaf in jax.tree.leaves(tree) if jnp.ndim(leaf) == 2]


def step_diagnostics(acts, act_grads, params, grads, new_params) -> dict[str, jax.Array]:
    """The per-layer figures of one step; each value is an (L,) or (P,) array (L hidden layers, P weight matrices)."""
    stack = lambda xs: jnp.stack(xs) if xs else jnp.zeros((0,), jnp.float32)  # noqa: E731
    Ws, Gs, Ns = _weights(params), _weights(grads), _weights(new_params)
    return {
        "act_mean": stack([a.mean() for a in acts]),
        "act_std": stack([a.std() for a in acts]),
        "act_saturation": stack([(jnp.abs(a) > SATURATION).mean(dtype=a.dtype) for a in acts]),
        "act_grad_mean": stack([g.mean() for g in act_grads]),
        "act_grad_std": stack([g.std() for g in act_grads]),
        "grad_mean": stack([g.mean() for g in Gs]),
        "grad_std": stack([g.std() for g in Gs]),
        "grad_data": stack([g.std() / w.std() for g, w in zip(Gs, Ws)]),
        "update_data": stack([jnp.log10((n - w).std() / w.std()) for n, w in zip(Ns, Ws)]),
    }


def _check(model: LanguageModel) -> None:
    if model.forward_fn is None:
        raise ValueError(f"model {model.name!r} does not expose its activations (no forward_fn): no diagnostics")


def _value_and_grads(model: LanguageModel, params, state, x, y):
    """One train-mode forward and backward: ``((loss, (new_state, acts)), (grads, act_grads))``.

    Zero probes added to the activations make ``act_grads = dloss/dacts`` come out of the same ``value_and_grad``.
    """

    def objective(params, probes):
        logits, new_state, acts = model.forward_fn(model.cfg, params, state, x, True, probes)
        loss = cross_entropy_forward(logits, y)[0]
        if model.penalty_fn is not None:
            loss = loss + model.penalty_fn(model.cfg, params)
        return loss, (new_state, acts)

    shapes = jax.eval_shape(lambda: model.forward_fn(model.cfg, params, state, x, True, None))[2]
    probes = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
    return jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(params, probes)


def activation_gradients(model: LanguageModel, params, state, x, y):
    """``(acts, act_grads)``: each hidden layer's activations on the batch ``(x, y)`` and the loss gradient w.r.t.
    them (train mode), e.g. for histograms."""
    _check(model)
    (_, (_, acts)), (_, act_grads) = _value_and_grads(model, params, state, x, y)
    return acts, act_grads


def make_diagnostic_step(model: LanguageModel, optimizer: optax.GradientTransformation) -> Callable:
    """Like :func:`jnnex.train.make_step`, with :func:`step_diagnostics` in its metrics (needs ``model.forward_fn``)."""
    from jnnex.train import TrainState

    _check(model)

    def step(ts: TrainState, batch, key):
        del key
        x, y = batch
        (loss, (new_state, acts)), (grads, act_grads) = _value_and_grads(model, ts.params, ts.state, x, y)
        with jax.numpy_dtype_promotion("standard"):  # optax's internals (see jnnex.train.make_step)
            updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        metrics = {"loss": loss, **step_diagnostics(acts, act_grads, ts.params, grads, params)}
        return TrainState(params, new_state, opt_state, ts.step + 1), metrics

    return step


def table(metrics: dict, names: list[str], step: int = -1) -> str:
    """A text table of one step's diagnostics (default: the last)."""
    lines = ["layer   act mean   act std  saturated   grad mean   grad std"]
    for i in range(len(metrics["act_mean"][step])):
        lines.append(f"tanh {i:<2} {float(metrics['act_mean'][step][i]):+9.4f} {float(metrics['act_std'][step][i]):9.4f}"
                     f" {100 * float(metrics['act_saturation'][step][i]):9.2f}% "
                     f"{float(metrics['act_grad_mean'][step][i]):+11.3e} {float(metrics['act_grad_std'][step][i]):10.3e}")
    lines.append("")
    lines.append(f"{'weight':<22} {'grad mean':>11} {'grad std':>10} {'grad:data':>10} {'log10 update:data':>18}")
    for i, name in enumerate(names):
        lines.append(f"{name:<22} {float(metrics['grad_mean'][step][i]):+11.3e} {float(metrics['grad_std'][step][i]):10.3e}"
                     f" {float(metrics['grad_data'][step][i]):10.3e} {float(metrics['update_data'][step][i]):18.2f}")
    return "\n".join(lines)
