"""micrograd's scalar engine (:mod:`jnnex.micrograd.engine`): random graphs against jax.grad in float64, reuse and
accumulation, deep and wide graphs without recursion, safe operations, graphs freed without the cyclic collector."""

import gc
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jnnex.micrograd.engine import Value, to_dot, zero_grad

# Each op: (name, arity, engine implementation, jax implementation, domain check on the operands' values).
OPS = [
    ("add", 2, lambda a, b: a + b, lambda a, b: a + b, lambda a, b: True),
    ("sub", 2, lambda a, b: a - b, lambda a, b: a - b, lambda a, b: True),
    ("mul", 2, lambda a, b: a * b, lambda a, b: a * b, lambda a, b: abs(a * b) < 1e3),
    ("div", 2, lambda a, b: a / b, lambda a, b: a / b, lambda a, b: abs(b) > 0.2 and abs(a / b) < 1e3),
    ("pow_value", 2, lambda a, b: a ** b, lambda a, b: a ** b, lambda a, b: 0.2 < a < 5 and abs(b) < 3),
    ("add_const", 1, lambda a: 1.5 + a, lambda a: 1.5 + a, lambda a: True),
    ("rsub_const", 1, lambda a: 2.0 - a, lambda a: 2.0 - a, lambda a: True),
    ("mul_const", 1, lambda a: a * -0.7, lambda a: a * -0.7, lambda a: True),
    ("rdiv_const", 1, lambda a: 1.3 / a, lambda a: 1.3 / a, lambda a: abs(a) > 0.2),
    ("pow_int", 1, lambda a: a ** 3, lambda a: a ** 3, lambda a: abs(a) < 8),
    ("pow_frac", 1, lambda a: a ** 0.5, lambda a: a ** 0.5, lambda a: a > 0.2),
    ("rpow", 1, lambda a: 2.0 ** a, lambda a: 2.0 ** a, lambda a: abs(a) < 8),
    ("neg", 1, lambda a: -a, lambda a: -a, lambda a: True),
    ("exp", 1, lambda a: a.exp(), jnp.exp, lambda a: a < 5),
    ("log", 1, lambda a: a.log(), jnp.log, lambda a: a > 0.2),
    ("tanh", 1, lambda a: a.tanh(), jnp.tanh, lambda a: True),
    ("relu", 1, lambda a: a.relu(), jax.nn.relu, lambda a: abs(a) > 1e-6),
    ("sigmoid", 1, lambda a: a.sigmoid(), jax.nn.sigmoid, lambda a: True),
    ("sum3", 3, lambda a, b, c: Value.sum([a, b, c, 0.25]), lambda a, b, c: a + b + c + 0.25, lambda a, b, c: True),
]


@st.composite
def expression_graphs(draw):
    """Inputs, then a drawn sequence of ops whose operands are drawn from all earlier nodes (fan-out by reuse)."""
    n_inputs = draw(st.integers(1, 4))
    inputs = [draw(st.floats(-2.0, 2.0).filter(lambda v: abs(v) > 0.1)) for _ in range(n_inputs)]
    values = [Value(v) for v in inputs]  # evaluated as we go, to keep every op inside its domain
    program = []
    for _ in range(draw(st.integers(1, 25))):
        name, arity, eng, _, ok = OPS[draw(st.integers(0, len(OPS) - 1))]
        args = [draw(st.integers(0, len(values) - 1)) for _ in range(arity)]
        if not ok(*(values[i].data for i in args)):
            continue
        values.append(eng(*(values[i] for i in args)))
        program.append((name, args))
    if not program:
        program.append(("add", [0, 0]))
    return inputs, program


def run_program(inputs, program, engine: bool):
    table = {name: (e if engine else j) for name, _, e, j, _ in OPS}
    nodes = list(inputs)
    for name, args in program:
        nodes.append(table[name](*(nodes[i] for i in args)))
    # The output mixes every node in, so every intermediate matters to the gradient.
    out = nodes[-1]
    for k, n in enumerate(nodes[:-1]):
        out = out + n * (0.1 * (k + 1))
    return out


@given(expression_graphs())
def test_random_graphs_match_jax_grad_float64(graph):
    inputs, program = graph
    xs = [Value(v) for v in inputs]
    out = run_program(xs, program, engine=True)
    out.backward()

    def f(arr):
        return run_program([arr[i] for i in range(len(inputs))], program, engine=False)

    arr = jnp.asarray(inputs, jnp.float64)
    value, grads = jax.value_and_grad(f)(arr)
    assert out.data == pytest.approx(float(value), rel=1e-9, abs=1e-12)
    np.testing.assert_allclose([x.grad for x in xs], grads, rtol=1e-9, atol=1e-9 * max(1.0, float(jnp.abs(grads).max())))


def test_reused_node_accumulates():
    a = Value(3.0)
    b = a + a  # db/da = 2
    c = b * b  # dc/db = 2b = 12
    c.backward()
    assert (c.data, b.grad, a.grad) == (36.0, 12.0, 24.0)
    d = Value(-2.0)
    e = d * d * d  # 3d² = 12
    e.backward()
    assert d.grad == 12.0


def test_backward_twice_gives_the_same_gradients():
    a, b = Value(1.5), Value(-0.5)
    out = (a * b + a.tanh()) * a
    out.backward()
    first = (a.grad, b.grad)
    out.backward()
    assert (a.grad, b.grad) == first
    zero_grad([a, b])
    assert (a.grad, b.grad) == (0.0, 0.0)


def test_micrograd_readme_expression():
    a = Value(-4.0)
    b = Value(2.0)
    c = a + b
    d = a * b + b ** 3
    c += c + 1
    c += 1 + c + (-a)
    d += d * 2 + (b + a).relu()
    d += 3 * d + (b - a).relu()
    e = c - d
    f = e ** 2
    g = f / 2.0
    g += 10.0 / f
    g.backward()
    assert f"{g.data:.4f}" == "24.7041"
    assert f"{a.grad:.4f}" == "138.8338"
    assert f"{b.grad:.4f}" == "645.5773"


@pytest.mark.slow
def test_deep_chain_of_100k_nodes():
    x = Value(0.5)
    y = x
    for _ in range(100_000):
        y = y * 1.0 + 0.0  # two nodes per iteration: 200,000 deep
    y.backward()
    assert y.data == 0.5 and x.grad == 1.0


@pytest.mark.slow
def test_wide_graph_of_100k_nodes():
    xs = [Value(float(i % 7)) for i in range(100_000)]
    out = Value.sum(x * x for x in xs)
    out.backward()
    assert all(x.grad == 2 * x.data for x in xs[:50])
    # The same width as a chain of binary additions.
    acc = xs[0]
    for x in xs[1:]:
        acc = acc + x
    acc.backward()
    assert xs[-1].grad == 1.0 and acc.data == sum(float(i % 7) for i in range(100_000))


def test_numerically_safe_operations():
    assert Value(1000.0).tanh().data == 1.0 and Value(-1000.0).tanh().data == -1.0
    t = Value(1000.0)
    t.tanh().backward()
    assert t.grad == 0.0
    s = Value(-1000.0).sigmoid()
    assert s.data == 0.0 and math.isfinite(s.data)
    assert Value(1000.0).sigmoid().data == 1.0
    with pytest.raises(ValueError, match="overflows"):
        Value(1000.0).exp()
    with pytest.raises(ValueError, match="log needs a value > 0"):
        Value(0.0).log()
    with pytest.raises(ValueError, match="division by"):
        Value(1.0) / Value(0.0)
    with pytest.raises(ValueError, match="base > 0"):
        Value(-1.0) ** Value(2.0)
    with pytest.raises(ValueError, match="overflows"):
        Value(10.0) ** 400.0
    with pytest.raises(ValueError, match="infinite"):
        Value(0.0) ** 0.5


def test_graphs_are_freed_without_the_cyclic_collector():
    """No reference cycles: dropping the output frees every node by reference counting alone."""
    def live_values():
        return sum(isinstance(o, Value) for o in gc.get_objects())

    gc.collect()
    before = live_values()
    gc.disable()
    try:
        xs = [Value(float(i)) for i in range(10)]
        out = Value.sum((x * x).tanh() for x in xs) * 2.0
        out.backward()
        del out
        assert live_values() == before + 10  # only the inputs we still hold
    finally:
        gc.enable()


def test_to_dot():
    a, b = Value(2.0), Value(3.0)
    c = (a * b).tanh()
    c.backward()
    dot = to_dot(c)
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert dot.count("shape=record") == 4 and 'label="tanh"' in dot and 'label="*"' in dot
    assert "data 6.0000" in dot and f"grad {1 - math.tanh(6) ** 2:.4f}" in dot
