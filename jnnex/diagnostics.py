"""Seeing inside training (makemore part 3): activation, gradient and update statistics per layer, per step.

Everything is computed **inside the jitted training step**, from the forward and backward the step does anyway:

* per hidden layer (the tanh outputs): mean, std, saturation (fraction with ``|tanh| > 0.97``), and the mean and std
  of the loss gradient w.r.t. those activations;
* per weight matrix (every 2-D parameter, embeddings included): gradient mean and std, the grad:data ratio
  ``std(grad) / std(W)``, and the update:data ratio ``log10(std(ΔW) / std(W))`` of the update actually applied
  (``ΔW = -lr·grad`` for SGD).

What healthy looks like: saturation of a few percent (not 0 %, not 50 %); activation std steady across layers;
update:data near ``-3`` (updates about 1/1000 of the weights). Far below, the net learns too slowly; far above, too fast.

The activations come from the model's one forward and their gradients from its hand-written backward, which computes
``dloss/dact`` on its way to the parameters anyway: one forward and one backward per step, nothing added to the
model's code. :func:`jnnex.train.make_step` with ``diagnostics=True`` puts these figures in every step's metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jnnex.lm import LanguageModel, manual_gradients

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


def activation_gradients(model: LanguageModel, params, state, x, y, key=None):
    """``(acts, act_grads)``: each hidden layer's activations on the batch ``(x, y)`` (train mode) and the loss
    gradient w.r.t. them, from one forward and the model's hand-written backward — e.g. for histograms. ``key``:
    a stochastic model's dropout masks (default: ``jax.random.key(0)``)."""
    if key is None and model.stochastic:
        key = jax.random.key(0)
    out = _manual_gradients(model, params, state, x, y, key)
    return out.acts, out.act_grads


# One compiled program for the forward and the hand-written backward (op by op, a GPT's took 2 s a call, mostly
# compiling each op for its shape); the model is static: equal configs share the program.
_manual_gradients = jax.jit(manual_gradients, static_argnums=0)


def table(metrics: dict, names: list[str], step: int = -1) -> str:
    """A text table of one step's diagnostics (default: the last)."""
    lines = ["layer   act mean   act std  saturated   grad mean   grad std"]
    for i in range(len(metrics["act_mean"][step])):
        lines.append(f"act {i:<3} {float(metrics['act_mean'][step][i]):+9.4f} {float(metrics['act_std'][step][i]):9.4f}"
                     f" {100 * float(metrics['act_saturation'][step][i]):9.2f}% "
                     f"{float(metrics['act_grad_mean'][step][i]):+11.3e} {float(metrics['act_grad_std'][step][i]):10.3e}")
    lines.append("")
    lines.append(f"{'weight':<22} {'grad mean':>11} {'grad std':>10} {'grad:data':>10} {'log10 update:data':>18}")
    for i, name in enumerate(names):
        lines.append(f"{name:<22} {float(metrics['grad_mean'][step][i]):+11.3e} {float(metrics['grad_std'][step][i]):10.3e}"
                     f" {float(metrics['grad_data'][step][i]):10.3e} {float(metrics['update_data'][step][i]):18.2f}")
    return "\n".join(lines)


def gradient_through_time(model: LanguageModel, params, state, x, y_last, key=None) -> jax.Array:
    """``‖∂L/∂h_t‖`` for ``t = 0 … T-1`` (mean over the batch), where ``L`` is the loss of the **last** position's
    prediction alone — the textbook picture of backprop through time: how much of one prediction's gradient reaches
    the states before it. A plain RNN's profile decays (vanishes) or grows (explodes) geometrically going back; a
    GRU's update gate can carry it unchanged.

    Args:
        model: a per-position model whose backward returns ``dL/dh_t (B, T, H)`` as its first ``act_grads``
            (``rnn``, ``gru``).
        x: ``(B, T)`` inputs; ``y_last``: ``(B,)`` the targets of the last position.
    Returns:
        ``(T,)``: the mean over the batch of each step's gradient norm.
    """
    if not model.per_position:
        raise ValueError(f"gradient_through_time needs a per-position model, got {model.name!r}")
    y = jnp.full(x.shape, -1, jnp.int32).at[:, -1].set(y_last)  # only the last position is predicted
    out = _manual_gradients(model, params, state, x, y, key)
    return jnp.linalg.norm(out.act_grads[0], axis=-1).mean(0)  # (T,)
