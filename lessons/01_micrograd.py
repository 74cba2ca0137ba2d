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
# **What you will learn**: what a derivative measures; how a scalar autograd engine (`Value`, written here in thirty
# lines and shown equal to jnnex's) records a computation and runs the chain rule backwards through it, one local
# derivative per operation; and how the same engine trains
# a small neural net to separate two moons — then the same net on whole tensors, with its backward by hand.
#
# Lecture: *The spelled-out intro to neural networks and backpropagation: building micrograd*
# (<https://www.youtube.com/watch?v=VMj-3S1tku0>). Code: `jnnex/micrograd/`.
#
# **Full size** (`python lessons/01_micrograd.py`, 2 cores, 11 s, measured): after micrograd's 100 steps the scalar
# engine's loss is 0.0190 at 100 % accuracy, and the tensor engine's the same 0.0190 from the same initial weights.
# `JNNEX_LESSON_SIZE=tiny` runs it in seconds (what the test suite does).

# %%
import jax
import jax.numpy as jnp
import numpy as np

from jnnex import learn
from jnnex.micrograd import tensor_mlp
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
# ## 2. `Value`, written here: every operation remembers its inputs and how to pass a gradient back
#
# This is the lecture's engine, about thirty lines. Each operation makes a new `Value` from its inputs, and sets a
# `_backward` that knows the operation's **local derivative**. For `out = a * b`, that is `a.grad += b · out.grad`
# and `b.grad += a · out.grad`. `backward()` orders the graph so that each node comes after its inputs, then calls
# every `_backward` from the output back. That is the chain rule, applied once per node. Gradients are *added*, so a
# value used twice receives both contributions.

# %%
import math  # noqa: E402


class Value:
    def __init__(self, data, _children=(), _op="", label=""):
        self.data, self.grad = data, 0.0
        self._backward = lambda: None  # how this node passes its gradient to its inputs
        self._prev, self._op, self.label = set(_children), _op, label

    def __add__(self, other):
        out = Value(self.data + other.data, (self, other), "+")

        def _backward():
            self.grad += 1.0 * out.grad  # d(a + b)/da = 1
            other.grad += 1.0 * out.grad

        out._backward = _backward
        return out

    def __mul__(self, other):
        out = Value(self.data * other.data, (self, other), "*")

        def _backward():
            self.grad += other.data * out.grad  # d(a·b)/da = b
            other.grad += self.data * out.grad

        out._backward = _backward
        return out

    def tanh(self):
        t = math.tanh(self.data)
        out = Value(t, (self,), "tanh")

        def _backward():
            self.grad += (1 - t**2) * out.grad  # d tanh(x)/dx = 1 − tanh²(x)

        out._backward = _backward
        return out

    def backward(self):
        topo, seen = [], set()

        def build(v):  # every node after the nodes it was made from
            if v not in seen:
                seen.add(v)
                for child in v._prev:
                    build(child)
                topo.append(v)

        build(self)
        self.grad = 1.0  # dL/dL
        for v in reversed(topo):
            v._backward()


# The lecture's neuron: two inputs, two weights, a bias, tanh.
x1, x2 = Value(2.0, label="x1"), Value(0.0, label="x2")
w1, w2 = Value(-3.0, label="w1"), Value(1.0, label="w2")
b = Value(6.8813735870195432, label="b")
x1w1 = x1 * w1
x1w1.label = "x1w1"
x2w2 = x2 * w2
x2w2.label = "x2w2"
s_ = x1w1 + x2w2
s_.label = "x1w1+x2w2"
n = s_ + b
n.label = "n"
o = n.tanh()
o.label = "o"
o.backward()
page = {v.label: (v.data, v.grad) for v in (x1, x2, w1, w2, b, n, o)}
for name, (data, grad) in page.items():
    print(f"{name:3}: data {data:8.4f}   do/d{name} = {grad:8.4f}")
learn.show(learn.draw_graph(o, "the lecture's neuron, o = tanh(x1·w1 + x2·w2 + b), after o.backward()"), "01-graph")

# %% [markdown]
# The same neuron on jnnex's engine (`jnnex.micrograd.engine.Value`, which is built without closures so that big
# graphs free themselves, and extends the operations to `exp`, `log`, `**` and ReLU). It gives the same data and
# gradients. Then JAX's autodiff on the same function gives the same gradients once more.

# %%
from jnnex.micrograd.engine import Value as JValue  # noqa: E402

jx1, jx2, jw1, jw2, jb = (JValue(v) for v in (2.0, 0.0, -3.0, 1.0, 6.8813735870195432))
jo = (jx1 * jw1 + jx2 * jw2 + jb).tanh()
jo.backward()
theirs = {"x1": jx1.grad, "x2": jx2.grad, "w1": jw1.grad, "w2": jw2.grad, "b": jb.grad}
engine_gap = max(abs(page[k][1] - theirs[k]) for k in theirs) + abs(page["o"][0] - jo.data)
grads = jax.grad(lambda x1, x2, w1, w2, b: jnp.tanh(x1 * w1 + x2 * w2 + b), argnums=range(5))(
    2.0, 0.0, -3.0, 1.0, 6.8813735870195432)
jax_gap = max(abs(float(g) - page[k][1]) for g, k in zip(grads, ("x1", "x2", "w1", "w2", "b")))
print(f"page vs jnnex engine: largest difference {engine_gap:.1e}; page vs jax.grad (float32): {jax_gap:.1e}")

# %% [markdown]
# A value used twice: `b = a + a` must give `db/da = 2`. Each use adds its share (this is why `_backward` uses
# `+=`).

# %%
a = Value(3.0, label="a")
twice = a + a
twice.backward()
print(f"b = a + a: db/da = {a.grad} (the lecture's bug, with = instead of +=, gives 1.0)")

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
learn.result(scalar_loss=scalar_loss.data, scalar_accuracy=scalar_acc, tensor_loss=tensor_loss, steps=STEPS,
             engine_gap=engine_gap, jax_gap=jax_gap, used_twice=a.grad, neuron_o=page["o"][0])
