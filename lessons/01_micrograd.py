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
# # Lesson 1 — backpropagation from first principles (micrograd)
#
# **What you will learn**: what a derivative measures; how a scalar autograd engine (`Value`) records a computation
# and runs the chain rule backwards through it, one local derivative per operation; and how the same engine trains
# a small neural net to separate two moons — then the same net on whole tensors, with its backward by hand.
#
# Lecture: *The spelled-out intro to neural networks and backpropagation: building micrograd*
# (<https://www.youtube.com/watch?v=VMj-3S1tku0>). Code: `jnnex/micrograd/`.
#
# **Full size** (`python lessons/01_micrograd.py`, 2 cores, 16 s, measured): after micrograd's 100 steps the scalar
# engine's loss is 0.0190 at 100 % accuracy, and the tensor engine's the same 0.0190 from the same initial weights.
# `JNNEX_LESSON_SIZE=tiny` runs it in seconds (what the test suite does).

# %%
import jax
import jax.numpy as jnp
import numpy as np

from jnnex import learn
from jnnex.micrograd import tensor_mlp
from jnnex.micrograd.engine import Value
from jnnex.micrograd.nn import MLP, moons_loss, train_moons

plt = learn.pyplot()
STEPS = learn.pick(100, 5)  # training steps of the moons demo
GRID = learn.pick(120, 12)  # the decision boundary's resolution

# %% [markdown]
# ## 1. A derivative is a sensitivity
#
# Nudge the input of $f(x) = 3x^2 - 4x + 5$ by a small $h$: the output moves by about $f'(x)\,h$. At $x = 3$ the
# slope is $6x - 4 = 14$.

# %%
def f(x):
    return 3 * x**2 - 4 * x + 5


h = 1e-6
print(f"(f(3 + h) - f(3)) / h = {(f(3 + h) - f(3)) / h:.4f}   (exactly: 14)")

xs = np.linspace(-5, 5, 101)
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(xs, f(xs), label="f(x)")
ax.plot(xs, f(3) + 14 * (xs - 3), "--", label="tangent at x = 3, slope 14")
ax.set(title="f(x) = 3x² − 4x + 5 and its slope at 3", xlabel="x", ylabel="f(x)", ylim=(-10, 110))
ax.legend()
learn.show(fig, "01-derivative")

# %% [markdown]
# ## 2. `Value`: every operation remembers its inputs and its local derivatives
#
# `a * b` makes a node whose local derivatives are `(b, a)`; `backward()` visits the nodes from the output back,
# multiplying each local derivative by the gradient arriving from above and *adding* it into the input's `grad`
# (the chain rule; a value used twice gets both contributions).

# %%
a, b, c, f_ = Value(2.0), Value(-3.0), Value(10.0), Value(-2.0)
e = a * b
d = e + c
L = d * f_
L.backward()
for name, v in [("a", a), ("b", b), ("c", c), ("e", e), ("d", d), ("f", f_), ("L", L)]:
    print(f"{name}: data {v.data:6.1f}   dL/d{name} = {v.grad:6.1f}")
learn.show(learn.draw_graph(L, "L = (a·b + c)·f, after L.backward()"), "01-graph")

# %% [markdown]
# Check it against JAX's autodiff on the same function: the gradients are the numbers in the boxes.

# %%
grads = jax.grad(lambda a, b, c, f: (a * b + c) * f, argnums=(0, 1, 2, 3))(2.0, -3.0, 10.0, -2.0)
print("jax.grad:", [float(g) for g in grads], " Value:", [a.grad, b.grad, c.grad, f_.grad])
assert np.allclose([float(g) for g in grads], [a.grad, b.grad, c.grad, f_.grad])

# %% [markdown]
# ## 3. A neuron, and a net that separates two moons
#
# micrograd's demo: 100 points of two interleaved half-moons, `MLP(2, [16, 16, 1])` with ReLU, a max-margin loss
# plus a little L2, plain gradient descent with a decaying rate — every gradient from the scalar engine above.

# %%
X, y, params = tensor_mlp.moons_problem(seed=0)
model = MLP(2, list(tensor_mlp.MOONS_SIZES[1:]), params=params)
print(model)
print(f"{len(model.parameters())} parameters")
losses, accs = train_moons(model, X, y, steps=STEPS)
scalar_loss, scalar_acc = moons_loss(model, X, y)
print(f"scalar engine after {STEPS} steps: loss {scalar_loss.data:.4f}, accuracy {scalar_acc:.0%}")

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(losses, label="loss")
ax.plot(accs, label="accuracy")
ax.set(title="training the moons MLP on the scalar engine", xlabel="step", ylabel="loss / accuracy")
ax.legend()
learn.show(fig, "01-moons-training")

# %% [markdown]
# ## 4. The same net on whole tensors, its backward by hand
#
# `jnnex.micrograd.tensor_mlp` writes the MLP as matrix products, with a hand-written backward per layer, and
# trains from the same initial weights: the same loss, thousands of times faster.

# %%
x32, y32 = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)
trained, _, _ = tensor_mlp.train_moons(params, x32, y32, steps=STEPS, engine="manual")
tensor_loss = float(tensor_mlp.loss_fn(trained, x32, y32))
print(f"tensor engine: loss {tensor_loss:.4f} (scalar: {scalar_loss.data:.4f})")

gx, gy = np.meshgrid(np.linspace(-2, 3, GRID), np.linspace(-1.5, 2, GRID))
scores = tensor_mlp.apply(trained, jnp.asarray(np.c_[gx.ravel(), gy.ravel()], jnp.float32)).reshape(gx.shape)
fig, ax = plt.subplots(figsize=(5, 4))
ax.contourf(gx, gy, np.asarray(scores) > 0, alpha=0.3, cmap="coolwarm")
ax.scatter(X[:, 0], X[:, 1], c=y, cmap="coolwarm", edgecolors="k", s=20)
ax.set(title="the decision boundary after training", xlabel="x₁", ylabel="x₂")
learn.show(fig, "01-decision-boundary")

# %% [markdown]
# ## What to try next
#
# * Add `Value.sin` (its local derivative is `cos`) and check it against `jax.grad`.
# * Replace ReLU by tanh in the MLP and compare the boundaries.
# * Read `Value.backward` (ten lines) and explain why it zeroes the grads before accumulating.

# %%
learn.result(scalar_loss=scalar_loss.data, scalar_accuracy=scalar_acc, tensor_loss=tensor_loss, steps=STEPS)
