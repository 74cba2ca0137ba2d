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
# # Lesson 3 — the MLP language model (Bengio et al. 2003)
#
# **What you will learn**: characters as learned vectors (an embedding table), a window of three of them into a hidden
# layer (the model and its training loop written on the page, then shown equal to jnnex's), and the habits that make
# training work: finding a learning rate, splitting the data into train, dev and test, and telling underfitting from
# overfitting.
#
# Lecture: *Building makemore Part 2: MLP* (<https://www.youtube.com/watch?v=TCH_1BHY58I>). Code:
# `jnnex/models/mlp_lm.py`.
#
# **Full size** (`python lessons/03_mlp.py`, names.txt, 2 cores, 31 s, measured): the lecture's MLP (block 3,
# n_embd 10, 200 hidden, N(0, 1) init, 200,000 steps of 32, lr 0.1 then 0.01) reaches train **2.1248**, dev
# **2.1608** (the lecture: 2.1701); the 2-D embeddings gather the vowels; 30 names trained on alone are memorised
# (train 0.55, dev 6.89).

# %%
import jax
import numpy as np

from jnnex import learn
from jnnex.data import Vocab, make_splits
from jnnex.lm import sample_words
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.optim import TrainConfig
from jnnex.train import fit, lr_find

plt = learn.pyplot()
words, source = learn.names()
vocab = Vocab.from_words(words)
spec = REGISTRY["mlp"]
STEPS = learn.pick(200_000, 400)  # the lecture's run
SMALL = learn.pick(40_000, 300)  # the 2-D embedding and the overfitting runs
SWEEP = learn.pick(1_000, 100)  # the learning-rate sweep

# %% [markdown]
# ## 1. Three splits
#
# 80 % of the names train the parameters, 10 % (dev) choose the settings, 10 % (test) are looked at once, at the
# end. The examples are every window of 3 characters and the character after it.

# %%
model = build_for_words(spec, words, vocab, init="lecture")  # the lecture's N(0, 1) initialisation
splits = make_splits(words, model.block_size, vocab=vocab)
for name, (X, Y) in zip(splits.names, splits.parts):
    print(f"{name:5}: {len(X):7,} windows")
# The windows of one name, as the lecture prints them: '.' pads the start and marks the end.
itos = vocab.boundary + vocab.chars  # token i's character: 0 is the boundary
context = [0] * model.block_size
for ch in words[0] + ".":
    print(f"{''.join(itos[i] for i in context)} ---> {ch}")
    context = context[1:] + [itos.index(ch)]

# %% [markdown]
# ## 2. The model and its training step, written here
#
# The lecture's whole model is four lines. Look up each of the 3 context characters in the table `C`, concatenate
# them, pass them through a tanh hidden layer, and produce 27 logits. The loss is the cross-entropy against the
# next character. A training step is the gradient of that loss and a step against it.

# %%
import jax.numpy as jnp  # noqa: E402


def mlp_loss(C, W1, b1, W2, b2, X, Y):
    emb = C[X]                                             # (B, 3, 10)   a vector per context character
    h = jnp.tanh(emb.reshape(X.shape[0], -1) @ W1 + b1)    # (B, 200)     the hidden layer
    logits = h @ W2 + b2                                   # (B, 27)
    return -jax.nn.log_softmax(logits)[jnp.arange(len(Y)), Y].mean()  # cross-entropy (F.cross_entropy)


params0, state0 = model.init(jax.random.key(0))
Xb, Yb = (jnp.asarray(a[:32]) for a in splits.train)
page_loss, page_grads = jax.value_and_grad(mlp_loss, argnums=(0, 1, 2, 3, 4))(*params0, Xb, Yb)
lib_loss, lib_grads, _ = model.value_and_grad(params0, state0, Xb, Yb)
mlp_gap = max([abs(float(page_loss - lib_loss))] + [float(jnp.abs(a - b).max()) for a, b in zip(page_grads,
                                                                                                   lib_grads)])
print(f"a batch of 32: loss {float(page_loss):.6f} (page) vs {float(lib_loss):.6f} (jnnex); every gradient's "
      f"largest difference {mlp_gap:.1e}")

# The lecture's loop, on the page: a random minibatch, the loss and its gradient, a step of 0.1.
rng = np.random.default_rng(0)
p = list(params0)
step_grad = jax.jit(jax.value_and_grad(mlp_loss, argnums=(0, 1, 2, 3, 4)))
page_losses = []
for i in range(learn.pick(2_000, 100)):
    ix = rng.integers(0, len(splits.train[0]), 32)
    loss, grads = step_grad(*p, jnp.asarray(splits.train[0][ix]), jnp.asarray(splits.train[1][ix]))
    p = [w - 0.1 * g for w, g in zip(p, grads)]
    page_losses.append(float(loss))
print(f"{len(page_losses)} steps of the page's loop: minibatch loss {np.mean(page_losses[:10]):.3f} -> "
      f"{np.mean(page_losses[-10:]):.3f}. jnnex.train.fit runs this loop too, jitted in chunks of steps, with "
      f"the schedule and evaluation around it.")

# %% [markdown]
# ## 3. Find a learning rate
#
# One run whose rate grows exponentially from 0.001 to 1, a step each: the loss falls fastest around a good rate and
# blows up past it. The lecture reads 0.1 off this curve.

# %%
lrs, losses = lr_find(model, splits.train, lo=1e-3, hi=1.0, steps=SWEEP)
smooth = np.convolve(losses, np.ones(20) / 20, mode="valid") if len(losses) > 40 else losses
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.log10(lrs[: len(smooth)]), smooth)
ax.set(title="learning-rate sweep (loss averaged over 20 steps)", xlabel="log10 learning rate",
       ylabel="minibatch loss")
learn.show(fig, "03-lr-sweep")

# %% [markdown]
# ## 4. The lecture's run
#
# 200,000 steps of 32 windows, lr 0.1 and 0.01 for the second half. Train and dev losses close together: the model
# is not overfitting — it is too small to memorise 182,000 windows, so a bigger one would do better.

# %%
tcfg = spec.train.with_steps(STEPS)
run = fit(model, splits, tcfg)
train_loss, dev_loss = run.evals[-1]["train_loss"], run.evals[-1]["dev_loss"]
print(f"train {train_loss:.4f}, dev {dev_loss:.4f}")
print("samples:", sample_words(model, run.ts.params, run.ts.state, vocab, jax.random.key(0), n=8))

# The minibatch losses are noisy: the lecture plots their log10, and the mean of each 1 % of the run shows the trend.
window = max(1, len(run.losses) // 100)
means = np.asarray(run.losses[: len(run.losses) // window * window]).reshape(-1, window).mean(1)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.arange(len(run.losses)), np.log10(run.losses), alpha=0.25, lw=0.5, label="minibatch")
ax.plot(np.arange(len(means)) * window + window / 2, np.log10(means), label=f"mean of each {window:,} steps")
ax.plot([e["step"] for e in run.evals], np.log10([e["dev_loss"] for e in run.evals]), "o-", label="dev")
ax.set(title="the lecture's MLP", xlabel="step", ylabel="log10 loss (nats per character)")
ax.legend()
learn.show(fig, "03-training")

# %% [markdown]
# ## 5. What the embeddings learned
#
# With 2-dimensional embeddings each character is a point: the vowels gather, `q` sits apart, `.` (the boundary)
# stands alone. Trained here with Kaiming init (lesson 4 says why) for a short run.

# %%
tiny2d = build_for_words(spec, words, vocab, n_embd=2)
run2d = fit(tiny2d, splits.train, spec.train.with_steps(SMALL))
C = np.asarray(run2d.ts.params.C)
fig, ax = plt.subplots(figsize=(5, 5))
ax.scatter(C[:, 0], C[:, 1], s=200, color="#cde")
for i, ch in enumerate(vocab.boundary + vocab.chars):  # token 0 is the boundary '.'
    ax.text(C[i, 0], C[i, 1], ch, ha="center", va="center")
ax.set(title="2-D character embeddings", xlabel="embedding dimension 0", ylabel="embedding dimension 1")
learn.show(fig, "03-embeddings")

# %% [markdown]
# ## 6. Overfitting, on purpose
#
# 30 names alone, trained long: the train loss keeps falling while the dev loss rises — the model memorises instead
# of generalising. That gap is what the dev split is there to see.

# %%
few = make_splits(words[:30], model.block_size, fractions=(1.0,), vocab=vocab)
over = fit(build_for_words(spec, words, vocab), few.train, TrainConfig(steps=SMALL, eval_every=SMALL),
           evals={"train": few.train, "dev": splits.dev})
over_train, over_dev = over.evals[-1]["train_loss"], over.evals[-1]["dev_loss"]
print(f"30 names: train {over_train:.3f}, dev {over_dev:.3f}")

# %% [markdown]
# ## What to try next
#
# * Beat dev 2.16: wider embeddings, a longer context, more hidden units (`--preset improved` reaches 2.046).
# * Plot the 2-D embeddings at several steps of training and watch the vowels gather.
# * Evaluate on the test split only once you have chosen your settings.

# %%
learn.result(train_loss=train_loss, dev_loss=dev_loss, overfit_train=over_train, overfit_dev=over_dev,
             steps=STEPS, data=source, mlp_gap=mlp_gap, page_first=float(np.mean(page_losses[:10])),
             page_last=float(np.mean(page_losses[-10:])))
