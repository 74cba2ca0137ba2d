# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 8 — recurrent nets and backpropagation through time
#
# **What you will learn**: a recurrent net reads a name one character at a time, carrying a hidden state (the RNN and
# GRU cells written on the page, equal to jnnex's); its backward runs the same recurrence in reverse
# (backpropagation through time, written here too). How much of a late prediction's
# gradient reaches the early states decides what the net can learn — a plain tanh RNN's gradient shrinks step by step
# going back (it vanishes), a GRU's gates can carry it.
#
# Code: `jnnex/models/rnn.py` (makemore.py's RNN and GRU, their backward by hand), `jnnex/diagnostics.py`
# (`gradient_through_time`). Background: makemore.py (<https://github.com/karpathy/makemore>); Cho et al. 2014.
#
# **Full size** (`python lessons/08_rnn.py`, names.txt, 2 cores, 143 s measured, make lessons): 50,000 steps
# of 32 names each — the RNN val **2.0531**, the GRU **2.0097** (the README's protocol table). The last prediction's
# gradient at the first of 10 steps, as a fraction of its value at the last: RNN 8.0e-5 at init, 0.062 trained; GRU
# 5.2e-3 at init, 0.19 trained — the GRU's gates carry it 3–65 times further. The page's cells equal jnnex's (0.0 for
# the RNN, 1.2e-7 for the GRU), and so does its backprop through time (7.0e-8 of the largest norm).

# %%
import jax
import numpy as np

from jnnex import learn
from jnnex.data import Vocab, make_splits
from jnnex.diagnostics import gradient_through_time
from jnnex.lm import evaluate
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.train import fit

plt = learn.pyplot()
words, source = learn.names()
vocab = Vocab.from_words(words)
STEPS = learn.pick(50_000, 200)

# %% [markdown]
# ## 1. The cells, written here
#
# makemore.py's RNN cell is one line: `h_t = tanh([x_t, h_{t−1}] W + b)`. The GRU adds two gates computed from the
# same `[x_t, h_{t−1}]`: an update gate `z` that decides how much of the state to replace, and a reset gate `r` that
# decides how much of the old state the candidate sees. The model embeds each character, runs the cell along the
# name from a learned start state, and reads logits off every `h_t`.

# %%
import jax.numpy as jnp  # noqa: E402


def rnn_cell(x, h, W, b):
    return jnp.tanh(jnp.concatenate([x, h], axis=-1) @ W + b)


def gru_cell(x, h, Wz, bz, Wr, br, Wh, bh):
    xh = jnp.concatenate([x, h], axis=-1)
    z = jax.nn.sigmoid(xh @ Wz + bz)  # update gate
    r = jax.nn.sigmoid(xh @ Wr + br)  # reset gate
    hbar = jnp.tanh(jnp.concatenate([x, r * h], axis=-1) @ Wh + bh)  # candidate
    return (1 - z) * h + z * hbar


def recurrent_logits(p, x, cell):
    emb = p.C[x]  # (B, T, E)
    h = jnp.broadcast_to(p.start, (x.shape[0], p.start.shape[0]))  # (B, H): the learned start state
    weights = [a for lin in p.cell for a in lin]  # W, b (rnn); Wz, bz, Wr, br, Wh, bh (gru)
    hs = []
    for t in range(x.shape[1]):  # one character at a time
        h = cell(emb[:, t], h, *weights)
        hs.append(h)
    hs = jnp.stack(hs, axis=1)  # (B, T, H)
    return hs @ p.head.W + p.head.b, hs


probe_model = build_for_words(REGISTRY["rnn"], words, vocab)
xs = make_splits(words, probe_model.block_size, vocab=vocab, per_position=True).train[0][:16]
cell_gap = {}
for name, cell in (("rnn", rnn_cell), ("gru", gru_cell)):
    m = build_for_words(REGISTRY[name], words, vocab)
    p0, s0 = m.init(jax.random.key(0))
    page, _ = recurrent_logits(p0, jnp.asarray(xs), cell)
    cell_gap[name] = float(jnp.abs(page - m.forward(p0, s0, jnp.asarray(xs), train=False).logits).max())
    print(f"{name}: the page's cell, run along 16 names, vs jnnex's forward: largest logit difference "
          f"{cell_gap[name]:.1e}")

# %% [markdown]
# ## 2. Train both cells
#
# The same protocol as every makemore.py model: AdamW 5e-4, batch 32 names, every position predicted, the backward
# by hand (`--backward manual`).

# %%
results = {}
for name in ("rnn", "gru"):
    model = build_for_words(REGISTRY[name], words, vocab).with_gradients("manual")
    splits = make_splits(words, model.block_size, vocab=vocab, per_position=True)
    run = fit(model, splits.train, REGISTRY[name].train.with_steps(STEPS))
    results[name] = (model, run.ts.params, evaluate(model, run.ts.params, (), *splits.dev))
    print(f"{name}: val {results[name][2]:.4f}")

# %% [markdown]
# ## 3. How far back does a prediction's gradient reach?
#
# Take long names, let only the **last** position's prediction count, and measure `‖∂L/∂h_t‖` at every step `t`:
# the gradient flowing back through the recurrence. Plotted on a log scale, relative to the last step.

# %%
long = [w for w in words if len(w) >= 10][:256]
seq = make_splits(long, results["rnn"][0].block_size, fractions=(1.0,), vocab=vocab, per_position=True).train
L = min(len(w) for w in long)  # every name has at least L characters: cut the window there
x, y_last = seq[0][:, :L], seq[1][:, L - 1]
fig, ax = plt.subplots(figsize=(6, 3.8))
reach = {}
for name, (model, params, _) in results.items():
    for label, p in (("init", model.init(jax.random.key(0))[0]), ("trained", params)):
        g = np.asarray(gradient_through_time(model, p, (), x, y_last))
        g = g / g[-1]
        reach[f"{name}_{label}"] = float(g[0])
        ax.semilogy(np.arange(L), g, "--" if label == "init" else "-", label=f"{name}, {label}")
ax.set(title="gradient of the last prediction at each step", xlabel="step t (the last one predicts)",
       ylabel="‖∂L/∂h_t‖ ÷ its value at the last step")
ax.legend()
learn.show(fig, "08-gradient-through-time")
for k, v in reach.items():
    print(f"{k:12} gradient at the first step: {v:.2e} of the last's")

# %% [markdown]
# Backpropagation through time for the RNN, written here. Only the last prediction counts, so `∂L/∂h` starts at the
# last step, from the head. Each step back multiplies it by the tanh's slope `1 − h_t²` and by the part of `W` that
# the state came in through. That repeated product is what makes it shrink.

# %%
def bptt_norms(p, x, y_last):
    logits, hs = recurrent_logits(p, x, rnn_cell)
    B, E = x.shape[0], p.C.shape[1]
    dlogits = (jax.nn.softmax(logits[:, -1]) - jax.nn.one_hot(y_last, logits.shape[-1])) / B  # (B, V)
    dh = dlogits @ p.head.W.T  # ∂L/∂h at the last step
    norms = [jnp.linalg.norm(dh, axis=-1).mean()]
    W_h = p.cell[0].W[E:]  # (H, H): the rows the previous state multiplies
    for t in range(x.shape[1] - 1, 0, -1):  # back in time
        da = (1 - hs[:, t] ** 2) * dh  # through the tanh
        dh = da @ W_h.T  # to the previous state
        norms.append(jnp.linalg.norm(dh, axis=-1).mean())
    return jnp.stack(norms[::-1])


rnn_model, rnn_params, _ = results["rnn"]
page_norms = bptt_norms(rnn_params, jnp.asarray(x), jnp.asarray(y_last))
lib_norms = gradient_through_time(rnn_model, rnn_params, (), x, y_last)
bptt_gap = float(jnp.abs(page_norms - lib_norms).max() / lib_norms.max())
print(f"the page's backprop through time vs jnnex's (the trained RNN, {L} steps): largest difference "
      f"{bptt_gap:.1e} of the largest norm")

# %% [markdown]
# ## What to try next
#
# * Widen the RNN's hidden state (`n_embd2`): does the gradient reach further back?
# * Remove the GRU's update gate (set it to 1 in `rnn.py`): what happens to its curve?
# * Lesson 7's transformer reads every position directly: where is its "gradient through time"?

# %%
learn.result(rnn_val=results["rnn"][2], gru_val=results["gru"][2], **{f"reach_{k}": v for k, v in reach.items()},
             steps=STEPS, data=source, cell_gap=cell_gap, bptt_gap=bptt_gap)
