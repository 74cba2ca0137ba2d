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
# # Lesson 5 — becoming a backprop ninja: the BatchNorm MLP's backward, tensor by tensor, by you
#
# **What you will learn**: to write a network's backward pass yourself — cross-entropy, softmax, the output layer,
# tanh, BatchNorm, the linear layer and the embedding — one elementary operation at a time, and to check every
# tensor against autodiff, the way the lecture's `cmp` does.
#
# Lecture: *Building makemore Part 4: Becoming a Backprop Ninja* (<https://www.youtube.com/watch?v=q8SA3rM6ckI>).
# Code: `jnnex/atomic.py` (the forward one operation per line, and the reference backward), `jnnex/check.py`.
#
# **How it works**: `jnnex.atomic.forward` computes the BatchNorm MLP (n_embd 10, 64 hidden, a batch of 32) as the
# lecture's chain of intermediates — `emb`, `embcat`, `hprebn`, `bnmeani`, … `probs`, `logprobs`. You write the
# gradient of some of them, as functions `fn(f, g)` of the forward's values `f` and the gradients already computed
# `g`; the rest of the backward continues from *your* values, so one mistake shows in its own row and every row after
# it. The solutions are in `lessons/solutions/05_backprop_ninja.py` — try first.
#
# **Full size** (the same problem: there is only one size), in float64, 14 s measured: with the solutions every
# gradient is `exact` or within 1e-10 of `jax.grad` (`JNNEX_LESSON_ANSWERS=solutions`); as shipped, your six
# placeholders are named wrong, `dlogprobs` first.

# %%
import jax
import jax.numpy as jnp

from jnnex import atomic, learn

jax.config.update("jax_enable_x64", True)  # float64: "approximate" means agreeing to ~1e-12, not ~1e-6
problem = atomic.example_problem(dtype=jnp.float64)
_, f = atomic.forward(*problem)
for name in ("embcat", "hprebn", "bnraw", "h", "logits", "probs"):
    print(f"{name:8} {tuple(f[name].shape)}")


# %% [markdown]
# ## Your turn
#
# Replace each `todo(...)` by your expression, `lambda f, g: ...`. Shapes: `f.logprobs (32, 27)`, `f.y (32,)`,
# `f.h (32, 64)`, `f.bnvar (1, 64)`, `f.C (27, 10)`, `f.x (32, 3)`; `g.dh`, `g.dbnraw`, `g.demb` are the gradients
# arriving from above. Until you fill one in, its row (and everything it feeds) reads `exact: False`.

# %%
def todo(name):  # a placeholder, zeros of the right shape: the check marks it wrong until you replace it
    return lambda f, g: jnp.zeros_like(getattr(f, name))


mine = {
    "dlogprobs": todo("logprobs"),    # loss = -mean_i logprobs[i, y_i]
    "dprobs": todo("probs"),          # logprobs = log(probs)
    "dhpreact": todo("hpreact"),      # h = tanh(hpreact)
    "dbnvar_inv": todo("bnvar_inv"),  # bnraw = bndiff * bnvar_inv   (bnvar_inv is (1, 64), broadcast over the rows)
    "dbnvar": todo("bnvar"),          # bnvar_inv = (bnvar + eps) ** -0.5
    "dC": todo("C"),                  # emb = C[x]
}
attempts = learn.answers("05_backprop_ninja", mine)

# %% [markdown]
# ## The check
#
# One row per gradient of the backward, in the order it is computed; yours are marked. `exact`: bit for bit the
# same as `jax.grad`'s; `approximate`: within 1e-10; `maxdiff`: the largest difference.

# %%
rows = atomic.compare(*problem, overrides=attempts)
from jnnex.check import format_table  # noqa: E402

print(format_table([r.__class__(f"{r.name} (yours)" if r.name in attempts else r.name, r.exact, r.approx,
                                r.maxdiff) for r in rows]))
wrong = [r.name for r in rows if not r.approx]
first_wrong = wrong[0] if wrong else None
print("all right!" if not wrong else f"first wrong gradient: {first_wrong} — fix it first, the rest follow from it")

# %% [markdown]
# ## A picture of where a mistake spreads
#
# Each gradient's largest difference from `jax.grad`, in the backward's order: a wrong expression lights up its own
# row and the rows computed from it.

# %%
plt = learn.pyplot()
fig, ax = plt.subplots(figsize=(9, 3.5))
diffs = [max(r.maxdiff, 1e-18) for r in rows]
ax.bar(range(len(rows)), diffs, color=["tab:red" if not r.approx else "tab:green" for r in rows])
ax.set_yscale("log")
ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=75, fontsize=7)
ax.set(title="each gradient's max |yours − jax.grad| (red: wrong)", xlabel="gradient, in backward order",
       ylabel="max difference")
learn.show(fig, "05-where-mistakes-spread")

# %% [markdown]
# ## What to try next
#
# * Exercise 2 of the lecture: the whole cross-entropy backward in one line, `dlogits = (softmax(logits) − onehot(y))
#   / n` — `jnnex.layers.cross_entropy_backward` is it.
# * Exercise 3: BatchNorm's backward in one expression (`jnnex.layers.batchnorm_backward`), and check it with
#   `jnnex.check.compare(batchnorm_forward, your_backward, x, gamma, beta)`.

# %%
learn.result(wrong=wrong, first_wrong=first_wrong, yours=sorted(attempts))
