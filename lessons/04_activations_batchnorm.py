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
# # Lesson 4 — activations, gradients and BatchNorm
#
# **What you will learn**: why the initial loss should be `ln 27`, what saturated tanh units do to gradients, how
# Kaiming's gain keeps activations alive through five layers, what BatchNorm does about it, and how to watch a
# net's health while it trains (the update:data ratio).
#
# Lecture: *Building makemore Part 3: Activations & Gradients, BatchNorm*
# (<https://www.youtube.com/watch?v=P6sfmUTpUmc>).
# Code: `jnnex/models/mlp_lm.py` (the ladder), `jnnex/models/bn_mlp.py`, `jnnex/diagnostics.py`.
#
# **Full size** (`python lessons/04_activations_batchnorm.py`, names.txt, 2 cores, 101 s, measured): the lecture's
# ladder, 200,000 steps a rung (first loss → train / val) — original 26.4 → 2.1248 / 2.1608, softmax fixed 3.29 →
# 2.0700 / 2.1361, tanh fixed 3.28 → 2.0379 / 2.1000, Kaiming 3.28 → 2.0380 / 2.1027, + BatchNorm 3.31 → **2.0666 /
# 2.1058** (the lecture: 2.0668 / 2.1048).

# %%
import jax
import numpy as np

from jnnex import learn, run
from jnnex.data import Vocab, make_splits
from jnnex.diagnostics import activation_gradients, weight_names
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.optim import TrainConfig
from jnnex.train import fit

plt = learn.pyplot()
words, source = learn.names()
vocab = Vocab.from_words(words)
STEPS = learn.pick(200_000, 100)  # per rung of the ladder
WATCH = learn.pick(1_000, 20)  # steps of the deep net trained with diagnostics

# %% [markdown]
# ## 1. The ladder: each fix of the initialisation, trained with the same budget
#
# * **original** — every parameter N(0, 1): the first loss is ~27, confidently wrong;
# * **softmax fixed** — the output layer scaled down: the first loss is `ln 27 = 3.30`;
# * **tanh fixed** — the hidden layer scaled down too: fewer saturated units;
# * **Kaiming** — the hidden layer's std `(5/3) / sqrt(fan_in)`, the principled version;
# * **+ BatchNorm** — each hidden unit standardised over the batch, then scaled and shifted by learned parameters.

# %%
rows = run.ladder(source, STEPS)
for r in rows:
    print(f"{r['rung']:<14} first loss {r['initial_loss']:6.2f}   train {r['train']:.4f}   val {r['val']:.4f}")
fig, ax = plt.subplots(figsize=(7, 3.5))
x = np.arange(len(rows))
ax.bar(x - 0.2, [r["train"] for r in rows], 0.4, label="train")
ax.bar(x + 0.2, [r["val"] for r in rows], 0.4, label="val")
ax.set_xticks(x, [r["rung"] for r in rows])
ax.set(title="makemore part 3's ladder", xlabel="rung", ylabel="loss after training", ylim=(1.9, 2.3))
ax.legend()
learn.show(fig, "04-ladder")

# %% [markdown]
# ## 2. Saturated tanh units, and the gain that avoids them
#
# A 5-layer tanh net without BatchNorm at initialisation: with a gain of 1 the activations shrink layer by layer; with
# a gain of 3 most units sit at ±1, where tanh's gradient `1 − t²` is zero. Kaiming's 5/3 keeps them spread.

# %%
spec = REGISTRY["deep-mlp"]
splits = make_splits(words, 3, vocab=vocab)
x, y = splits.train[0][:500], splits.train[1][:500]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharey=True)
for ax, gain in zip(axes, (1.0, 5 / 3, 3.0)):
    net = build_for_words(spec, words, vocab, batchnorm=False, gain=gain)
    params, state = net.init(jax.random.key(0))
    acts, _ = activation_gradients(net, params, state, x, y)
    for i, a in enumerate(acts):
        a = np.asarray(a).ravel()
        hist, edges = np.histogram(a, bins=60, range=(-1, 1), density=True)
        ax.plot((edges[1:] + edges[:-1]) / 2, hist, label=f"layer {i + 1}: {np.mean(np.abs(a) > 0.97):.0%} saturated")
    ax.set(title=f"tanh outputs at init, gain {gain:.3g}", xlabel="activation", ylabel="density")
    ax.legend(fontsize=7)
learn.show(fig, "04-tanh-histograms")

# %% [markdown]
# ## 3. Watching training: the update:data ratio
#
# `log10(std(ΔW) / std(W))` per weight matrix per step: how big each update is next to the weights it changes.
# Around −3 is healthy (the lecture's rule of thumb); far below, a layer learns too slowly.

# %%
deep = build_for_words(spec, words, vocab).with_gradients("manual")
watch = fit(deep, splits.train, TrainConfig(steps=WATCH, eval_every=WATCH, chunk=WATCH), diagnostics=True)
ratios = np.asarray(watch.metrics["update_data"])  # (steps, weight matrices)
names = weight_names(watch.ts.params)
fig, ax = plt.subplots(figsize=(7, 3.5))
for i, name in enumerate(names):
    ax.plot(ratios[:, i], label=name, lw=1)
ax.axhline(-3, color="k", ls="--", label="1e-3")
ax.set(title="update:data ratio of each weight matrix", xlabel="step", ylabel="log10 std(ΔW) / std(W)")
ax.legend(fontsize=7)
learn.show(fig, "04-update-ratio")

# %% [markdown]
# ## What to try next
#
# * Set `batchnorm=False` and `gain=1` on the deep net and train it: which layers stop learning?
# * Double the learning rate and watch the update:data ratios move up by log10(2).
# * BatchNorm couples the examples of a batch: what does that do at batch size 1? (Lesson 5 writes its backward.)

# %%
bn = rows[-1]
learn.result(bn_train=bn["train"], bn_val=bn["val"], original_first_loss=rows[0]["initial_loss"],
             kaiming_first_loss=rows[3]["initial_loss"], final_update_ratio_mean=float(ratios[-1].mean()),
             steps=STEPS, data=source)
