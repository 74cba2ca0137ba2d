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
# **What you will learn**: why squashing 8 characters into one layer at once is wasteful, how a tree fuses them two at a
# time (van den Oord et al. 2016; written on the page, one reshape at its heart, and shown equal to jnnex's), why
# BatchNorm over a (batch, position, channel) tensor takes its statistics over two axes, and how the same tree becomes
# causal dilated convolutions that predict every position at once.
#
# Lecture: *Building makemore Part 5: Building a WaveNet* (<https://www.youtube.com/watch?v=t3YJ5hKiMQ0>). Code:
# `jnnex/models/wavenet.py`.
#
# **Full size** (`python lessons/06_wavenet.py`, names.txt, 2 cores, 148 s measured, make lessons): the lecture's
# WaveNet (76,579 parameters, 200,000 steps of 32, lr 0.1 then 0.01 from step 150,000) reaches train 1.7664, val 1.9928,
# **test 1.9937** — the lecture's 1.9937; the page's tree is jnnex's to 8.2e-8 and the convolutional form's logits equal
# the tree's. Flat to tree, 20,000 steps each: dev 2.1947 (3 characters flat), 2.1500 (8 flat), 2.0426 (8 as a tree).
# The `improved` preset (gated activations, dropout, AdamW) reaches val 1.948 over three seeds: `jnnex train --model
# wavenet --preset improved --data names.txt` (6–8 minutes a seed; not run here).

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
STAGE_STEPS = learn.pick(20_000, 200)  # each model of the flat-to-tree progression

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
# ## 2. The tree, written here
#
# The whole trick is one reshape. `(B, 8, 24)` becomes `(B, 4, 48)`: each pair of neighbours is set side by side,
# and a linear layer then mixes each pair. That is the lecture's `FlattenConsecutive`. BatchNorm on a `(B, T', C)`
# tensor takes its statistics over the batch **and** the positions.

# %%
def flatten_consecutive(x, n=2):
    B, T, C = x.shape
    return x.reshape(B, T // n, C * n)  # neighbours (t, t+1) side by side


def batchnorm3d(h, gain, bias, eps=1e-5):
    mean = h.mean((0, 1), keepdims=True)  # over the batch and the positions: dims (0, 1)
    var = h.var((0, 1), keepdims=True)  # biased (divide by n), as jnnex's BatchNorm
    return gain * (h - mean) / jnp.sqrt(var + eps) + bias


def tree_logits(p, x, shapes=None):
    h = p.C[x]  # (B, 8, 24)
    if shapes is not None:
        shapes.append(("Embedding", h.shape))
    for level, bn in zip(p.levels, p.bn):
        h = flatten_consecutive(h)
        if shapes is not None:
            shapes.append(("FlattenConsecutive", h.shape))
        h = h @ level.W
        if shapes is not None:
            shapes.append(("Linear (no bias)", h.shape))
        h = jnp.tanh(batchnorm3d(h, bn.gamma, bn.beta))
        if shapes is not None:
            shapes += [("BatchNorm over (0, 1)", h.shape), ("Tanh", h.shape)]
    h = h.reshape(h.shape[0], -1)  # (B, 1, 128) -> (B, 128): the root
    if shapes is not None:
        shapes.append(("reshape: the root", h.shape))
    logits = h @ p.out.W + p.out.b
    if shapes is not None:
        shapes.append(("Linear (output)", logits.shape))
    return logits


model = build_for_words(spec, words, vocab)
splits = make_splits(words, model.block_size, vocab=vocab)
p0, s0 = model.init(jax.random.key(0))
xb = jnp.asarray(splits.train[0][:32])
shapes = []
page_logits = tree_logits(p0, xb, shapes)
lib_logits = model.forward(p0, s0, xb, train=True).logits  # train mode: the batch's statistics, as the page
tree_gap = float(jnp.abs(page_logits - lib_logits).max())
print("the lecture's layer-by-layer shapes, for a batch of 32 windows of 8:")
for name, shape in shapes:
    print(f"  {name:22} {tuple(shape)}")
print(f"the page's tree vs jnnex's wavenet forward: largest logit difference {tree_gap:.1e}")

# %% [markdown]
# ## 3. From flat to tree, with the same budget
#
# The lecture's progression. First the part-3 model: 3 characters squashed into one hidden layer. Then the same flat
# model given 8 characters. Then the tree over those 8. Each is trained with the same steps and batch, and scored on
# the same dev words.

# %%
STAGES = [  # (name, model, settings)
    ("flat, 3 characters", "bn-mlp", {}),
    ("flat, 8 characters", "bn-mlp", {"block_size": 8}),
    ("tree, 8 characters", "wavenet", {}),
]
progression = {}
for name, kind, settings in STAGES:
    m = build_for_words(REGISTRY[kind], words, vocab, **settings)
    sp = make_splits(words, m.block_size, vocab=vocab)
    r = fit(m, sp, REGISTRY[kind].train.with_steps(STAGE_STEPS))
    progression[name] = (r.evals[-1]["dev_loss"], count_params(r.ts.params))
    print(f"{name:20} {progression[name][1]:7,} parameters   dev {progression[name][0]:.4f}")
fig, ax = plt.subplots(figsize=(6, 3.5))
vals = [v[0] for v in progression.values()]
ax.bar(range(len(vals)), vals, color=["#cde", "#cde", "#9bc"])
ax.set_xticks(range(len(vals)), list(progression))
ax.set(title=f"flat to tree, {STAGE_STEPS:,} steps each", xlabel="model", ylabel="dev loss",
       ylim=(min(vals) - 0.05, max(vals) + 0.05))
learn.show(fig, "06-flat-to-tree")

# %% [markdown]
# ## 4. Train it
#
# The lecture's settings, now with jnnex's `fit`. BatchNorm at each level pools its statistics over the batch and the
# positions (dims `(0, 1)`, the lecture's "bug fix").

# %%
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
# ## 5. The same parameters as causal dilated convolutions
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
             tree_vs_conv=gap, steps=STEPS, data=source, tree_gap=tree_gap,
             progression={k: v[0] for k, v in progression.items()}, shapes=[list(s_[1]) for s_ in shapes])
