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
# **What you will learn**: the transformer block built as the lecture builds it — the causal average three ways,
# one head and why its scores are scaled, many heads, the MLP, residual connections, LayerNorm, each rung trained —
# and shown equal to jnnex's; then the block's layers as pairs of a forward and its hand-written backward, in llm.c's
# order; what attention looks at in a trained model; and how a per-tensor check finds a wrong backward — you will
# write LayerNorm's.
#
# Lectures: *Let's build GPT: from scratch, in code, spelled out* (<https://www.youtube.com/watch?v=kCc8FmEb1nY>);
# llm.c (<https://github.com/karpathy/llm.c>). Code: `jnnex/models/gpt.py`.
#
# **Full size** (`python lessons/07_gpt.py`, names.txt, 2 cores, 440 s measured under `make lessons`): the ladder's seven rungs, 3,000
# AdamW steps each at n_embd 32, from dev 2.4670 (bigram) to 2.1429 (the block with residuals and LayerNorm), the
# page's block equal to jnnex's `block_forward` to 3.0e-7 (float32); makemore.py's transformer (4 layers, 4 heads,
# n_embd 64; 204,544 parameters), 25,000 AdamW steps of 32 names on the hand-written backward: val **2.0185**
# (makemore.py's settings reach their best, 2.0181, at 25,000 of 50,000 steps; the README's table). Every pair's
# backward agrees with `jax.vjp` to 4.4e-16.

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jnnex import learn
from jnnex.check import compare, format_grades, grade_backward
from jnnex.data import Vocab, make_splits
from jnnex.layers import Linear, cross_entropy_backward, cross_entropy_forward
from jnnex.lm import evaluate, sample_words
from jnnex.models import gpt as G
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.train import fit

plt = learn.pyplot()
words, source = learn.names()
vocab = Vocab.from_words(words)
STEPS = learn.pick(25_000, 200)  # makemore.py's best validation loss comes halfway through its 50,000

# %% [markdown]
# ## 1. From a bigram to the block, as the lecture builds it
#
# Before any pair by hand, the lecture's arc, written on this page in plain JAX (autodiff trains it, as PyTorch's does
# in the lecture). The one idea attention rests on first: **every position averages the positions before it.** Three
# ways to write that average of `x (B, T, C)`, which must agree.

# %%
rng = np.random.default_rng(1)
xs = jnp.asarray(rng.normal(size=(4, 8, 2)), jnp.float32)  # (B, T, C)
B_, T_, C_ = xs.shape
loop = jnp.stack([jnp.stack([xs[b, : t + 1].mean(0) for t in range(T_)]) for b in range(B_)])  # 1. a loop
tril = jnp.tril(jnp.ones((T_, T_)))
wei = tril / tril.sum(1, keepdims=True)  # 2. a matrix multiply: row t weighs 1/(t+1) on positions <= t
by_matmul = wei @ xs  # (T, T) @ (B, T, C) -> (B, T, C)
scores = jnp.where(tril == 0, -jnp.inf, jnp.zeros((T_, T_)))  # 3. a softmax of equal scores, the future masked
by_softmax = jax.nn.softmax(scores, axis=-1) @ xs
print(f"loop vs matmul: {float(jnp.abs(loop - by_matmul).max()):.1e}; loop vs masked softmax: "
      f"{float(jnp.abs(loop - by_softmax).max()):.1e}")
average_gap = float(max(jnp.abs(loop - by_matmul).max(), jnp.abs(loop - by_softmax).max()))

# %% [markdown]
# The third form is the one that learns: replace the equal scores by `q · k` — each position's query against every
# earlier position's key — and the average becomes a weighted one, **self-attention**. Why the scores are divided by
# `√head_size`: with unit-variance queries and keys, `q · k` sums `head_size` products, so its variance is
# `head_size`, and a softmax of large scores saturates towards one position (one-hot), where its gradient vanishes.

# %%
hs = 16
q, k = (jnp.asarray(rng.normal(size=(4, T_, hs)), jnp.float32) for _ in range(2))
raw = q @ k.transpose(0, 2, 1)  # (B, T, T)
scaled = raw * hs**-0.5
for label, sc in (("q·k", raw), ("q·k / √hs", scaled)):
    att = jax.nn.softmax(jnp.where(tril == 0, -jnp.inf, sc), axis=-1)
    print(f"{label:10}: score variance {float(sc.var()):5.2f}; the largest weight of each row, on average, "
          f"{float(att[:, -1].max(-1).mean()):.2f} (last row, {T_} positions)")
peak_raw = float(jax.nn.softmax(raw, -1).max(-1).mean())
peak_scaled = float(jax.nn.softmax(scaled, -1).max(-1).mean())

# %% [markdown]
# Now the ladder: each rung adds one idea, every rung trained the same way (AdamW 1e-3, batch 32 names, every
# position predicted) for the same steps, and scored on the dev names.
#
# 1. **bigram**: a token's embedding read straight out as its logits (lesson 2's model, per position);
# 2. **+ position, one head**: a learned position embedding and one self-attention head of size C;
# 3. **4 heads**: four heads of C/4 side by side, then a projection;
# 4. **+ MLP**: a feed-forward layer after attention (C → 4C → GELU → C): "the tokens think about what they found";
# 5. **4 blocks**: attention + MLP stacked four times, each block's output the next one's input (does depth alone
#    help? the table below says);
# 6. **+ residual**: each branch *adds* to a stream (`x = x + attention(x)`), a path the gradient takes through every
#    block unchanged;
# 7. **+ LayerNorm**: each branch reads a normalised stream (pre-norm, GPT-2's), and one more before the head.

# %%
def layernorm(x, g, b, eps=1e-5):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)  # the biased variance: GPT-2's and jnnex's
    return (x - mean) / jnp.sqrt(var + eps) * g + b


def gelu(x):
    return 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (x + 0.044715 * x**3)))  # GPT-2's (the lecture: ReLU)


def head(x, Wq, Wk, Wv):
    """One causal self-attention head: ``x (B, T, C) -> (B, T, hs)``."""
    T = x.shape[1]
    q, k, v = x @ Wq, x @ Wk, x @ Wv  # (B, T, hs) each
    wei = q @ k.transpose(0, 2, 1) * k.shape[-1] ** -0.5  # (B, T, T)
    wei = jnp.where(jnp.tril(jnp.ones((T, T))) == 0, -jnp.inf, wei)
    return jax.nn.softmax(wei, axis=-1) @ v


def block(p, x, rung):
    """One block at ``rung``: heads (and their projection), then the MLP, with or without residual and LayerNorm."""
    norm = rung >= 7
    a = layernorm(x, *p["ln1"]) if norm else x
    a = jnp.concatenate([head(a, *h) for h in p["heads"]], axis=-1)  # (B, T, C)
    if rung >= 3:
        a = a @ p["proj"][0] + p["proj"][1]
    x = x + a if rung >= 6 else a
    if rung >= 4:
        m = layernorm(x, *p["ln2"]) if norm else x
        m = gelu(m @ p["fc"][0] + p["fc"][1]) @ p["fcproj"][0] + p["fcproj"][1]
        x = x + m if rung >= 6 else m
    return x


def ladder_forward(p, x, rung):
    """The logits ``(B, T, V)`` of rung ``rung`` (1 … 7) for ``x (B, T)``."""
    h = p["wte"][x]  # (B, T, C)
    if rung == 1:
        return h @ p["lm_head"]
    h = h + p["wpe"][: x.shape[1]]
    for blk in p["blocks"]:
        h = block(blk, h, rung)
    if rung >= 7:
        h = layernorm(h, *p["lnf"])
    return h @ p["lm_head"]


def ladder_init(key, rung, V, T, C):
    keys = iter(jax.random.split(key, 64))
    normal = lambda *shape: 0.02 * jax.random.normal(next(keys), shape)  # noqa: E731  GPT-2's init
    ln = lambda: (jnp.ones(C), jnp.zeros(C))  # noqa: E731
    n_head = 1 if rung == 2 else 4
    hs = C // n_head

    def blk():
        return {"ln1": ln(), "heads": [(normal(C, hs), normal(C, hs), normal(C, hs)) for _ in range(n_head)],
                "proj": (normal(C, C), jnp.zeros(C)), "ln2": ln(), "fc": (normal(C, 4 * C), jnp.zeros(4 * C)),
                "fcproj": (normal(4 * C, C), jnp.zeros(C))}

    return {"wte": normal(V, C), "wpe": normal(T, C), "lm_head": normal(C, V), "lnf": ln(),
            "blocks": [blk() for _ in range(4 if rung >= 5 else 1)]}


def train_rung(rung, steps, C, seed=0):
    X, Y = (jnp.asarray(a) for a in splits.train)
    params = ladder_init(jax.random.key(seed), rung, vocab.size, X.shape[1], C)
    opt = optax.adamw(1e-3)

    def loss(p, x, y):
        return cross_entropy_forward(ladder_forward(p, x, rung), y)[0]

    @jax.jit
    def steps_(p, state, key):
        def one(carry, k):
            p, state = carry
            ix = jax.random.randint(k, (32,), 0, X.shape[0])
            g = jax.grad(loss)(p, X[ix], Y[ix])
            updates, state = opt.update(g, state, p)
            return (optax.apply_updates(p, updates), state), None
        return jax.lax.scan(one, (p, state), jax.random.split(key, steps))[0]

    params, _ = steps_(params, opt.init(params), jax.random.key(seed + 1))
    return float(jax.jit(loss)(params, *(jnp.asarray(a) for a in splits.dev))), params


LADDER = ["bigram", "+ position, one head", "4 heads", "+ MLP", "4 blocks", "+ residual", "+ LayerNorm"]
RUNG_STEPS, RUNG_C = learn.pick(3_000, 60), learn.pick(32, 16)
splits = make_splits(words, max(len(w) for w in words) + 1, vocab=vocab, per_position=True)  # a name a row
ladder = {}
for rung, label in enumerate(LADDER, start=1):
    ladder[label], last_params = train_rung(rung, RUNG_STEPS, RUNG_C)
    print(f"{rung}. {label:22} dev loss {ladder[label]:.4f}")
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(range(1, len(LADDER) + 1), list(ladder.values()), "o-")
ax.set_xticks(range(1, len(LADDER) + 1), LADDER, rotation=25, ha="right")
ax.set(xlabel="rung", ylabel="dev loss (nats per character)", title=f"the ladder, {RUNG_STEPS:,} AdamW steps each")
learn.show(fig, "07-ladder")
steps_down = list(ladder.values())
print("each rung against the one before:", ", ".join(f"{label} {after - before:+.4f}" for label, before, after in
                                                  zip(LADDER[1:], steps_down, steps_down[1:])))

# %% [markdown]
# Where a rung *raised* the loss, look at what it lacks: before the residual rung each branch replaces the stream
# instead of adding to it, so a deeper stack sends its input — and, backwards, its gradient — through every layer's
# small initial weights in turn. The residual rung gives both a path around them.
#
# The last rung is the GPT's block. Written here as the lecture writes it — separate heads, each with its own query,
# key and value matrices — it is jnnex's `block_forward`, whose fused `qkv` holds those matrices side by side
# (every head's queries, then keys, then values) and whose backward is written by hand below the forward:

# %%
blk = last_params["blocks"][0]
Wq, Wk, Wv = (jnp.concatenate([h[i] for h in blk["heads"]], axis=1) for i in range(3))  # (C, C) each
jnnex_block = G.Block(G.LayerNorm(*blk["ln1"]), Linear(jnp.concatenate([Wq, Wk, Wv], axis=1), jnp.zeros(3 * RUNG_C)),
                      Linear(*blk["proj"]), G.LayerNorm(*blk["ln2"]), Linear(*blk["fc"]), Linear(*blk["fcproj"]))
h_in = jnp.asarray(rng.normal(size=(2, 8, RUNG_C)), jnp.float32)
ours = block(blk, h_in, rung=7)
theirs, _ = G.block_forward(G.GPTConfig(n_embd=RUNG_C, n_head=4), jnnex_block, h_in)
block_gap = float(jnp.abs(ours - theirs).max())
print(f"this page's block vs jnnex.models.gpt.block_forward: max difference {block_gap:.1e} (float32)")

# %% [markdown]
# ## 2. Each layer is a pair: a forward that keeps what its backward needs, and the backward
#
# `jnnex.check.compare(forward, backward, *args)` runs both, and `jax.vjp` of the forward, on random inputs, and says
# per input whether the hand-written gradient matches.

# %%
jax.config.update("jax_enable_x64", True)  # the checks in float64; training below stays in the model's float32
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
# ## 3. Your turn: LayerNorm's backward
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
# Graded per gradient against jax.vjp: a wrong shape, a NaN or an exception is a row saying what was wanted.
rows = grade_backward(G.layernorm_forward, mine, r(B, T, C), 1 + r(C), r(C), names=["dx", "dw", "db"])
print(format_grades(rows))
wrong = [row.name for row in rows if not row.right]
print("all right!" if not wrong else f"not right yet: {', '.join(wrong)}")

# %% [markdown]
# ## 4. Train the whole GPT on its hand-written backward
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
# ## 5. What attention looks at
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
learn.result(ln_wrong=wrong, val_loss=val, steps=STEPS, data=source, average_gap=average_gap, peak_raw=peak_raw,
             peak_scaled=peak_scaled, ladder=ladder, block_gap=block_gap)
