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
# # Lesson 7 — the GPT, every gradient by hand
#
# **What you will learn**: the transformer block (LayerNorm, causal self-attention, the MLP, residual connections) as
# pairs of a forward and its hand-written backward, in llm.c's order; what attention looks at in a trained model;
# and how a per-tensor check finds a wrong backward — you will write LayerNorm's.
#
# Lectures: *Let's build GPT: from scratch, in code, spelled out* (<https://www.youtube.com/watch?v=kCc8FmEb1nY>);
# llm.c (<https://github.com/karpathy/llm.c>). Code: `jnnex/models/gpt.py`.
#
# **Full size** (`python lessons/07_gpt.py`, names.txt, 2 cores, 347 s measured): makemore.py's transformer (4
# layers, 4 heads, n_embd 64; 204,544 parameters), 25,000 AdamW steps of 32 names on the hand-written backward:
# val **2.0185** (makemore.py's settings reach their best, 2.0181, at 25,000 of 50,000 steps; the README's table).
# Every pair's backward agrees with `jax.vjp` to 4.4e-16.

# %%
import jax
import jax.numpy as jnp
import numpy as np

from jnnex import learn
from jnnex.check import compare, format_table
from jnnex.data import Vocab, make_splits
from jnnex.layers import cross_entropy_backward, cross_entropy_forward
from jnnex.lm import evaluate, sample_words
from jnnex.models import gpt as G
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.train import fit

jax.config.update("jax_enable_x64", True)  # the checks in float64; training below stays in the model's float32
plt = learn.pyplot()
words, source = learn.names()
vocab = Vocab.from_words(words)
STEPS = learn.pick(25_000, 200)  # makemore.py's best validation loss comes halfway through its 50,000

# %% [markdown]
# ## 1. Each layer is a pair: a forward that keeps what its backward needs, and the backward
#
# `jnnex.check.compare(forward, backward, *args)` runs both, and `jax.vjp` of the forward, on random inputs, and says
# per input whether the hand-written gradient matches.

# %%
rng = np.random.default_rng(0)
B, T, C, nh = 2, 5, 8, 2
r = lambda *s: jnp.asarray(rng.normal(size=s))  # noqa: E731
pairs = {
    "LayerNorm": (G.layernorm_forward, G.layernorm_backward, (r(B, T, C), 1 + r(C), r(C)), ["dx", "dw", "db"]),
    "GELU": (G.gelu_forward, G.gelu_backward, (r(B, T, C),), ["dx"]),
    "causal attention": (lambda qkv: G.qkv_attention_forward(qkv, nh),
                         lambda dy, cache: G.qkv_attention_backward(dy, cache)[0], (r(B, T, 3 * C),), ["dqkv"]),
    "cross-entropy": (cross_entropy_forward, cross_entropy_backward,
                      (r(B, T, 11), jnp.asarray(rng.integers(0, 11, (B, T)))), ["dlogits", "dy"]),
}
for name, (fwd, bwd, args, names) in pairs.items():
    rows = compare(fwd, bwd, *args, names=names)
    print(f"{name:17} " + "  ".join(f"{row.name}: max diff {row.maxdiff:.1e}" for row in rows))

# %% [markdown]
# ## 2. Your turn: LayerNorm's backward
#
# The forward caches `(x, w, mean, rstd, has_shift)`: `n = (x − mean)·rstd` is the normalised input, `y = n·w + b`.
# Return `(dx, dw, db)`. Hint: `dw` and `db` sum `dy·n` and `dy` over every row; `dx` has three terms — the direct
# path, the mean's, and the variance's.

# %%
def my_layernorm_backward(dy, cache):
    x, w, mean, rstd, has_shift = cache
    dx = jnp.zeros_like(x)  # your expression
    dw = jnp.zeros_like(w)  # your expression
    db = jnp.zeros_like(w) if has_shift else None  # your expression
    return dx, dw, db


mine = learn.answers("07_gpt", {"layernorm_backward": my_layernorm_backward})["layernorm_backward"]
rows = compare(G.layernorm_forward, mine, r(B, T, C), 1 + r(C), r(C), names=["dx", "dw", "db"])
print(format_table(rows))
wrong = [row.name for row in rows if not row.approx]
print("all right!" if not wrong else f"wrong: {', '.join(wrong)}")

# %% [markdown]
# ## 3. Train the whole GPT on its hand-written backward
#
# makemore.py's settings: AdamW at 5e-4, batch 32 names, every position predicted.

# %%
spec = REGISTRY["gpt"]
model = build_for_words(spec, words, vocab, **learn.pick({}, {"n_layer": 1, "n_embd": 32})).with_gradients("manual")
splits = make_splits(words, model.block_size, vocab=vocab, per_position=True)
jax.config.update("jax_enable_x64", False)
tcfg = spec.train.with_steps(STEPS)
run = fit(model, splits, tcfg)
params = run.ts.params
val = evaluate(model, params, (), *splits.dev)
print(f"val {val:.4f}; samples:", sample_words(model, params, (), vocab, jax.random.key(0), n=8))

# %% [markdown]
# ## 4. What attention looks at
#
# The attention weights of every head of the last block on one name: row `t` is what the prediction after the `t`-th
# character reads (only the characters up to it: causal).

# %%
name = ".emmanuel"  # the boundary token (index 0) starts every name
x = jnp.asarray([[0, *vocab.encode(name[1:])][: model.block_size]])
att = np.asarray(G.attention_maps(model.cfg, params, x))[-1, 0]  # (n_head, T, T) of the last block
fig, axes = plt.subplots(1, att.shape[0], figsize=(3.2 * att.shape[0], 3.4))
chars = list(name[: x.shape[1]])
for h, ax in enumerate(axes):
    ax.imshow(att[h], cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(chars)), chars)
    ax.set_yticks(range(len(chars)), chars)
    ax.set(title=f"last block, head {h}", xlabel="attends to", ylabel="position")
learn.show(fig, "07-attention")

# %% [markdown]
# ## What to try next
#
# * Blank `G.gelu_backward` in the same way and write it; then the attention's softmax backward (`attend_backward`).
# * Train with `--preset improved` (n_embd 128, dropout 0.3): val 1.93.
# * Lesson 9 takes the GPT to a real text, with a tokenizer.

# %%
learn.result(ln_wrong=wrong, val_loss=val, steps=STEPS, data=source)
