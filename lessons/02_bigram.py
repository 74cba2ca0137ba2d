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
# # Lesson 2 — the bigram language model, counted and learned
#
# **What you will learn**: a language model as a probability for the next character; counting bigrams and
# normalising the counts; sampling names from it; the negative log-likelihood as the number that says how good a
# model is; and a one-layer neural net, trained by gradient descent, that arrives at the counts' answer.
#
# Lecture: *The spelled-out intro to language modeling: building makemore*
# (<https://www.youtube.com/watch?v=PaCmpygFfXo>).
# Code: `jnnex/models/bigram.py`.
#
# Every key line is written on this page — the counting loop, the normalisation, the sampling loop, the
# log-likelihood loop, the neural bigram's forward, loss and update — and each is shown equal to jnnex's
# (`jnnex.models.bigram`), which the other lessons use.
#
# **Full size** (`python lessons/02_bigram.py`, names.txt, 2 cores, 28 s, measured): the counting model's loss over
# every bigram of the 32,033 names is **2.4546** (the lecture's 2.4544 with +1 smoothing; the page's loop and jnnex
# agree); the neural bigram, 500 full-batch steps at learning rate 50, reaches 2.4568 — the counts' answer, learned —
# the page's loop and jnnex's model on the same steps ending within 4.7e-4 of each other in every weight (float32).

# %%
import jax
import jax.numpy as jnp
import numpy as np

from jnnex import learn
from jnnex.data import Vocab, bigram_pairs, make_splits
from jnnex.lm import evaluate, sample_words
from jnnex.models.bigram import count_matrix, probs_from_counts
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.train import fit

plt = learn.pyplot()
words, source = learn.names()
STEPS = learn.pick(500, 20)  # the neural bigram's full-batch steps
print(f"{len(words):,} words from {source}; the first: {words[:5]}")

# %% [markdown]
# ## 1. Count which character follows which
#
# Every name is framed by a boundary token `.`: `emma` gives the bigrams `.e em mm ma a.`. `N[i, j]` counts how often
# character `j` follows character `i` across all names — the lecture's loop, written here:

# %%
vocab = Vocab.from_words(words)
chars = list(vocab.boundary + vocab.chars)  # token 0 is the boundary '.'
stoi = {ch: i for i, ch in enumerate(chars)}
N = np.zeros((vocab.size, vocab.size), np.int64)
for w in words:
    seq = ["."] + list(w) + ["."]
    for ch1, ch2 in zip(seq, seq[1:]):
        N[stoi[ch1], stoi[ch2]] += 1
xs, ys = bigram_pairs(words, vocab)
print(f"{int(N.sum()):,} bigrams over a vocabulary of {vocab.size}; the loop's counts equal jnnex's count_matrix: "
      f"{bool((N == np.asarray(count_matrix(xs, ys, vocab.size))).all())}")
print("the commonest:", sorted(((int(N[i, j]), a + b) for i, a in enumerate(chars) for j, b in enumerate(chars)),
                               reverse=True)[:5])
counts_equal = bool((N == np.asarray(count_matrix(xs, ys, vocab.size))).all())

# %% [markdown]
# The lecture's picture of `N`: every cell the bigram and its count.

# %%
fig, ax = plt.subplots(figsize=(14, 14))
ax.imshow(N, cmap="Blues")
for i in range(vocab.size):
    for j in range(vocab.size):
        ax.text(j, i, chars[i] + chars[j], ha="center", va="bottom", color="gray", fontsize=7)
        ax.text(j, i, str(int(N[i, j])), ha="center", va="top", color="gray", fontsize=7)
ax.set(title="N[first, next]: the bigram and its count", xlabel="next character", ylabel="first character")
ax.set_xticks(range(vocab.size), chars)
ax.set_yticks(range(vocab.size), chars)
learn.show(fig, "02-counts")

# %% [markdown]
# ## 2. Normalise each row into probabilities, and sample
#
# `P[i] = (N[i] + 1) / sum(N[i] + 1)`: the next character's distribution after `i` (the +1 keeps an unseen bigram
# from having probability 0, so no name is infinitely unlikely). Sampling starts at `.` and draws until `.` again.

# %%
P = (N + 1).astype(np.float64)
P /= P.sum(1, keepdims=True)  # each row sums to 1
print(f"P equals jnnex's probs_from_counts to {np.abs(P - np.asarray(probs_from_counts(N, 1.0))).max():.1e}")
fig, ax = plt.subplots(figsize=(8, 8))
ax.imshow(P, cmap="Blues")
ax.set_xticks(range(vocab.size), chars)
ax.set_yticks(range(vocab.size), chars)
ax.set(title="P[first, next]: each row the next character's probabilities", xlabel="next character",
       ylabel="first character")
learn.show(fig, "02-probabilities")
q = stoi["q"]
print("after 'q':", {chars[j]: round(float(P[q, j]), 3) for j in np.argsort(-P[q])[:3]})
g = np.random.default_rng(2147483647)  # the lecture's seed (its generator is torch's: other names)
names_drawn = []
for _ in range(10):
    ix, out = 0, []
    while True:
        ix = int(g.choice(vocab.size, p=P[ix]))  # the next character, drawn from the row of the last one
        if ix == 0:
            break
        out.append(chars[ix])
    names_drawn.append("".join(out))
print("samples:", names_drawn)

# %% [markdown]
# ## 3. How good is it? The negative log-likelihood
#
# The model's probability of the whole training set is the product of the probabilities it gives each bigram; its
# log, averaged and negated, is the loss. A uniform guess scores `ln 27 = 3.30`; a perfect model 0. The loop:

# %%
log_likelihood, n = 0.0, 0
for w in words:
    seq = ["."] + list(w) + ["."]
    for ch1, ch2 in zip(seq, seq[1:]):
        log_likelihood += np.log(P[stoi[ch1], stoi[ch2]])
        n += 1
nll_loop = -log_likelihood / n
spec = REGISTRY["bigram"]
splits = make_splits(words, 1, fractions=(1.0,), vocab=vocab)
counting = build_for_words(spec, words, vocab)
params, state = spec.fit_fn(counting.cfg, *splits.train)
counts_nll = evaluate(counting, params, state, *splits.train)
print(f"NLL {nll_loop:.4f} per character over {n:,} bigrams (uniform: {np.log(vocab.size):.4f}); jnnex's counting "
      f"bigram: {counts_nll:.4f}")
print("its samples:", sample_words(counting, params, state, vocab, jax.random.key(0), n=10))

# %% [markdown]
# ## 4. The same model as a neural net
#
# One linear layer: `logits = onehot(x) @ W`, softmax, the same NLL — but now `W` is learned by gradient descent
# from `W = 0`. Its softmax is the counts' `P` when training succeeds: `exp(W)` plays the counts. The lecture's loop,
# its gradient from `jax.grad` (lesson 1's backward, done by JAX), then jnnex's model on the same steps:

# %%
X1, Y1 = (jnp.asarray(a) for a in (xs, ys))
xenc = jax.nn.one_hot(X1, vocab.size)  # (n, 27): row i is 1 at the first character


def nll(W):
    logits = xenc @ W  # (n, 27) log-counts
    counts = jnp.exp(logits)
    probs = counts / counts.sum(1, keepdims=True)  # softmax
    return -jnp.log(probs[jnp.arange(len(Y1)), Y1]).mean()


@jax.jit
def descend(W):
    def one(W, _):
        return W - 50.0 * jax.grad(nll)(W), None  # the lecture's rate, the whole set every step
    return jax.lax.scan(one, W, None, length=STEPS)[0]


W = descend(jnp.zeros((vocab.size, vocab.size)))
page_nll = float(nll(W))
neural_spec = REGISTRY["neural-bigram"]
neural = build_for_words(neural_spec, words, vocab)
tcfg = neural_spec.train.with_steps(STEPS)
run = fit(neural, splits.train, tcfg)
neural_nll = evaluate(neural, run.ts.params, run.ts.state, *splits.train)
neural_gap = float(jnp.abs(W - run.ts.params.W).max())
print(f"this page's loop after {STEPS} steps: NLL {page_nll:.4f}; jnnex's neural bigram: {neural_nll:.4f} "
      f"(counts: {counts_nll:.4f}); the two W differ by at most {neural_gap:.1e}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.arange(1, len(run.losses) + 1), run.losses, label="neural bigram (gradient descent)")
ax.axhline(counts_nll, color="k", ls="--", label=f"counting bigram {counts_nll:.4f}")
ax.set(title="the neural bigram learns the counts", xlabel="step", ylabel="NLL per character")
ax.legend()
learn.show(fig, "02-neural-vs-counts")

# %% [markdown]
# ## What to try next
#
# * Set the smoothing to 0 and find the name that gets an infinite loss.
# * Train a trigram (two characters in, one out): does the loss drop below the bigram's?
# * Add `l2` regularisation to the neural bigram (`--l2` on the command line): which smoothing does it mimic?

# %%
learn.result(counts_nll=counts_nll, neural_nll=neural_nll, steps=STEPS, data=source, counts_equal=counts_equal,
             nll_loop=nll_loop, page_nll=page_nll, neural_gap=neural_gap)
