"""A scalar reverse-mode autograd engine (after Karpathy's micrograd), fast enough to train a real MLP in pure Python.

Every operation creates a :class:`Value` holding its result, its inputs and the **local derivative** of the result
with respect to each input — computed right beside the forward, where the math is. ``backward()`` then applies the
chain rule once, generically::

    for node in reversed(topological_order):
        for child, local in zip(node.inputs, node.local_grads):
            child.grad += local * node.grad

Two design choices differ from micrograd, for robustness and speed, not for the math:

* **No closures, no reference cycles.** micrograd attaches a ``_backward`` closure to each node that refers back to
  the node itself; every graph is then a heap of reference cycles that only Python's cyclic garbage collector can
  free, and on a 100-step moons run that collector takes most of the time. Here a node refers only to its inputs,
  so a graph is freed by reference counting the moment the loss goes out of scope. ``__slots__`` keeps nodes small.
* **No recursion.** The topological order is built with an explicit stack, so a chain of 100,000 operations
  back-propagates (micrograd's recursive ``build_topo`` raises ``RecursionError`` at a depth of about 1,000).

Constants (plain ``int``/``float`` operands) are folded into the local derivative instead of becoming nodes.

>>> a, b = Value(-4.0), Value(2.0)
>>> c = a * b + b ** 3
>>> c.backward()
>>> c.data, a.grad, b.grad
(0.0, 2.0, 8.0)
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
from collections.abc import Iterable
from operator import attrgetter

_EXP_MAX = math.log(1.7976931348623157e308)  # ≈ 709.78: exp above this overflows a float64
_creation_counter = itertools.count()  # stamps nodes in creation order: inputs always before their outputs
_by_creation = attrgetter("_n")


class Value:
    """A scalar node of a computation graph: ``data``, ``grad`` (d output / d this, after ``backward()``)."""

    __slots__ = ("data", "grad", "_prev", "_local", "_op", "_n")

    def __init__(self, data: float, _prev: tuple = (), _local: tuple = (), _op: str = ""):
        self.data = data if type(data) is float else float(data)
        self.grad = 0.0
        self._prev = _prev  # the input nodes
        self._local = _local  # d(self)/d(input) for each input, same order
        self._op = _op  # the operation that produced this node, for printing and to_dot
        self._n = next(_creation_counter)  # creation stamp: sorting by it is a topological order

    def __repr__(self) -> str:
        return f"Value(data={self.data:.6g}, grad={self.grad:.6g})"

    # -- arithmetic (each op: result, inputs, local derivatives) -----------------------------------------------------

    def __add__(self, other) -> Value:
        if isinstance(other, Value):
            return Value(self.data + other.data, (self, other), (1.0, 1.0), "+")  # d(a+b)/da = 1, /db = 1
        return Value(self.data + other, (self,), (1.0,), "+")

    def __mul__(self, other) -> Value:
        if isinstance(other, Value):
            return Value(self.data * other.data, (self, other), (other.data, self.data), "*")  # d(ab)/da = b, /db = a
        return Value(self.data * other, (self,), (float(other),), "*")

    def __pow__(self, other) -> Value:
        a = self.data
        if isinstance(other, Value):
            b = other.data
            if a <= 0:
                raise ValueError(f"a ** b with a Value exponent needs a base > 0 (d/db = a**b·ln a), got base {a}")
            try:
                out = a**b
                local = (b * a ** (b - 1), out * math.log(a))  # d/da = b·a^(b-1), d/db = a^b·ln a
            except OverflowError:
                raise ValueError(f"({a}) ** ({b}) overflows a float") from None
            return Value(out, (self, other), local, "**")
        if not isinstance(other, int | float):
            return NotImplemented
        if a == 0 and other != 0 and other < 1:
            raise ValueError(f"0 ** {other}: the derivative k·a^(k-1) is infinite at a = 0")
        if a < 0 and not float(other).is_integer():
            raise ValueError(f"({a}) ** {other}: a negative base needs an integer exponent")
        try:
            out, local = a**other, (other * a ** (other - 1) if other != 0 else 0.0)  # d(a^k)/da = k·a^(k-1)
        except OverflowError:
            raise ValueError(f"({a}) ** {other} overflows a float") from None
        return Value(out, (self,), (local,), f"**{other:g}")

    def __rpow__(self, other) -> Value:
        if not isinstance(other, int | float):
            return NotImplemented
        return Value(other) ** self

    def __truediv__(self, other) -> Value:
        if isinstance(other, Value):
            if other.data == 0:
                raise ValueError("division by a Value equal to 0")
            inv = 1.0 / other.data
            return Value(self.data * inv, (self, other), (inv, -self.data * inv * inv), "/")  # 1/b, -a/b²
        if other == 0:
            raise ValueError("division by 0")
        return self * (1.0 / other)

    def __rtruediv__(self, other) -> Value:  # other / self
        if self.data == 0:
            raise ValueError("division by a Value equal to 0")
        inv = 1.0 / self.data
        return Value(other * inv, (self,), (-other * inv * inv,), "/")  # d(c/a)/da = -c/a²

    def __neg__(self) -> Value:
        return Value(-self.data, (self,), (-1.0,), "neg")

    def __sub__(self, other) -> Value:
        if isinstance(other, Value):
            return Value(self.data - other.data, (self, other), (1.0, -1.0), "-")
        return Value(self.data - other, (self,), (1.0,), "-")

    def __rsub__(self, other) -> Value:  # other - self
        return Value(other - self.data, (self,), (-1.0,), "-")

    __radd__ = __add__
    __rmul__ = __mul__

    @staticmethod
    def sum(values: Iterable[Value | float]) -> Value:
        """``Σ values`` as one node (d Σ / d vᵢ = 1 for each), instead of a chain of n - 1 binary additions.

        A repeated input appears once per use in the node's inputs, so its gradient accumulates per use.
        """
        nodes, constant, total = [], 0.0, 0.0
        for v in values:
            if isinstance(v, Value):
                nodes.append(v)
                total += v.data
            else:
                constant += v
        return Value(total + constant, tuple(nodes), (1.0,) * len(nodes), "sum")

    # -- functions --------------------------------------------------------------------------------------------------

    def exp(self) -> Value:
        if self.data > _EXP_MAX:
            raise ValueError(f"exp({self.data}) overflows a float (the largest finite exp argument is {_EXP_MAX:.2f})")
        out = math.exp(self.data)
        return Value(out, (self,), (out,), "exp")  # d e^a / da = e^a

    def log(self) -> Value:
        if self.data <= 0:
            raise ValueError(f"log({self.data}) is undefined: log needs a value > 0")
        return Value(math.log(self.data), (self,), (1.0 / self.data,), "log")  # 1/a

    def tanh(self) -> Value:
        t = math.tanh(self.data)  # math.tanh saturates to ±1 instead of overflowing like (e^2x - 1)/(e^2x + 1)
        return Value(t, (self,), (1.0 - t * t,), "tanh")  # 1 - tanh²

    def relu(self) -> Value:
        x = self.data
        return Value(x if x > 0 else 0.0, (self,), (1.0 if x > 0 else 0.0,), "relu")  # 0 at 0, as micrograd

    def sigmoid(self) -> Value:
        x = self.data
        if x >= 0:  # both branches avoid exp of a large positive number
            s = 1.0 / (1.0 + math.exp(-x))
        else:
            e = math.exp(x)
            s = e / (1.0 + e)
        return Value(s, (self,), (s * (1.0 - s),), "sigmoid")  # σ(1 - σ)

    # -- backpropagation --------------------------------------------------------------------------------------------

    def topological_order(self) -> list[Value]:
        """Every node this one depends on, each after all of its inputs.

        A node is always created after its inputs, so creation order is a topological order: collect the reachable
        nodes with a flat loop (no recursion, so any depth works) and sort them by their creation stamp.
        """
        nodes, seen = [self], {id(self)}
        for node in nodes:  # `nodes` grows while we walk it: a breadth-first sweep
            for child in node._prev:
                if id(child) not in seen:
                    seen.add(id(child))
                    nodes.append(child)
        nodes.sort(key=_by_creation)
        return nodes

    def backward(self) -> None:
        """Set ``node.grad = d self / d node`` for every node of the graph.

        Gradients are *set*, not accumulated across calls: every node of this graph is zeroed first, so calling
        ``backward()`` twice gives the same gradients twice (as ``jax.grad`` would). A node used several times in the
        graph does accumulate the contributions of each use — that is the multivariable chain rule. To combine
        several losses, add them into one ``Value`` and call ``backward()`` on that.
        """
        order = self.topological_order()
        for node in order:
            node.grad = 0.0
        self.grad = 1.0
        for node in reversed(order):
            g = node.grad
            for child, local in zip(node._prev, node._local):
                child.grad += local * g


@contextlib.contextmanager
def cyclic_gc_paused():
    """Pause Python's cyclic garbage collector for the block (it is restored after, even on error).

    Safe for jnnex graphs because a node refers only to its inputs: graphs never contain reference cycles, so
    reference counting alone frees each graph the moment it goes out of scope, and the cyclic collector has nothing
    to find. It is also expensive here: it is triggered by allocation counts, and every forward pass allocates tens of
    thousands of nodes that it would walk again and again (on the moons run it costs more than all the arithmetic).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def zero_grad(values: Iterable[Value]) -> None:
    """Set ``grad = 0`` on each value (e.g. a model's parameters)."""
    for v in values:
        v.grad = 0.0


def to_dot(root: Value, rankdir: str = "LR") -> str:
    """Graphviz DOT source of ``root``'s graph: one record per value (data | grad), one circle per operation.

    Render it with ``dot -Tsvg`` or any online Graphviz viewer; jnnex itself needs no graphviz install.
    """
    lines = ["digraph jnnex {", f"  rankdir={rankdir};", '  node [fontname="monospace"];']
    for node in root.topological_order():
        nid = f"n{id(node)}"
        lines.append(f'  {nid} [shape=record, label="{{ data {node.data:.4f} | grad {node.grad:.4f} }}"];')
        if node._op:
            lines.append(f'  {nid}_op [shape=circle, label="{node._op}"];')
            lines.append(f"  {nid}_op -> {nid};")
            for child in node._prev:
                lines.append(f"  n{id(child)} -> {nid}_op;")
    lines.append("}")
    return "\n".join(lines) + "\n"
