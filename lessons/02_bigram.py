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
# **Full size** (`python lessons/02_bigram.py`, names.txt, 2 cores, 14 s, measured): the counting model's loss over
# every bigram of the 32,033 names is **2.4546** (the lecture's 2.4544 with +1 smoothing); the neural bigram, 500
# full-batch steps at learning rate 50, reaches 2.4568 — the counts' answer, learned.

# %%
import jax
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
# character `j` follows character `i` across all names.

# %%
vocab = Vocab.from_words(words)
xs, ys = bigram_pairs(words, vocab)
N = np.asarray(count_matrix(xs, ys, vocab.size))
print(f"{len(xs):,} bigrams over a vocabulary of {vocab.size}; the commonest:",
      sorted(((int(N[i, j]), a + b) for i, a in enumerate(vocab.boundary + vocab.chars)
              for j, b in enumerate(vocab.boundary + vocab.chars)), reverse=True)[:5])

# %% [markdown]
# ## 2. Normalise each row into probabilities, and sample
#
# `P[i] = (N[i] + 1) / sum(N[i] + 1)`: the next character's distribution after `i` (the +1 keeps an unseen bigram
# from having probability 0, so no name is infinitely unlikely). Sampling starts at `.` and draws until `.` again.

# %%
P = np.asarray(probs_from_counts(N, smoothing=1.0))
labels = list(vocab.boundary + vocab.chars)  # token 0 is the boundary '.'
fig, ax = plt.subplots(figsize=(8, 8))
ax.imshow(P, cmap="Blues")
ax.set_xticks(range(vocab.size), labels)
ax.set_yticks(range(vocab.size), labels)
ax.set(title="P[first, next]: each row the next character's probabilities", xlabel="next character",
       ylabel="first character")
learn.show(fig, "02-probabilities")
q = vocab.encode("q")[0]
print("after 'q':", {labels[j]: round(float(P[q, j]), 3) for j in np.argsort(-P[q])[:3]})
spec = REGISTRY["bigram"]
splits = make_splits(words, 1, fractions=(1.0,), vocab=vocab)
counting = build_for_words(spec, words, vocab)
params, state = spec.fit_fn(counting.cfg, *splits.train)
print("samples:", sample_words(counting, params, state, vocab, jax.random.key(0), n=10))

# %% [markdown]
# ## 3. How good is it? The negative log-likelihood
#
# The model's probability of the whole training set is the product of the probabilities it gives each bigram; its
# log, averaged and negated, is the loss. A uniform guess scores `ln 27 = 3.30`; a perfect model 0.

# %%
counts_nll = evaluate(counting, params, state, *splits.train)
print(f"counting bigram: NLL {counts_nll:.4f} per character (uniform: {np.log(vocab.size):.4f})")

# %% [markdown]
# ## 4. The same model as a neural net
#
# One linear layer: `logits = onehot(x) @ W`, softmax, the same NLL — but now `W` is learned by gradient descent
# from `W = 0`. Its softmax is the counts' `P` when training succeeds: `exp(W)` plays the counts.

# %%
neural_spec = REGISTRY["neural-bigram"]
neural = build_for_words(neural_spec, words, vocab)
tcfg = neural_spec.train.with_steps(STEPS)
run = fit(neural, splits.train, tcfg)
neural_nll = evaluate(neural, run.ts.params, run.ts.state, *splits.train)
print(f"neural bigram after {STEPS} steps: NLL {neural_nll:.4f} (counts: {counts_nll:.4f})")

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
learn.result(counts_nll=counts_nll, neural_nll=neural_nll, steps=STEPS, data=source)
