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
# # Lesson 12 — from toy to large: μP and a scaling law
#
# **What you will learn**: why a learning rate tuned on a small model says nothing about a wide one under the usual
# parametrisation, and what μP (Yang et al. 2022, "Tensor Programs V") changes so that it does; how to check it (the
# coordinate check: each layer's activations after a few steps, against width); and how a handful of small runs
# predicts a bigger one — a scaling law, `L(N, D) = E + A/N^α + B/D^β` (Hoffmann et al. 2022, "Chinchilla"), fitted
# on the page and used before the bigger run is made. Each computation is on the page first, then jnnex's.
#
# Code: `jnnex/scale.py` (`coord_check`, `lr_transfer`, `fit_law`), the GPT's `param="mup"` (`jnnex/models/gpt.py`),
# `jnnex bench --only mup` and `--only scaling` for the full sweeps. **Full size** (`python
# lessons/12_toy_to_large.py`, 2 cores, 501 s): coordinate-check slopes under μP 0.02 / −0.01 / −0.05, standard 1.67 /
# 1.76 / 0.77; the best rate (300 steps on names) moves 2⁻⁹ → 2⁻¹⁰ under the standard parametrisation and 2⁻⁹ → 2⁻⁸
# under μP; the held-out run (width 128, 2,000 steps) predicted at 2.1676 and measured at 2.1456 (1.0 % off).

# %%
import math

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jnnex import learn  # noqa: E402
from jnnex.data import Vocab, make_splits  # noqa: E402
from jnnex.lm import count_params  # noqa: E402
from jnnex.models.gpt import GPTConfig, gpt  # noqa: E402
from jnnex.optim import TrainConfig  # noqa: E402
from jnnex.scale import coord_check, fit_law, law  # noqa: E402
from jnnex.train import fit  # noqa: E402

plt = learn.pyplot()
words, source = learn.names()
vocab = Vocab.from_words(words)
splits = make_splits(words, 16, vocab=vocab, per_position=True)
X, Y = splits.train
x, y = jnp.asarray(X[:32]), jnp.asarray(Y[:32])


def model_at(width, param="standard", n_layer=learn.pick(2, 1)):
    return gpt(GPTConfig(vocab_size=vocab.size, block_size=16, n_layer=n_layer, n_head=4, n_embd=width, param=param,
                         base_width=32 if param == "mup" else None)).with_gradients("manual")


# %% [markdown]
# ## 1. One Adam step, on the page
#
# Adam's update of a matrix `W` (`fan_in × fan_out`) has entries of about the learning rate in size, whatever the
# gradient's scale — Adam normalises it. Its effect on the layer's output for an input `x` whose entries are about 1
# is `x ΔW`: a sum of `fan_in` terms of size `lr`. For the input the update was made from, they all line up (the
# gradient is `xᵀ δ`, so `sign(g)` has the sign of `x`), and the sum grows **in proportion to the width**. Here is
# one step, as Adam's first step takes it (`ΔW = −lr · sign(g)`), on a loss on the layer's output:

# %%
def adam_first_step_effect(width, lr):
    k1, k2 = jax.random.split(jax.random.key(width))
    xs = jax.random.normal(k1, (1, width))  # one input, entries of size 1
    W = jax.random.normal(k2, (width, width)) / math.sqrt(width)  # a standard initialisation
    target = jnp.ones((1, width))
    g = jax.grad(lambda W: jnp.mean((xs @ W - target) ** 2))(W)
    dW = -lr * jnp.sign(g)  # Adam's first step: every entry of size lr
    return float(jnp.sqrt(jnp.mean((xs @ dW) ** 2)))  # how far the output moved


widths = [32, 64, 128, 256]
moved = {"lr fixed": [adam_first_step_effect(w, 1e-3) for w in widths],
         "lr / width (μP)": [adam_first_step_effect(w, 1e-3 * 32 / w) for w in widths]}
page_slopes = {k: float(np.polyfit(np.log(widths), np.log(v), 1)[0]) for k, v in moved.items()}
print("how far one step moves a hidden layer's output, log-log slope against width: "
      + ", ".join(f"{k} {v:.2f}" for k, v in page_slopes.items()))

# %% [markdown]
# ## 2. μP, and the coordinate check
#
# μP scales what grows with the width `r = n_embd / base_width`: the hidden matrices' Adam learning rate by `1/r`
# (above: the fix), their initial standard deviation by `1/√r`, the logits by `1/r`, attention by `√hs₀/hs`. At the
# base width it *is* the standard model — the same numbers. The coordinate check trains each width a few steps at one
# learning rate and measures every layer's activations: flat across widths under μP, growing under the standard
# parametrisation.

# %%
p = model_at(32).init(jax.random.key(0))[0]
std, mup = model_at(32), model_at(32, "mup")
base_equal = bool(jnp.all(std.apply(p, (), x, train=False)[0] == mup.apply(p, (), x, train=False)[0]))
coord_widths = learn.pick([32, 64, 128, 256], [32, 64])
checks = {param: coord_check(lambda w, param=param: model_at(w, param), coord_widths, x, y, steps=5, lr=3e-3)
          for param in ("standard", "mup")}
slopes = {param: c["slopes"] for param, c in checks.items()}
print(f"μP at its base width is the standard model: {base_equal}; slopes of RMS against width after 5 steps: "
      f"{ {k: {layer: round(s, 2) for layer, s in v.items()} for k, v in slopes.items()} }")
fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), sharey=True)
for ax, (param, c) in zip(axes, checks.items()):
    last = [r for r in c["rows"] if r["step"] == c["steps"]]
    for layer in c["slopes"]:
        ax.loglog(*zip(*[(r["width"], r["rms"]) for r in last if r["layer"] == layer]), "o-", label=layer)
    ax.set(title=f"coordinate check: {param}", xlabel="width", ylabel="RMS after 5 steps")
    ax.legend(fontsize=8)
learn.show(fig, "12-coordinate-check")

# %% [markdown]
# ## 3. Does the best learning rate move?
#
# Train each width at a few learning rates, a factor of 2 apart, under both parametrisations, and find each width's
# best. Under μP it should stay put; under the standard parametrisation drift lower as the width grows. (At this
# size, and a few hundred steps, read what the numbers show.)

# %%
lrs = [2.0**k for k in learn.pick(range(-10, -4), (-7,))]  # (tiny: one rate, two widths — a smoke run)
sweep_widths = learn.pick([32, 64, 128], [32, 64])
steps = learn.pick(300, 20)
tcfg = TrainConfig(steps=steps, eval_every=steps, chunk=steps, batch_size=32, optimizer="adam", lr_boundaries=())
losses = {}
for param in ("standard", "mup"):
    for w in sweep_widths:
        for lr in lrs:
            losses[param, w, lr] = fit(model_at(w, param), splits, TrainConfig(
                **{**tcfg.__dict__, "lr": lr})).evals[-1]["dev_loss"]
best = {param: {w: min(lrs, key=lambda lr: losses[param, w, lr]) for w in sweep_widths}
        for param in ("standard", "mup")}
drift = {param: round(math.log2(b[max(b)] / b[min(b)])) for param, b in best.items()}
print(f"best learning rate by width: {best}; grid steps it moved from the narrowest to the widest: {drift}")
fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), sharey=True)
for ax, param in zip(axes, ("standard", "mup")):
    for w in sweep_widths:
        ax.semilogx(lrs, [losses[param, w, lr] for lr in lrs], "o-", label=f"width {w}")
    ax.set(title=f"{param}: dev loss against learning rate", xlabel="learning rate", ylabel="dev loss")
    ax.legend(fontsize=8)
learn.show(fig, "12-lr-transfer")

# %% [markdown]
# ## 4. A scaling law, fitted on the page
#
# Small runs: a few widths `N`, each trained for a few numbers of tokens `D`. Chinchilla fits `log L` against the log
# of `E + A/N^α + B/D^β` — written as a log-sum-exp of three terms — with a Huber loss. Here it is, by hand, with
# scipy's least squares; then jnnex's `fit_law` on the same runs, and the fitted law asked about a bigger run before
# it is made.

# %%
from scipy.optimize import least_squares  # noqa: E402

runs = []
for w in learn.pick([32, 48, 64, 96], [32, 64]):
    for s in learn.pick([250, 500, 1000], [10, 20, 40]):
        m = model_at(w, "mup")
        cfg = TrainConfig(steps=s, eval_every=s, chunk=s, batch_size=32, optimizer="adam", lr=2.0**-7, lr_boundaries=())
        result = fit(m, splits, cfg)
        runs.append({"N": count_params(result.ts.params), "D": s * 32 * 16, "L": result.evals[-1]["dev_loss"]})
N, D, L = (np.array([r[k] for r in runs], float) for k in ("N", "D", "L"))


def residuals(theta):
    e, a, b, alpha, beta = theta
    return np.logaddexp.reduce([np.full_like(N, e), a - alpha * np.log(N), b - beta * np.log(D)], axis=0) - np.log(L)


page = least_squares(residuals, [0.0, 5.0, 5.0, 0.5, 0.5], loss="huber", f_scale=1e-3,
                     bounds=([-5, -10, -10, 0, 0], [5, 40, 40, 3, 3]))
page_fit = dict(zip(("E", "A", "B", "alpha", "beta"), [math.exp(page.x[0]), math.exp(page.x[1]),
                                                        math.exp(page.x[2]), page.x[3], page.x[4]]))
jnnex_fit = fit_law(N, D, L)
page_rms, jnnex_rms = (float(np.sqrt(np.mean((np.log(law(f, N, D)) - np.log(L)) ** 2))) for f in (page_fit, jnnex_fit))
held = {"width": learn.pick(128, 96), "steps": learn.pick(2000, 60)}
held_N = count_params(model_at(held["width"], "mup").init(jax.random.key(0))[0])
held_D = held["steps"] * 32 * 16
predicted = float(law(jnnex_fit, held_N, held_D))  # before the run
cfg = TrainConfig(steps=held["steps"], eval_every=held["steps"], chunk=held["steps"], batch_size=32, optimizer="adam",
                  lr=2.0**-7, lr_boundaries=())
measured = fit(model_at(held["width"], "mup"), splits, cfg).evals[-1]["dev_loss"]
# (Two fits of equal error can hold different parameters: the runs, not the optimiser, decide how well the law is
# determined — compare the errors, and the prediction.)
print(f"the page's fit: {', '.join(f'{k} {v:.3g}' for k, v in page_fit.items())} (log rms {page_rms:.4f}); "
      f"jnnex's: {', '.join(f'{k} {v:.3g}' for k, v in jnnex_fit.items() if k != 'residual')} (log rms "
      f"{jnnex_rms:.4f}); the held-out run (width {held['width']}, {held['steps']} steps): predicted "
      f"{predicted:.4f}, measured {measured:.4f} ({predicted / measured - 1:+.1%})")
fig, ax = plt.subplots(figsize=(6, 3.6))
ax.loglog(6 * N * D, L, "o", label="runs")
ax.loglog(6 * N * D, law(jnnex_fit, N, D), "x", label="the fit at the runs")
ax.loglog([6 * held_N * held_D], [measured], "k*", ms=12, label="held out: measured")
ax.loglog([6 * held_N * held_D], [predicted], "r+", ms=12, label="held out: predicted")
ax.set(title="dev loss against compute (6ND)", xlabel="FLOPs", ylabel="dev loss")
ax.legend(fontsize=8)
learn.show(fig, "12-scaling-law")

# %% [markdown]
# ## What to try next
#
# * `jnnex bench --only mup --png`: the coordinate check and the transfer sweep at 4 widths, 8 rates, on tiny
#   Shakespeare.
# * `jnnex bench --only scaling --png`: 20 runs, the law, its IsoFLOP exponent against Chinchilla's ≈ 0.5, and a
#   held-out run predicted before it is made.
# * Train the names GPT at width 256 with `--param mup --base-width 32` and the rate the narrow sweep found.

# %%
learn.result(page_slopes=page_slopes, base_equal=base_equal, slopes=slopes, best=best, drift=drift,
             page_fit=page_fit, jnnex_fit=jnnex_fit, page_rms=page_rms, jnnex_rms=jnnex_rms, predicted=predicted,
             measured=measured, held=held, runs=len(runs))
