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
# # Lesson 9 — from names to text: tokens, a Shakespeare GPT, and the modern block by hand
#
# **What you will learn**: a text as one long stream of tokens; byte-pair encoding (the tokenizer GPT-2 and GPT-4
# use), merge by merge; nanoGPT's Shakespeare recipe trained on the GPT of lesson 7; and the three parts that turn
# GPT-2's block into Llama's — RMSNorm, rotary positions, SwiGLU — each a forward and its backward by hand.
#
# Lectures: *Let's build the GPT Tokenizer* (<https://www.youtube.com/watch?v=zduSFxRajkE>), *Let's build GPT*
# (<https://www.youtube.com/watch?v=kCc8FmEb1nY>). Code: `jnnex/bpe.py`, `jnnex/text.py`, `jnnex/models/llama.py`.
#
# **Full size** (`python lessons/09_text_and_modern_block.py`, tiny Shakespeare, 2 cores, 172 s measured): 512-token
# BPE on the first 200,000 characters (2.10 bytes a token); nanoGPT's CPU recipe (4 layers, 4 heads, n_embd 128,
# block 64, 2,000 steps of 12) reaches val **1.8888** per character, exactly scored (the README's GPT row); each
# modern-block pair agrees with `jax.vjp` to 4.4e-16.

# %%
import jax
import jax.numpy as jnp
import numpy as np

from jnnex import bpe, learn, run
from jnnex.check import compare
from jnnex.lm import continue_text
from jnnex.models import llama as Ll

plt = learn.pyplot()
path, what = learn.shakespeare()
text = open(path, encoding="utf-8").read()
STEPS = learn.pick(2_000, 30)
print(f"{what}: {len(text):,} characters; it begins {text[:60]!r}")

# %% [markdown]
# ## 1. Byte-pair encoding, merge by merge
#
# Start from the text's UTF-8 bytes (256 tokens); repeatedly merge the most frequent adjacent pair into a new token.
# The first merges are the commonest pairs of the language; each one shortens the stream.

# %%
sample = text[: learn.pick(200_000, 20_000)]
tok = bpe.train(sample, learn.pick(512, 300))
print(tok.describe(limit=8))
sizes = [256 + k for k in (0, 8, 16, 32, 64, 128, 256) if 256 + k <= tok.vocab_size]
lengths = []
for size in sizes:
    small = bpe.Tokenizer(tok.merges[: size - 256], tok.pattern)
    lengths.append(len(sample.encode()) / len(small.encode_ordinary(sample)))
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(sizes, lengths, "o-")
ax.set(title="BPE: bytes per token as merges are added", xlabel="vocabulary size", ylabel="bytes per token")
learn.show(fig, "09-bpe")

# %% [markdown]
# ## 2. nanoGPT's Shakespeare GPT on a CPU
#
# Characters as tokens, a random window of 65 a row, nanoGPT's layout (no biases, the head tied to the embedding)
# and optimiser: `jnnex train --model gpt --preset shakespeare-cpu --data tinyshakespeare.txt`.

# %%
rc = run.RunConfig.new("gpt", path, preset="shakespeare-cpu", corpus="text", steps=STEPS, eval_every=STEPS,
                       **learn.pick({}, {"n_layer": 1, "n_embd": 32}))  # (the tiny size: a one-block GPT)
result = run.train(rc, progress=False)
val = result.metrics["val_loss"]
print(f"val {val:.4f} per character (exact, every window scored once)")
prompt = jnp.asarray(result.splits.parts[1].tokens[:16], jnp.int32)
n_new = learn.pick(300, 20)
out = continue_text(result.model, result.params, result.state, prompt, n_new, jax.random.key(0))
print(rc.vocab.decode(np.asarray(prompt)) + rc.vocab.decode(np.asarray(out[0])))

# %% [markdown]
# ## 3. The modern block's parts, by hand
#
# * **RMSNorm**: LayerNorm without the mean — divide by the root mean square, scale by a gain;
# * **rotary positions**: rotate each pair of a query's (and key's) channels by an angle proportional to the position,
#   so `q·k` depends on the distance between positions only;
# * **SwiGLU**: the MLP's nonlinearity as a gate, `silu(x W₁) ⊙ (x W₃)`.
#
# Each against `jax.vjp` of its forward, in float64:

# %%
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
r = lambda *s: jnp.asarray(rng.normal(size=s))  # noqa: E731
checks = {
    "RMSNorm": (Ll.rmsnorm_forward, Ll.rmsnorm_backward, (r(2, 5, 8), 1 + r(8)), ["dx", "dgain"]),
    "rotary positions": (Ll.rope_forward, lambda dy, cache: Ll.rope_backward(dy, cache)[0], (r(2, 3, 5, 8),),
                         ["dx"]),
    "SwiGLU": (Ll.swiglu_forward, Ll.swiglu_backward, (r(2, 5, 16),), ["dh"]),
}
worst = 0.0
for name, (fwd, bwd, args, names) in checks.items():
    rows = compare(fwd, bwd, *args, names=names)
    worst = max(worst, *(row.maxdiff for row in rows))
    print(f"{name:17} " + "  ".join(f"{row.name}: {'right' if row.approx else 'WRONG'} (max diff {row.maxdiff:.1e})"
                                     for row in rows))

# %% [markdown]
# ## What to try next
#
# * Train on BPE tokens: `--tokenizer bpe --vocab-size 512 --preset shakespeare-cpu-bpe`, and compare per byte.
# * The Llama at the same size: `jnnex train --model llama --preset shakespeare-cpu` (val 1.64).
# * Sample with and without the KV cache (`cache=False`): the same tokens, faster.

# %%
learn.result(val_loss=val, merges=len(tok.merges), bytes_per_token=lengths[-1], modern_block_worst=worst,
             steps=STEPS, data=what)
