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
# # Lesson 6 — WaveNet: fusing the context slowly, as a tree and as dilated convolutions
#
# **What you will learn**: why squashing 8 characters into one layer at once is wasteful, how a tree fuses them two
# at a time (van den Oord et al. 2016), why BatchNorm over a (batch, position, channel) tensor takes its statistics
# over two axes, and how the same tree becomes causal dilated convolutions that predict every position at once.
#
# Lecture: *Building makemore Part 5: Building a WaveNet* (<https://www.youtube.com/watch?v=t3YJ5hKiMQ0>). Code:
# `jnnex/models/wavenet.py`.
#
# **Full size** (`python lessons/06_wavenet.py`, names.txt, 2 cores, 133 s measured, make lessons): the
# lecture's WaveNet (76,579 parameters, 200,000 steps of 32, lr 0.1 then 0.01 from step 150,000) reaches train
# 1.7664, val 1.9928, **test 1.9937** — the lecture's 1.9937; the convolutional form's logits equal the tree's. The `improved` preset (gated activations, dropout, AdamW) reaches val 1.948 over
# three seeds: `jnnex train --model wavenet --preset improved --data names.txt` (6–8 minutes a seed; not run here).

# %%
import jax
import jax.numpy as jnp
import numpy as np

from jnnex import learn
from jnnex.data import Vocab, make_splits
from jnnex.lm import count_params, evaluate, sample_words
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.train import fit

plt = learn.pyplot()
words, source = learn.names()
vocab = Vocab.from_words(words)
spec = REGISTRY["wavenet"]
STEPS = learn.pick(200_000, 300)

# %% [markdown]
# ## 1. The tree
#
# Eight characters, embedded (24 numbers each); at each level, neighbours are concatenated in pairs and mixed by a
# linear layer, BatchNorm and tanh: 8 → 4 → 2 → 1 node, then the output layer.

# %%
fig, ax = plt.subplots(figsize=(8, 3.2))
for level in range(4):
    n = 8 >> level
    xs = (np.arange(n) + 0.5) * (8 / n)
    ax.scatter(xs, np.full(n, level), s=300, color="#cde" if level else "#efe", zorder=3)
    if level:
        for i, x in enumerate(xs):
            for child in (2 * i, 2 * i + 1):
                ax.plot([x, (child + 0.5) * (8 / (2 * n))], [level, level - 1], color="0.5")
example = "emma"[:8].rjust(8, ".")
for i, ch in enumerate(example):
    ax.text(i + 0.5, -0.45, ch, ha="center", fontsize=12)
ax.set(title="the WaveNet tree over a window of 8 characters", xlabel="position in the window",
       ylabel="level (0: embeddings)", yticks=range(4), xticks=[])
learn.show(fig, "06-tree")

# %% [markdown]
# ## 2. Train it
#
# The lecture's settings. BatchNorm at each level pools its statistics over the batch and the positions (dims
# `(0, 1)`, the lecture's "bug fix").

# %%
model = build_for_words(spec, words, vocab)
splits = make_splits(words, model.block_size, vocab=vocab)
print(f"{count_params(model.init(jax.random.key(0))[0]):,} parameters")
run = fit(model, splits, spec.train.with_steps(STEPS))
params, state = run.ts.params, run.ts.state
test_loss = evaluate(model, params, state, *splits.test)
print(f"train {run.evals[-1]['train_loss']:.4f}, val {run.evals[-1]['dev_loss']:.4f}, test {test_loss:.4f}")
print("samples:", sample_words(model, params, state, vocab, jax.random.key(1), n=8))

fig, ax = plt.subplots(figsize=(6, 3.5))
k = max(1, len(run.losses) // 200)  # the lecture's view: the loss averaged over chunks of steps
ax.plot(np.arange(len(run.losses) // k) * k, np.asarray(run.losses)[: len(run.losses) // k * k].reshape(-1, k).mean(1))
ax.set(title=f"WaveNet training loss (mean of every {k} steps)", xlabel="step", ylabel="loss")
learn.show(fig, "06-training")

# %% [markdown]
# ## 3. The same parameters as causal dilated convolutions
#
# Level `l` of the tree is a kernel-2 convolution with dilation `2^l` over the padded word: position `t` of the
# convolution's output sees exactly the window the tree sees for the `t`-th prediction, and each node is computed
# once for every window that shares it. In eval mode the two forms give the same predictions.

# %%
conv_spec = REGISTRY["wavenet-conv"]
conv = build_for_words(conv_spec, words, vocab)
seq = make_splits(words, conv.block_size, vocab=vocab, per_position=True)
x_seq, y_seq = seq.test[0][:64], seq.test[1][:64]
conv_logits = conv.forward(params, state, jnp.asarray(x_seq), train=False).logits  # (64, T, V)
# the tree, window by window, for the same predictions
tree_windows = make_splits(words, model.block_size, vocab=vocab).test
n = int((y_seq >= 0).sum())
tree_logits = model.forward(params, state, jnp.asarray(tree_windows[0][:n]), train=False).logits
conv_flat = np.asarray(conv_logits)[np.asarray(y_seq) >= 0]
gap = float(np.max(np.abs(conv_flat - np.asarray(tree_logits))))
print(f"{n} predictions: largest difference between the tree's and the convolution's logits {gap:.2e}")

# %% [markdown]
# ## What to try next
#
# * Train `wavenet-conv` itself (`jnnex train --model wavenet-conv --data names.txt`): its BatchNorm pools over every
#   position of every word — a different model in training; compare its test loss.
# * The `improved` preset: which of its changes (gates, dropout, AdamW) buys the most?

# %%
learn.result(train_loss=run.evals[-1]["train_loss"], val_loss=run.evals[-1]["dev_loss"], test_loss=test_loss,
             tree_vs_conv=gap, steps=STEPS, data=source)
