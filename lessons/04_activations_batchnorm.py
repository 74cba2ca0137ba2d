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
# Kaiming's gain keeps activations alive through five layers, what BatchNorm does about it (written on the page,
# running statistics included, and shown equal to jnnex's), and how to watch a net's health: activation and
# gradient histograms, the saturation map, grad:data and update:data ratios.
#
# Lecture: *Building makemore Part 3: Activations & Gradients, BatchNorm*
# (<https://www.youtube.com/watch?v=P6sfmUTpUmc>).
# Code: `jnnex/models/mlp_lm.py` (the ladder), `jnnex/models/bn_mlp.py`, `jnnex/diagnostics.py`.
#
# **Full size** (`python lessons/04_activations_batchnorm.py`, names.txt, 2 cores, 93 s, measured): the lecture's
# ladder, 200,000 steps a rung (first loss → train / val) — original 26.4 → 2.1248 / 2.1608, softmax fixed 3.29 → 2.0700
# / 2.1361, tanh fixed 3.28 → 2.0379 / 2.1000, Kaiming 3.28 → 2.0380 / 2.1027, + BatchNorm 3.31 → **2.0666 / 2.1058**
# (the lecture: 2.0668 / 2.1048). The page's BatchNorm is jnnex's to 9.5e-7 (float32). Saturated tanh units at init,
# layers 1–5: 3 %, 0 %, … at gain 1; 17 %, 8 %, 8 %, 6 %, 4 % at 5/3; 43 %, 39 %, 42 %, 39 %, 38 % at 3. The N(0, 1) MLP
# has 73 % of its units saturated against Kaiming's 26 %, with no unit dead on all 500 examples. The update:data ratios
# fall by 0.96 where the learning rate drops ×10, and the output matrix moves fastest at the start.

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
losses = [r[k] for r in rows for k in ("train", "val")]
ax.set(title="makemore part 3's ladder", xlabel="rung", ylabel="loss after training",
       ylim=(min(losses) - 0.05, max(losses) + 0.05))  # from the numbers: no fixed limits to clip the tiny size
ax.legend()
learn.show(fig, "04-ladder")

# %% [markdown]
# ## 2. BatchNorm, written here
#
# In training, each unit is standardised over the batch, then scaled by a learned gain and shifted by a learned bias.
# The batch's mean and variance also update **running** estimates, and at evaluation time those replace the batch
# statistics, so a single example can be scored on its own. jnnex follows PyTorch: the batch variance that normalises
# divides by n, the running variance is kept unbiased (× n/(n−1)), and `momentum` weighs the new batch (0.1; the
# lecture's `0.999·old + 0.001·new` is momentum 0.001).

# %%
import jax.numpy as jnp  # noqa: E402

from jnnex.layers import BatchNormParams, BatchNormState, batchnorm_step  # noqa: E402


def batchnorm_train(x, gain, bias, running_mean, running_var, momentum=0.1, eps=1e-5):
    n = x.shape[0]
    mean = x.mean(0)                                   # (C,)  over the batch
    var = ((x - mean) ** 2).mean(0)                    # (C,)  biased: divide by n
    y = gain * (x - mean) / jnp.sqrt(var + eps) + bias
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)  # unbiased, as PyTorch keeps it
    return y, running_mean, running_var


def batchnorm_eval(x, gain, bias, running_mean, running_var, eps=1e-5):
    return gain * (x - running_mean) / jnp.sqrt(running_var + eps) + bias


bn_rng = np.random.default_rng(0)
xb = jnp.asarray(bn_rng.normal(2.0, 3.0, (32, 100)), jnp.float32)
g, b_ = (jnp.asarray(bn_rng.normal(1.0, 0.1, 100), jnp.float32), jnp.asarray(bn_rng.normal(0, 0.1, 100), jnp.float32))
rm, rv = jnp.zeros(100), jnp.ones(100)
y_page, rm_page, rv_page = batchnorm_train(xb, g, b_, rm, rv)
y_lib, state_lib, _ = batchnorm_step(BatchNormParams(g, b_), BatchNormState(rm, rv), xb, train=True)
y_eval_lib, _, _ = batchnorm_step(BatchNormParams(g, b_), state_lib, xb, train=False)
bn_gap = max(float(jnp.abs(a - c).max()) for a, c in ((y_page, y_lib), (rm_page, state_lib.mean),
                                                     (rv_page, state_lib.var),
                                                     (batchnorm_eval(xb, g, b_, rm_page, rv_page), y_eval_lib)))
print(f"train-mode output, running mean, running variance and eval-mode output: page vs jnnex, largest "
      f"difference {bn_gap:.1e}")
mean_gap = float(jnp.abs(y_page.mean(0) - b_).max())
print(f"after BatchNorm each unit's batch mean is its bias (largest gap {mean_gap:.1e}) "
      f"and its std its gain (largest relative gap {float(jnp.abs(y_page.std(0) / g - 1).max()):.1e}, from eps)")

# %% [markdown]
# ## 3. Saturated tanh units, and the gain that avoids them
#
# Take a 5-layer tanh net without BatchNorm at initialisation. The activations' spread depends on each layer's gain:
# too small and they shrink layer by layer, too large and they pile up at ±1. There tanh's gradient `1 − t²` is
# zero, and no gradient flows back. Kaiming's 5/3 is made to keep them spread. The saturation, the share with |t| >
# 0.97, is measured per layer and printed in the legend.

# %%
spec = REGISTRY["deep-mlp"]
splits = make_splits(words, 3, vocab=vocab)
x, y = splits.train[0][:500], splits.train[1][:500]
GAINS = (1.0, 5 / 3, 3.0)
measured = {}
for gain in GAINS:
    net = build_for_words(spec, words, vocab, batchnorm=False, gain=gain)
    params, state = net.init(jax.random.key(0))
    acts, act_grads = activation_gradients(net, params, state, x, y)
    measured[gain] = ([np.asarray(a) for a in acts], [np.asarray(a) for a in act_grads])
fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
for col, gain in enumerate(GAINS):
    acts, act_grads = measured[gain]
    for i, (a, ga) in enumerate(zip(acts, act_grads)):
        hist, edges = np.histogram(a.ravel(), bins=60, range=(-1, 1), density=True)
        sat = np.mean(np.abs(a) > 0.97)
        axes[0, col].plot((edges[1:] + edges[:-1]) / 2, hist, label=f"layer {i + 1}: {sat:.0%} saturated")
        hist, edges = np.histogram(ga.ravel(), bins=60, density=True)
        axes[1, col].plot((edges[1:] + edges[:-1]) / 2, hist, label=f"layer {i + 1}: std {ga.std():.1e}")
    axes[0, col].set(title=f"tanh outputs at init, gain {gain:.3g}", xlabel="activation", ylabel="density")
    axes[1, col].set(title=f"their gradients, gain {gain:.3g}", xlabel="dloss/dactivation", ylabel="density")
    axes[1, col].ticklabel_format(axis="x", style="sci", scilimits=(0, 0))  # tiny numbers: one shared exponent
    axes[0, col].legend(fontsize=7)
    axes[1, col].legend(fontsize=7)
fig.tight_layout()
learn.show(fig, "04-tanh-histograms")
saturation = {gain: [float(np.mean(np.abs(a) > 0.97)) for a in measured[gain][0]] for gain in GAINS}
grad_spread = {gain: [float(g.std()) for g in measured[gain][1]] for gain in GAINS}
for gain in GAINS:
    print(f"gain {gain:.3g}: saturated {', '.join(f'{s:.0%}' for s in saturation[gain])} (layers 1-5); gradient std "
          f"from layer 5 to layer 1: {grad_spread[gain][-1]:.1e} -> {grad_spread[gain][0]:.1e}")

# %% [markdown]
# The lecture's saturation map is drawn for the lecture's first MLP (one hidden layer of 200), at the ladder's first
# rung (every weight N(0, 1)) and at its Kaiming rung. There is one row per example and one column per hidden unit,
# white where |t| > 0.97. A column white from top to bottom is a **dead** unit: saturated for every example, it
# passes no gradient back and never learns.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
dead = {}
for ax, init in zip(axes, ("lecture", "kaiming")):
    mlp = build_for_words(REGISTRY["mlp"], words, vocab, init=init)
    mp, ms = mlp.init(jax.random.key(0))
    h = np.asarray(activation_gradients(mlp, mp, ms, x, y)[0][0])  # (500 examples, 200 units)
    dead[init] = int(np.all(np.abs(h) > 0.97, axis=0).sum())
    ax.imshow(np.abs(h[:32]) > 0.97, cmap="gray", interpolation="nearest", aspect="auto")
    ax.set(title=f"init {init}: {np.mean(np.abs(h) > 0.97):.0%} saturated,\n{dead[init]} of {h.shape[1]} units dead "
                 f"on all {len(h)} examples", xlabel="hidden unit", ylabel="example (white: |t| > 0.97)")
learn.show(fig, "04-saturation-map")

# %% [markdown]
# ## 4. The weights' gradients, next to the weights
#
# A gradient's size means little alone. Set against the weights it will change, as the ratio std(grad) / std(W), it
# says how fast that layer will move. Here is the deep net with BatchNorm (the rung that trains) at initialisation.

# %%
deep = build_for_words(spec, words, vocab).with_gradients("manual")
dparams, dstate = deep.init(jax.random.key(0))
_, dgrads, _ = deep.value_and_grad(dparams, dstate, jnp.asarray(x[:32]), jnp.asarray(y[:32]))
names = weight_names(dparams)
Ws = [w for w in jax.tree.leaves(dparams) if w.ndim == 2]
Gs = [g_ for g_ in jax.tree.leaves(dgrads) if g_.ndim == 2]
grad_data = [float(g_.std() / w.std()) for g_, w in zip(Gs, Ws)]
fig, ax = plt.subplots(figsize=(7, 3.5))
for name, g_, ratio in zip(names, Gs, grad_data):
    hist, edges = np.histogram(np.asarray(g_).ravel(), bins=60, density=True)
    ax.plot((edges[1:] + edges[:-1]) / 2, hist, label=f"{name} {tuple(g_.shape)}: grad:data {ratio:.2e}")
ax.set(title="weight gradients at init (the BatchNorm net)", xlabel="gradient", ylabel="density")
ax.legend(fontsize=7)
learn.show(fig, "04-weight-gradients")
print("grad:data per weight matrix: " + ", ".join(f"{n} {r:.2e}" for n, r in zip(names, grad_data)))

# %% [markdown]
# ## 5. Watching training: the update:data ratio
#
# `log10(std(ΔW) / std(W))` per weight matrix per step: how big each update is next to the weights it changes.
# Around −3 is healthy (the lecture's rule of thumb); far below, a layer learns too slowly. Two features of the
# picture are worked out below it from its own numbers: the step where the learning rate drops ×10 (the default
# schedule, at half of the steps), and which matrix moves fastest at the start.

# %%
tcfg = TrainConfig(steps=WATCH, eval_every=WATCH, chunk=WATCH)
watch = fit(deep, splits.train, tcfg, diagnostics=True)
ratios = np.asarray(watch.metrics["update_data"])  # (steps, weight matrices)
fig, ax = plt.subplots(figsize=(7, 3.5))
for i, name in enumerate(names):
    ax.plot(ratios[:, i], label=name, lw=1)
ax.axhline(-3, color="k", ls="--", label="1e-3")
boundary = tcfg.boundaries[0]
ax.axvline(boundary, color="0.5", ls=":", label=f"lr × {tcfg.lr_factor:g} at step {boundary:,}")
ax.set(title="update:data ratio of each weight matrix", xlabel="step", ylabel="log10 std(ΔW) / std(W)")
ax.legend(fontsize=7)
learn.show(fig, "04-update-ratio")
span = max(1, boundary // 5)
before, after = ratios[boundary - span:boundary].mean(0), ratios[boundary:boundary + span].mean(0)
drop = float((before - after).mean())
print(f"across step {boundary:,}, every matrix's ratio falls by {drop:.2f} on average (log10 of the lr factor: "
      f"{-np.log10(tcfg.lr_factor):.2f}): the step is lr × grad, so a 10× smaller rate is a 10× smaller update")
start = ratios[: max(1, len(ratios) // 10)].mean(0)
k = int(np.argmax(start))
fastest = names[k]
print("the first tenth of the run, per matrix: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, start))
      + f"; the fastest is {fastest}")
others = [i for i in range(len(names)) if i != k]
print(f"why {fastest}: std(W) {float(Ws[k].std()):.3f} against {np.mean([float(Ws[i].std()) for i in others]):.3f} "
      f"for the others on average, std(grad) at init {float(Gs[k].std()):.1e} against "
      f"{np.mean([float(Gs[i].std()) for i in others]):.1e}"
      + (" — it is the output layer: its gradient is the loss's own (softmax − one-hot), and its weights have no "
         "tanh gain" if k == len(names) - 1 else ""))

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
             steps=STEPS, data=source, bn_gap=bn_gap, saturation={f"{k:.3g}": v for k, v in saturation.items()},
             dead=dead, lr_drop=drop, grad_data=dict(zip(names, grad_data)))
