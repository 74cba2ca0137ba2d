"""Hand-derived gradients against autodiff, per layer and per model: time per gradient across batch sizes, compile
time, XLA's memory accounting, and accuracy.

Every case gives three jitted functions of the same inputs that return the same gradients:

* ``manual`` — the hand-written backward (the layer's ``*_backward``, or the model's ``value_and_grad_manual``),
* ``jax.grad`` — autodiff of the scalar objective (for a layer: ``Σ out · dout`` with a random ``dout``),
* ``jax.vjp`` — autodiff's pullback applied to the same ``dout``.

Each includes the forward pass (a backward needs its forward's cache). Models join from :data:`jnnex.models.REGISTRY`:
every registered model with a hand-written backward is benchmarked at its default configuration (vocabulary 27).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.bench.harness import interleaved, table
from jnnex import layers
from jnnex.check import merge_args
from jnnex.micrograd import tensor_mlp
from jnnex.models import wavenet as wn
from jnnex.models.registry import REGISTRY, has_manual_backward

V, T, N_EMBD = 27, 3, 10  # the lecture's sizes: vocabulary, context, embedding per character
WIDTHS = (200, 1000)  # hidden widths H of the layer cases: the lecture's, and a wide layer
CONTENDERS = ("manual", "jax.grad", "jax.vjp")
# --quick exercises the code paths — a layer of float inputs, one with integer inputs, one of three dimensions, a
# model — each once; every other case would add compile time only
QUICK = ("linear 30->200", "embedding (27x10, T=3)", "causal-conv d=1 (B,23,24)->128", "mlp")
OWN_SUITE = ("gpt", "llama")  # benchmarked by their own suites (jnnex.bench.gpt, .llama), at batches of sequences


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "layer" or "model"
    make: Callable  # (batch, dtype, seed) -> (args tuple, {contender: fn(*args) -> grads})


def normal(seed, shape, dtype, scale=1.0):
    """numpy's generator (no XLA compilation per shape), drawn in float32 and cast, so the float32 and float64 runs of
    a case see the same numbers."""
    return jnp.asarray((scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32), dtype)


def ints(seed, shape, high):
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


def pair_case(name, pair, make_args, **settings):
    """A declared pair (:class:`jnnex.layers.Pair`, from its module's ``PAIRS``) as a layer case: its forward and
    backward, the gradients of the arguments it differentiates among those ``make_args`` gives; ``settings`` (a head
    count, a tile, a dilation) bound by name."""
    args = [a for a in pair.args if a not in settings]

    def diff(n_inputs):
        return tuple(i for i, a in enumerate(args[:n_inputs]) if a not in pair.fixed)

    return layer_case(name, lambda *a: pair.forward(*a, **settings), pair.backward, make_args, diff)


def layer_case(name, forward, backward, make_args, diff_argnums):
    """A layer: ``forward(*inputs) -> (out, cache)``; gradients of ``Σ out · dout`` w.r.t. ``diff_argnums`` (or
    ``diff_argnums(len(inputs))``)."""

    def make(batch, dtype, seed):
        inputs = make_args(batch, dtype, seed)
        diff_argnums_ = diff_argnums(len(inputs)) if callable(diff_argnums) else diff_argnums
        out = jax.eval_shape(lambda *a: forward(*a)[0], *inputs)
        dout = normal(seed + 99, out.shape, dtype)

        def manual(dout, *inputs):
            grads = backward(dout, forward(*inputs)[1])
            grads = grads if isinstance(grads, tuple) else (grads,)
            return tuple(grads[i] for i in diff_argnums_)

        def pick(*inputs):  # the differentiable inputs as positional arguments, the rest fixed
            def f(*diff):
                return forward(*merge_args(inputs, diff_argnums_, diff))[0]
            return f, tuple(inputs[i] for i in diff_argnums_)

        def grad(dout, *inputs):
            f, diff = pick(*inputs)
            return jax.grad(lambda *d: jnp.sum(f(*d) * dout), argnums=tuple(range(len(diff))))(*diff)

        def vjp(dout, *inputs):
            f, diff = pick(*inputs)
            return jax.vjp(f, *diff)[1](dout)

        return (dout, *inputs), {"manual": manual, "jax.grad": grad, "jax.vjp": vjp}

    return Case(name, "layer", make)


def model_case(name):
    spec = REGISTRY[name]
    cfg = spec.config(vocab_size=V)
    auto = spec.build(cfg)

    init = jax.jit(auto.init)

    def make(batch, dtype, seed):
        params, state = jax.tree.map(lambda a: a.astype(dtype), init(jax.random.key(seed)))
        x = ints(seed + 1, (batch, auto.block_size), V)
        y = ints(seed + 2, (batch, auto.block_size) if auto.per_position else (batch,), V)

        def manual(params, state, x, y):
            return auto.value_and_grad_manual(params, state, x, y)[1]

        def grad(params, state, x, y):
            return jax.grad(lambda p: auto.objective(p, state, x, y)[0])(params)

        def vjp(params, state, x, y):
            loss, pullback = jax.vjp(lambda p: auto.objective(p, state, x, y)[0], params)
            return pullback(jnp.ones_like(loss))[0]

        return (params, state, x, y), {"manual": manual, "jax.grad": grad, "jax.vjp": vjp}

    return Case(name, "model", make)


def _moons_case():
    sizes = [2, 16, 16, 1]

    def make(batch, dtype, seed):
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), tensor_mlp.init(jax.random.key(seed), sizes))
        x, y = normal(seed + 1, (batch, 2), dtype), jnp.sign(normal(seed + 2, (batch,), dtype))

        def manual(params, x, y):
            return tensor_mlp.value_and_grad_manual(params, x, y)[2]

        def grad(params, x, y):
            return jax.grad(tensor_mlp.loss_fn)(params, x, y)

        def vjp(params, x, y):
            loss, pullback = jax.vjp(lambda p: tensor_mlp.loss_fn(p, x, y), params)
            return pullback(jnp.ones_like(loss))[0]

        return (params, x, y), {"manual": manual, "jax.grad": grad, "jax.vjp": vjp}

    return Case("moons-mlp 2-16-16-1", "model", make)


def _width_cases(H: int) -> list[Case]:
    """The layers whose cost grows with the hidden width H: linear (T·n_embd -> H), tanh and BatchNorm over H."""

    def linear_args(b, dt, seed):
        return normal(seed, (b, T * N_EMBD), dt), normal(seed + 1, (T * N_EMBD, H), dt, 0.2), \
            normal(seed + 2, (H,), dt)

    def bn_args(b, dt, seed):
        return normal(seed, (b, H), dt, 2.0), 1.0 + normal(seed + 1, (H,), dt, 0.1), normal(seed + 2, (H,), dt, 0.1)

    return [
        pair_case(f"linear {T * N_EMBD}->{H}", layers.PAIRS["linear"], linear_args),
        pair_case(f"tanh ({H})", layers.PAIRS["tanh"], lambda b, dt, seed: (normal(seed, (b, H), dt),)),
        pair_case(f"batchnorm ({H})", layers.PAIRS["batchnorm"], bn_args),
    ]


def cases(widths=WIDTHS) -> list[Case]:
    def emb_args(b, dt, seed):
        return normal(seed, (V, N_EMBD), dt), ints(seed + 1, (b, T), V)

    def ce_args(b, dt, seed):
        return normal(seed, (b, V), dt, 2.0), ints(seed + 1, (b,), V)

    return [
        *(case for H in widths for case in _width_cases(H)),
        pair_case(f"embedding ({V}x{N_EMBD}, T={T})", layers.PAIRS["embedding"], emb_args),
        pair_case(f"cross-entropy (V={V})", layers.PAIRS["cross_entropy"], ce_args),
        *_wavenet_cases(),
        _moons_case(),
        *(model_case(name) for name in REGISTRY if has_manual_backward(name) and name not in OWN_SUITE),
    ]


def _wavenet_cases(T: int = 8, C: int = 24, H: int = 128) -> list[Case]:
    """The WaveNet's own layers at the lecture's sizes: the tree's first pairing, its linear and BatchNorm over
    (B, T', C), and the convolutional form's first dilated convolution over a padded word (16 + 7 positions)."""
    L = 16 + T - 1

    def fc_args(b, dt, seed):
        return (normal(seed, (b, T, C), dt),)

    def linear3_args(b, dt, seed):
        return normal(seed, (b, T // 2, 2 * C), dt), normal(seed + 1, (2 * C, H), dt, (2 * C) ** -0.5)

    def bn3_args(b, dt, seed):
        return (normal(seed, (b, T // 2, H), dt, 2.0), 1.0 + normal(seed + 1, (H,), dt, 0.1),
                normal(seed + 2, (H,), dt, 0.1))

    def conv_args(b, dt, seed):
        return normal(seed, (b, L, C), dt), normal(seed + 1, (2 * C, H), dt, (2 * C) ** -0.5)

    return [
        pair_case(f"flatten-consecutive (B,{T},{C})", wn.PAIRS["flatten_consecutive"], fc_args, n=2),
        pair_case(f"linear (B,{T // 2},{2 * C})->{H}", layers.PAIRS["linear"], linear3_args),
        pair_case(f"batchnorm (B,{T // 2},{H})", layers.PAIRS["batchnorm"], bn3_args),
        pair_case(f"causal-conv d=1 (B,{L},{C})->{H}", wn.PAIRS["causal_conv"], conv_args, dilation=1),
    ]


def hlo_buffers(compiled) -> int:
    """Top-level instructions of the optimised entry computation that produce an array (fusions, dots, reductions,
    scatters, …): each is one materialised intermediate buffer. Parameters, constants, tuples and bitcasts excluded."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY"):]
    entry = entry[: entry.index("\n}")]
    skip = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")
    ops = re.findall(r"=\s*\S+\s+([a-z\-]+)\(", entry)
    return sum(op not in skip for op in ops)


def _compile(fn, args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()  # a dict, as the other suites read it (cost_analysis()["flops"])
    return compiled, {"compile_s": seconds, "temp_bytes": int(mem.temp_size_in_bytes),
                      "output_bytes": int(mem.output_size_in_bytes), "buffers": hlo_buffers(compiled),
                      "flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"])}


def _inner_repeats(fn, target_s: float = 0.01) -> int:
    """Calls per timing sample so that one sample lasts ~``target_s`` (timer and dispatch noise amortised)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    once = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(1000, int(target_s / once)))


def _max_diffs(a, b) -> tuple[float, float]:
    a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]) for t in (a, b))
    abs_diff = float(np.max(np.abs(a - b)))
    return abs_diff, abs_diff / float(np.max(np.abs(b)))


def measure(case_list, batches, repeats: int, accuracy_batch: int) -> tuple[list[dict], list[dict]]:
    """Time, compile and memory rows for every case at every batch size (contenders interleaved), and one accuracy
    row per case at ``accuracy_batch`` (which must be one of ``batches``)."""
    seed = 0
    rows, acc_rows = [], []
    for case in case_list:
        for batch in batches:
            args, fns = case.make(batch, jnp.float32, seed)
            compiled, info = {}, {}
            for name in CONTENDERS:
                compiled[name], info[name] = _compile(fns[name], args)
            if batch == accuracy_batch:  # the float32 side of the accuracy table, from these very programs
                f32 = {name: compiled[name](*args) for name in ("manual", "jax.grad")}
            calls = {name: (lambda c=compiled[name]: jax.block_until_ready(c(*args))) for name in CONTENDERS}
            inner = _inner_repeats(calls["jax.grad"])
            timed = {name: (lambda fn=fn: [fn() for _ in range(inner)]) for name, fn in calls.items()}
            for fn in timed.values():
                fn()  # warm-up: the first runs of a fresh executable allocate and spin up threads
            timings = interleaved(timed, repeats)
            base = timings["jax.grad"]["median"] / inner
            for name in CONTENDERS:
                t = timings[name]["median"] / inner
                rows.append({"case": case.name, "kind": case.kind, "batch": batch, "backward": name,
                             "us_per_grad": 1e6 * t, "spread": timings[name]["spread"], "vs_jax_grad": t / base,
                             **info[name]})
        acc_rows.append(_accuracy(case, accuracy_batch, seed, f32))
    return rows, acc_rows


# flops and bytes_accessed: XLA's own count for the compiled program (cost_analysis). For an elementwise pair the bytes
# set the time: equal bytes, the same time (rope, SwiGLU and the key/value repeat compile to autodiff's bytes).
SPEED_COLS = ["case", "batch", "backward", "us_per_grad", "spread", "vs_jax_grad", "compile_s", "temp_bytes", "buffers",
              "flops", "bytes_accessed"]
ACC_COLS = ["case", "f64 max abs", "f64 max rel", "f32 max abs", "f32 max rel", "f32 jax.grad vs f64"]


def run(quick: bool = False) -> dict:
    batches = (64,) if quick else (32, 256, 1024, 4096, 8192)
    repeats = 2 if quick else 9
    accuracy_batch = 64 if quick else 256
    case_list = [c for c in cases(WIDTHS[:1] if quick else WIDTHS) if not quick or c.name in QUICK]
    rows, acc_rows = measure(case_list, batches, repeats, accuracy_batch)
    text = table(rows, SPEED_COLS) + "\n\nAccuracy (batch %d): manual vs jax.grad\n\n" % accuracy_batch + \
        table(acc_rows, ACC_COLS)
    return {"name": "backward", "rows": rows, "accuracy": acc_rows, "table": text,
            "settings": {"batches": list(batches), "repeats": repeats, "accuracy_batch": accuracy_batch,
                         "sizes": {"V": V, "T": T, "n_embd": N_EMBD, "H": list(WIDTHS)}}}


def _accuracy(case: Case, batch: int, seed: int, f32: dict) -> dict:
    """Manual vs ``jax.grad`` in float64 and float32 (max abs, and relative to the largest gradient entry); and how far
    float32 autodiff itself is from float64, for scale. ``f32``: both float32 results, from the timed programs."""
    with jax.enable_x64(True):
        args, fns = case.make(batch, jnp.float64, seed)
        f64 = {name: jax.jit(fns[name])(*args) for name in ("manual", "jax.grad")}
    row = {"case": case.name, "batch": batch}
    for tag, results in (("f64", f64), ("f32", f32)):
        row[f"{tag} max abs"], row[f"{tag} max rel"] = _max_diffs(results["manual"], results["jax.grad"])
    row["f32 jax.grad vs f64"] = _max_diffs(f32["jax.grad"], f64["jax.grad"])[1]
    return row


def plot(result: dict, path):
    """Time per gradient against batch size, one panel per case: manual vs ``jax.grad`` vs ``jax.vjp`` (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["case"] for r in result["rows"]))
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for contender in CONTENDERS:
            pts = [(r["batch"], r["us_per_grad"]) for r in result["rows"]
                   if r["case"] == name and r["backward"] == contender]
            ax.plot(*zip(*pts), marker="o", label=contender)
        ax.set(xscale="log", yscale="log", title=name, xlabel="batch", ylabel="µs per gradient")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
