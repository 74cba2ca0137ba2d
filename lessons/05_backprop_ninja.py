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
# **What you will learn**: to write a network's backward pass yourself. You go one elementary operation at a time:
# cross-entropy, softmax, the output layer, tanh, BatchNorm, the linear layer and the embedding. Then you fold the
# cross-entropy and BatchNorm into one expression each, and finally train the net on nothing but your own gradients.
# These are the lecture's four exercises.
#
# Lecture: *Building makemore Part 4: Becoming a Backprop Ninja* (<https://www.youtube.com/watch?v=q8SA3rM6ckI>).
# Code: `jnnex/atomic.py` (the same forward, and the reference backward), `jnnex/check.py` (the grader).
#
# **How it works**: the forward is written below, one operation a line, and shown equal to jnnex's. You write each
# gradient as `lambda f, g: ...`, where `f` holds the forward's values and `g` the gradients that come before yours.
# Each answer is graded **on its own**, from the *right* upstream gradients, so one run shows every mistake at once.
# A wrong shape, a NaN or an exception is a row of the table saying what was wanted. The solutions are in
# `lessons/solutions/05_backprop_ninja.py`: try first.
#
# **Full size**: exercises 1–3 are one problem at both sizes (a batch of 32, float64). Exercise 4 trains for 2,000
# steps at the full size and 200 at the tiny one. With the solutions (`JNNEX_LESSON_ANSWERS=solutions`, names.txt,
# 15 s measured) every answer is `exact` or within 1e-10, and after 2,000 steps on your backward (loss 3.2142 →
# 2.3693) the parameters are within 2e-15 of `jax.grad`'s run. As shipped, every row reads `to do`.

# %%
import jax
import jax.numpy as jnp
import numpy as np

from jnnex import atomic, learn
from jnnex.check import Grade, format_grades, grade_array

jax.config.update("jax_enable_x64", True)  # float64: "close" means agreeing to ~1e-12, not ~1e-6
problem = atomic.example_problem(dtype=jnp.float64)  # bn-mlp: n_embd 10, 64 hidden, block 3, a batch of 32
cfg, params, x, y = problem

# %% [markdown]
# ## 1. The forward, one operation a line
#
# This is the lecture's forward, line for line, in `jax.numpy`. Every reduced statistic keeps its axis (`(1, 64)`,
# `(32, 1)`) so you can see where a broadcast happens. Each broadcast becomes a sum in the backward.

# %%
def forward(C, W1, b1, bngain, bnbias, W2, b2, x, y, eps=1e-5):
    n = x.shape[0]
    emb = C[x]                                        # (32, 3, 10)  the embedding of each context character
    embcat = emb.reshape(n, -1)                       # (32, 30)     concatenated
    hprebn = embcat @ W1 + b1                         # (32, 64)     the first linear layer
    bnmeani = 1 / n * hprebn.sum(0, keepdims=True)    # (1, 64)      BatchNorm: the mean ...
    bndiff = hprebn - bnmeani                         # (32, 64)
    bndiff2 = bndiff**2
    bnvar = 1 / n * bndiff2.sum(0, keepdims=True)     # (1, 64)      ... the variance: 1/n (the lecture: 1/(n-1))
    bnvar_inv = (bnvar + eps) ** -0.5                 # (1, 64)
    bnraw = bndiff * bnvar_inv                        # (32, 64)     normalised
    hpreact = bngain * bnraw + bnbias                 # (32, 64)     scaled and shifted
    h = jnp.tanh(hpreact)                             # (32, 64)
    logits = h @ W2 + b2                              # (32, 27)     the output layer
    logit_maxes = logits.max(1, keepdims=True)        # (32, 1)      cross-entropy, by hand
    norm_logits = logits - logit_maxes                # subtract the max: exp stays finite
    counts = jnp.exp(norm_logits)
    counts_sum = counts.sum(1, keepdims=True)         # (32, 1)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv                   # (32, 27)     softmax
    logprobs = jnp.log(probs)
    loss = -logprobs[jnp.arange(n), y].mean()
    return loss, dict(emb=emb, embcat=embcat, hprebn=hprebn, bnmeani=bnmeani, bndiff=bndiff, bndiff2=bndiff2,
                      bnvar=bnvar, bnvar_inv=bnvar_inv, bnraw=bnraw, hpreact=hpreact, h=h, logits=logits,
                      logit_maxes=logit_maxes, norm_logits=norm_logits, counts=counts, counts_sum=counts_sum,
                      counts_sum_inv=counts_sum_inv, probs=probs, logprobs=logprobs)


(W1, b1), (W2, b2) = params.dense
mine_loss, mine_f = forward(params.C, W1, b1, params.bn[0].gamma, params.bn[0].beta, W2, b2, x, y)
loss, f = atomic.forward(*problem)
forward_gap = max(float(jnp.abs(mine_f[k] - f[k]).max()) for k in atomic.INTERMEDIATES)
print(f"loss {float(mine_loss):.12f} (page) vs {float(loss):.12f} (jnnex.atomic.forward); the 19 intermediates' "
      f"largest difference {forward_gap:.1e}")

# %% [markdown]
# **Where this differs from the lecture: the variance divides by n, not n − 1.** The lecture's PyTorch code uses
# Bessel's correction (`1/(n-1)`) in the training forward. jnnex's BatchNorm, like `torch.nn.BatchNorm1d` when it
# normalises a training batch, uses the biased variance (`1/n`). The two are a factor `n/(n-1)` apart. At n = 32 the
# normalised values differ by about 1.6 %, and so do their gradients. A `1/(n-1)` carried over from the lecture is a
# mistake here:

# %%
n = x.shape[0]
bessel = mine_f["bndiff2"].sum(0, keepdims=True) / (n - 1)
ratio = float((bessel / mine_f["bnvar"]).mean())
raw_gap = float(jnp.abs(mine_f["bndiff"] * (bessel + 1e-5) ** -0.5 - mine_f["bnraw"]).max() /
                jnp.abs(mine_f["bnraw"]).max())
print(f"variance with n - 1 / variance with n = {ratio:.6f} (n/(n-1) = {n / (n - 1):.6f}); bnraw moves by up to "
      f"{raw_gap:.2%} of its largest value")

# %% [markdown]
# ## 2. Exercise 1: every gradient, one operation at a time
#
# Replace each `todo` by your expression `lambda f, g: ...`. You can use the forward's values (`f.probs`, `f.bndiff`,
# and the parameters as `f.C`, `f.W1`, `f.b1`, `f.bngain`, `f.bnbias`, `f.W2`, `f.b2`), plus `f.x`, `f.y` and
# `f.eps`. You can also use the gradients that come before yours in this list (`g.dlogprobs`, …). The shapes are
# printed below. The rule of the whole exercise: **a gradient has the shape of what it is the gradient of**, and a
# value that was broadcast gets the sum of its gradient over the broadcast axis.

# %%
for name in atomic.INTERMEDIATES:
    print(f"{name:15} {tuple(f[name].shape)}")


def todo(f, g):  # not written yet: its row reads "to do"
    return None


mine = {
    "dlogprobs": todo,        # loss = -mean_i logprobs[i, y_i]
    "dprobs": todo,           # logprobs = log(probs)
    "dcounts_sum_inv": todo,  # probs = counts * counts_sum_inv
    "dcounts_sum": todo,      # counts_sum_inv = counts_sum ** -1
    "dcounts": todo,          # counts feeds probs and counts_sum
    "dnorm_logits": todo,     # counts = exp(norm_logits)
    "dlogit_maxes": todo,     # norm_logits = logits - logit_maxes
    "dlogits": todo,          # logits feed norm_logits and logit_maxes
    "dh": todo,               # logits = h @ W2 + b2
    "dW2": todo,
    "db2": todo,
    "dhpreact": todo,         # h = tanh(hpreact)
    "dbngain": todo,          # hpreact = bngain * bnraw + bnbias
    "dbnbias": todo,
    "dbnraw": todo,
    "dbnvar_inv": todo,       # bnraw = bndiff * bnvar_inv
    "dbnvar": todo,           # bnvar_inv = (bnvar + eps) ** -0.5
    "dbndiff2": todo,         # bnvar = 1/n * bndiff2.sum(0, keepdims=True)
    "dbndiff": todo,          # bndiff feeds bndiff2 and bnraw
    "dbnmeani": todo,         # bndiff = hprebn - bnmeani
    "dhprebn": todo,          # hprebn feeds bndiff and bnmeani
    "dembcat": todo,          # hprebn = embcat @ W1 + b1
    "dW1": todo,
    "db1": todo,
    "demb": todo,             # embcat = emb.reshape(n, -1)
    "dC": todo,               # emb = C[x]
    # Exercise 2 (below): the cross-entropy's backward in one expression, from f alone.
    "ex2_dlogits": todo,
    # Exercise 3 (below): BatchNorm's backward in one expression, from f and g.dhpreact alone.
    "ex3_dhprebn": todo,
}
answers = learn.answers("05_backprop_ninja", mine)
exercise1 = {k: v for k, v in answers.items() if not k.startswith("ex")}

grades = atomic.grade(problem, exercise1)
print(format_grades(grades))
wrong = [r.name for r in grades if not r.right]
todo_left = [r.name for r in grades if r.verdict == "to do"]
print("all right!" if not wrong else f"{len(grades) - len(wrong)} of {len(grades)} right; {len(todo_left)} to do; "
      f"to fix: {', '.join(n for n in wrong if n not in todo_left) or 'none'}")

# %% [markdown]
# ## 3. Exercise 2: the cross-entropy's backward in one line
#
# Going through `logprobs`, `probs`, `counts` and the max was the long way. Work out on paper what
# `dloss/dlogits` is for one row. Then write it for the whole batch from `f.logits` and `f.y` alone. `g` is empty
# here. (The answer is short: softmax, minus something, over n.)

# %%
ex2 = atomic.grade(problem, {"dlogits": answers["ex2_dlogits"]}, given=())
print(format_grades(ex2))

# %% [markdown]
# ## 4. Exercise 3: BatchNorm's backward in one expression
#
# From `g.dhpreact` to `g.dhprebn`, through the mean and the variance at once. Use `f.bngain`, `f.bnvar_inv`,
# `f.bnraw` and n. The lecture's formula has a factor `n/(n-1)` that comes from its Bessel-corrected variance. Here
# the variance divides by n, so work it out again.

# %%
ex3 = atomic.grade(problem, {"dhprebn": answers["ex3_dhprebn"]}, given=("dhpreact",))
print(format_grades(ex3))

# %% [markdown]
# ## 5. Exercise 4: train on your own backward
#
# The training loop is written here: a minibatch, the forward, **your** 26 gradients chained one after another (each
# now takes the values of yours before it), and an SGD step. The same loop runs with `jax.grad` beside it. If your
# backward is right, the two nets stay equal step after step.

# %%
from jnnex.data import make_splits  # noqa: E402

words, source = learn.names()
Xtr, Ytr = (jnp.asarray(a) for a in make_splits(words, cfg.block_size).train)
steps = learn.pick(2_000, 200)


def train(gradients_of, steps, lr=0.1, seed=0):
    """SGD from the lesson's parameters, batches of 32 drawn by one seed, `gradients_of(params, x, y)` giving the
    gradients as the parameters' own structure; the losses and the final parameters."""

    @jax.jit
    def step(params, i):
        ix = jax.random.randint(jax.random.fold_in(jax.random.key(seed), i), (32,), 0, Xtr.shape[0])
        loss, grads = gradients_of(params, Xtr[ix], Ytr[ix])
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

    p, losses = params, []
    for i in range(steps):
        p, loss = step(p, i)
        losses.append(float(loss))
    return p, np.array(losses)


def yours(params, x, y):
    loss, f = atomic.forward(cfg, params, x, y)
    return loss, atomic.parameter_gradients(params, atomic.backward(f, overrides=exercise1))


def autodiff(params, x, y):
    return jax.value_and_grad(lambda p: atomic.forward(cfg, p, x, y)[0])(params)


ref_params, ref_losses = train(autodiff, steps)
flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])  # noqa: E731  every parameter
if wrong:
    ex4 = [Grade("trained parameters", "to do", note=f"trains on exercise 1's answers: first make all {len(grades)} "
                                                     f"right ({len(wrong)} are not)")]
    print(f"meanwhile, jax.grad's run: loss {ref_losses[:20].mean():.4f} -> {ref_losses[-20:].mean():.4f} over "
          f"{steps} steps")
    train_gap = None
else:
    my_params, my_losses = train(yours, steps)
    train_gap = float(np.max(np.abs(flat(my_params) - flat(ref_params))))
    ex4 = [grade_array("trained parameters", flat(my_params), flat(ref_params), rtol=1e-8, atol=1e-10)]
    print(f"{steps} steps on {source}: loss {my_losses[:20].mean():.4f} -> {my_losses[-20:].mean():.4f} on your "
          f"backward, {ref_losses[:20].mean():.4f} -> {ref_losses[-20:].mean():.4f} on jax.grad")
print(format_grades(ex4))

# %% [markdown]
# ## A picture of your answers
#
# Each gradient's largest difference from the right one, in the backward's order. Each is graded from the right
# upstream values, so a wrong answer lights up its own bar alone. A wrong shape, an error or a `to do` has no
# difference to show, and its bar is grey.

# %%
plt = learn.pyplot()
every = grades + ex2 + ex3
fig, ax = plt.subplots(figsize=(10, 3.5))
colours = {"exact": "tab:green", "close": "tab:green", "wrong": "tab:red", "not finite": "tab:red"}
heights = [max(r.maxdiff, 1e-18) if r.maxdiff is not None else 1.0 for r in every]
ax.bar(range(len(every)), heights, color=[colours.get(r.verdict, "0.7") for r in every])
ax.set_yscale("log")
labels = [r.name if i < len(grades) else f"ex{2 + i - len(grades)}: {r.name}" for i, r in enumerate(every)]
ax.set_xticks(range(len(every)), labels, rotation=75, fontsize=7)
ax.set(title="each answer's max |yours − right| (green: right, red: wrong, grey: shape, error or to do)",
       xlabel="gradient, in backward order", ylabel="max difference (exact: the floor, 1e-18)")
learn.show(fig, "05-answers")

# %% [markdown]
# ## What to try next
#
# * Make the tanh a ReLU in the forward, then work out which one line of your backward changes.
# * Add the lecture's Bessel correction to the page's forward. Which of your gradients change, and by how much? The
#   factor `n/(n-1)` from section 1 tells you.
# * `jnnex.layers.batchnorm_backward` is exercise 3 inside the library. Read it, and check it with
#   `jnnex.check.compare(batchnorm_forward, batchnorm_backward, x, gamma, beta)`.

# %%
learn.result(forward_gap=forward_gap, bessel_ratio=ratio, wrong=wrong,
             verdicts={r.name: r.verdict for r in grades}, ex2=ex2[0].verdict, ex3=ex3[0].verdict,
             ex3_note=ex3[0].note, ex4=ex4[0].verdict, train_gap=train_gap, steps=steps, yours=sorted(answers))
