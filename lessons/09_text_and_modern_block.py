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
# **What you will learn**: a text as one long stream of tokens; byte-pair encoding (the tokenizer GPT-2 and GPT-4 use),
# merge by merge, written on the page and then by you in minbpe's three steps, graded against `jnnex.bpe`; nanoGPT's
# Shakespeare recipe trained on the GPT of lesson 7; and the three parts that turn GPT-2's block into Llama's — RMSNorm,
# rotary positions, SwiGLU — each a forward and its backward by hand.
#
# Lectures: *Let's build the GPT Tokenizer* (<https://www.youtube.com/watch?v=zduSFxRajkE>), *Let's build GPT*
# (<https://www.youtube.com/watch?v=kCc8FmEb1nY>). Code: `jnnex/bpe.py`, `jnnex/text.py`, `jnnex/models/llama.py`.
#
# **Full size** (`python lessons/09_text_and_modern_block.py`, tiny Shakespeare, 2 cores, 149 s measured): 512-token
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
# Start from the text's UTF-8 bytes, which are 256 tokens. Then repeatedly find the most frequent adjacent pair and
# replace it everywhere by a new token. That takes two functions, written here as the lecture writes them:

# %%
def get_stats(ids, counts):
    """Add the count of every adjacent pair in ``ids`` to ``counts`` (a dict), and return it."""
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids, pair, idx):
    """``ids`` with every occurrence of ``pair`` replaced by the new token ``idx``, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i < len(ids) - 1 and (ids[i], ids[i + 1]) == pair:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


ids = list("aaabdaaabac".encode())
for idx in (256, 257, 258):  # the Wikipedia example: aa, then ab, then (aa)(ab); ties go to the smaller pair
    counts = get_stats(ids, {})
    pair = min(counts, key=lambda p: (-counts[p], p))
    ids = merge(ids, pair, idx)
    print(f"merge {pair} -> {idx}: {ids}")
print("jnnex.bpe gives", bpe.train("aaabdaaabac", 259, pattern=None).encode("aaabdaaabac"))

# %% [markdown]
# ### Your turn: minbpe's exercise, three steps
#
# Each step is graded against `jnnex.bpe` on the first part of the text, with 64 merges. Until you write a step,
# its row reads `to do`. The solutions are in `lessons/solutions/09_text_and_modern_block.py`.
#
# 1. **The basic tokenizer.** `train_basic` returns the merges in order (break ties by the smaller pair, as above).
#    `encode_basic` applies them to a text: at each turn merge the pair **with the lowest rank** (the earliest
#    learned), not the leftmost one. `decode` turns ids back into text.
# 2. **The regex split.** Cut the text with GPT-4's pattern (`regex.findall(pattern, text)`) first, and count and
#    merge pairs only inside each chunk. A merge then never joins the end of one word to the start of the next.
# 3. **Special tokens.** `encode_special` maps each special token (`<|endoftext|>`) to its own id wherever it occurs,
#    and encodes the text between them as in step 2.

# %%
import regex  # noqa: E402,F401  (for step 2: regex.findall(pattern, text); GPT-4's pattern needs its \p{L})


def train_basic(text, vocab_size, get_stats, merge):
    return None  # your code: the merges, a list of pairs in the order learned


def encode_basic(text, merges, get_stats, merge):
    return None  # your code: the ids


def decode(ids, merges):
    return None  # your code: the text


def train_regex(text, vocab_size, pattern, get_stats, merge):
    return None  # your code


def encode_regex(text, merges, pattern, get_stats, merge):
    return None  # your code


def encode_special(text, merges, pattern, special, get_stats, merge):
    return None  # your code; special = {"<|endoftext|>": 320}


yours = learn.answers("09_text_and_modern_block", dict(
    train_basic=train_basic, encode_basic=encode_basic, decode=decode, train_regex=train_regex,
    encode_regex=encode_regex, encode_special=encode_special))

# %%
from jnnex.check import format_grades, grade_call, grade_sequence  # noqa: E402

V, part = 256 + 64, text[: learn.pick(20_000, 5_000)]
probe = "Hello world's café 👋: the tokens of a text round-trip!"
basic, gpt4 = bpe.train(part, V, pattern=None), bpe.train(part, V)
eot = {"<|endoftext|>": V}
special = bpe.Tokenizer(gpt4.merges, gpt4.pattern, special=(("<|endoftext|>", V),))
joined = part[:300] + "<|endoftext|>" + part[300:600]
P = bpe.GPT4_SPLIT_PATTERN
steps = [
    grade_call("1 train (basic)", yours["train_basic"], (part, V, get_stats, merge), list(basic.merges),
               grade=grade_sequence, what="merge"),
    grade_call("1 encode (basic)", yours["encode_basic"], (part, list(basic.merges), get_stats, merge),
               basic.encode(part), grade=grade_sequence, what="token"),
    grade_call("1 decode round trip", lambda: yours["decode"](basic.encode(probe), list(basic.merges)), (), probe,
               grade=grade_sequence, what="character"),
    grade_call("2 train (regex)", yours["train_regex"], (part, V, P, get_stats, merge), list(gpt4.merges),
               grade=grade_sequence, what="merge"),
    grade_call("2 encode (regex)", yours["encode_regex"], (part, list(gpt4.merges), P, get_stats, merge),
               gpt4.encode(part), grade=grade_sequence, what="token"),
    grade_call("3 special tokens", yours["encode_special"], (joined, list(gpt4.merges), P, eot, get_stats, merge),
               special.encode(joined, allowed_special="all"), grade=grade_sequence, what="token"),
]
print(format_grades(steps))
bpe_wrong = [g.name for g in steps if not g.right]

# %% [markdown]
# The round trip, shown with jnnex's tokenizer: each token is a run of bytes, and decoding joins them back into the
# text exactly. A character outside ASCII (é, 👋) is several bytes. Where no merge joined them, each byte is a token
# of its own (shown in hex), and only together do they decode to the character.

# %%
def show_token(b):
    """A token's bytes as text, or as hex where they are part of a character (é is the two bytes c3 a9)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "<" + " ".join(f"{x:02x}" for x in b) + ">"


probe_ids = gpt4.encode(probe)
print(probe_ids)
print(" | ".join(show_token(gpt4.vocab[i]) for i in probe_ids))
round_trip = gpt4.decode(probe_ids) == probe
print("decode(encode(text)) == text:", round_trip)

# %% [markdown]
# At the lesson's scale: 512 tokens trained on more of the text. The first merges are the language's commonest
# pairs, and each merge shortens the stream.

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
# Each forward is written here first, and shown equal to jnnex's:

# %%
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
r = lambda *s: jnp.asarray(rng.normal(size=s))  # noqa: E731


def rmsnorm(x, gain, eps=1e-5):
    return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + eps) * gain  # no mean subtracted, no bias


def rope(x, pos0=0, base=10_000.0):  # x: (B, heads, T, hs); channel i pairs with channel i + hs/2
    T, hs = x.shape[2], x.shape[3]
    freq = base ** (-jnp.arange(0, hs, 2) / hs)  # (hs/2,): 1, …, base^(-(hs-2)/hs)
    angle = (pos0 + jnp.arange(T))[:, None] * freq[None, :]  # (T, hs/2): position × frequency
    x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
    return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle), x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], -1)


def swiglu(h):  # h = [x W1, x W3] side by side (the fused projection)
    a, b = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(a) * b  # silu(a) = a · sigmoid(a)


xr, gr, xq, xh = r(2, 5, 8), 1 + r(8), r(2, 3, 5, 8), r(2, 5, 16)
page_gap = max(float(jnp.abs(rmsnorm(xr, gr) - Ll.rmsnorm_forward(xr, gr)[0]).max()),
               float(jnp.abs(rope(xq, 3) - Ll.rope_forward(xq, 3)[0]).max()),
               float(jnp.abs(swiglu(xh) - Ll.swiglu_forward(xh)[0]).max()))
print(f"RMSNorm, rotary positions (from position 3) and SwiGLU: the page's vs jnnex's forwards, largest difference "
      f"{page_gap:.1e}")

# %% [markdown]
# jnnex writes each one's backward by hand beside its forward. Here each is checked against `jax.vjp` of its forward,
# in float64:

# %%
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
             steps=STEPS, data=what, bpe_steps={g.name: g.verdict for g in steps}, bpe_wrong=bpe_wrong,
             round_trip=round_trip, modern_block_page=page_gap)
