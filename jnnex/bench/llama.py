"""The Llama block: every new pair and the whole model, hand-written backward against ``jax.grad`` and ``jax.vjp``, at
batches of 8 … 512 sequences of makemore's sizes (T = 16, n_embd 64, 4 heads, 2 key/value heads, V = 27); and the
tiled attention against the plain one at T = 256 … 8,192 (batch × heads fixed): XLA's temporary memory of forward +
backward and the time, beside ``jax.nn.dot_product_attention`` differentiated by ``jax.vjp``.

Rows and accuracy as :mod:`jnnex.bench.backward`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.bench.backward import ACC_COLS, SPEED_COLS, measure, model_case, normal, pair_case
from jnnex.bench.harness import interleaved, table
from jnnex.models import flash as F
from jnnex.models import gpt as G
from jnnex.models import llama as L

T, C, NH, NKV, V = 16, 64, 4, 2, 27  # makemore's transformer's sizes, with grouped heads
HS = C // NH
H = L.hidden_width(C, 32)


def cases():
    kv = 2 * NKV * HS

    def norm(b, dt, s):
        return normal(s, (b, T, C), dt, 2.0), 1.0 + normal(s + 1, (C,), dt, 0.1)

    def heads(b, dt, s):
        return (normal(s, (b, NH, T, HS), dt),)

    def swiglu(b, dt, s):
        return (normal(s, (b, T, 2 * H), dt),)

    def kv_heads(b, dt, s):
        return (normal(s, (b, NKV, T, HS), dt),)

    def qkv_heads(b, dt, s):
        return tuple(normal(s + i, (b, NH, T, HS), dt) for i in range(3))

    def attention(b, dt, s):
        return normal(s, (b, T, C), dt), normal(s + 1, (C, C + kv), dt, 0.1), normal(s + 2, (C, C), dt, 0.1)

    return [
        pair_case(f"rmsnorm (B,{T},{C})", L.PAIRS["rmsnorm"], norm),
        pair_case(f"rope (B,{NH},{T},{HS})", L.PAIRS["rope"], heads),
        pair_case(f"swiglu (B,{T},{2 * H})", L.PAIRS["swiglu"], swiglu),
        pair_case(f"repeat kv (B,{NKV},{T},{HS}) x{NH // NKV}", L.PAIRS["repeat_kv"], kv_heads, n_rep=NH // NKV),
        pair_case(f"attend plain (B,{NH},{T},{HS})", G.PAIRS["attend"], qkv_heads),
        pair_case(f"attend tiled 8 (B,{NH},{T},{HS})", F.PAIRS["flash_attend"], qkv_heads, tile=8),
        pair_case(f"GQA attention layer (B,{T},{C}), {NH}/{NKV} heads", L.PAIRS["attention"], attention, n_head=NH,
                  n_kv_head=NKV),
        model_case("llama"),
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Tiled against plain attention as T grows


def attention_programs(tile: int):
    """``{name: fn(q, k, v, dy) -> (dq, dk, dv)}``: forward and backward of causal attention, four ways."""

    def plain(q, k, v, dy):
        return G.attend_backward(dy, G.attend_forward(q, k, v)[1])

    def tiled(q, k, v, dy):
        return F.flash_attend_backward(dy, F.flash_attend_forward(q, k, v, tile)[1])[:3]

    def grad_plain(q, k, v, dy):
        return jax.vjp(lambda q, k, v: G.attend_forward(q, k, v)[0], q, k, v)[1](dy)

    def xla(q, k, v, dy):  # (B, T, nh, hs) is jax.nn's layout
        f = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
            *(a.transpose(0, 2, 1, 3) for a in (q, k, v)), is_causal=True, implementation="xla").reshape(dy.shape)
        return jax.vjp(f, q, k, v)[1](dy)

    return {"plain (by hand)": plain, f"tiled {tile} (by hand)": tiled, "jax.vjp of plain": grad_plain,
            "jax.nn.dot_product_attention": xla}


def attention_memory(lengths, B: int, nh: int, hs: int, tile: int, repeats: int) -> list[dict]:
    """One row per (T, contender): XLA's temporary bytes for forward + backward, and the median time."""
    rows = []
    for T_ in lengths:
        q, k, v = (normal(i, (B, nh, T_, hs), jnp.float32) for i in range(3))
        dy = normal(3, (B, T_, nh * hs), jnp.float32)
        compiled, calls = {}, {}
        for name, fn in attention_programs(tile).items():
            compiled[name] = jax.jit(fn).lower(q, k, v, dy).compile()
            calls[name] = lambda c=compiled[name]: jax.block_until_ready(c(q, k, v, dy))
            calls[name]()  # warm-up
        want = np.asarray(compiled["plain (by hand)"](q, k, v, dy)[0])
        timings = interleaved(calls, repeats)
        for name, c in compiled.items():
            got = np.asarray(c(q, k, v, dy)[0])
            rows.append({"T": T_, "attention": name, "temp_MiB": c.memory_analysis().temp_size_in_bytes / 2**20,
                         "ms": 1e3 * timings[name]["median"], "spread": timings[name]["spread"],
                         "dq_rel_diff": float(np.abs(got - want).max() / np.abs(want).max())})
    return rows


MEM_COLS = ["T", "attention", "temp_MiB", "ms", "spread", "dq_rel_diff"]


def run(quick: bool = False) -> dict:
    batches = (8,) if quick else (8, 32, 64, 128, 512)
    repeats = 2 if quick else 7
    accuracy_batch = batches[0] if quick else 32
    case_list = [cases()[5]] if quick else cases()  # --quick: the tiled pair alone (the code paths, cheaply)
    rows, acc_rows = measure(case_list, batches, repeats, accuracy_batch)
    mem = dict(B=1, nh=4, hs=64, tile=16 if quick else 128)
    lengths = (64, 128) if quick else (256, 512, 1024, 2048, 4096, 8192)
    mem_rows = attention_memory(lengths, **mem, repeats=1 if quick else 3)
    text = (table(rows, SPEED_COLS) + f"\n\nAccuracy (batch {accuracy_batch}): manual vs jax.grad\n\n"
            + table(acc_rows, ACC_COLS) + f"\n\nCausal attention, forward + backward, float32, batch {mem['B']} x "
            f"{mem['nh']} heads of {mem['hs']}: XLA temporary memory and time as T grows\n\n"
            + table(mem_rows, MEM_COLS))
    return {"name": "llama", "rows": rows, "accuracy": acc_rows, "attention": mem_rows,
            "device": str(jax.devices()[0]), "table": text,
            "settings": {"batches": list(batches), "repeats": repeats, "accuracy_batch": accuracy_batch,
                         "sizes": {"T": T, "n_embd": C, "n_head": NH, "n_kv_head": NKV, "V": V},
                         "attention": {**mem, "lengths": list(lengths)}}}


def plot(result: dict, path):
    """XLA temporary memory and time of causal attention (forward + backward) against T, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(dict.fromkeys(r["attention"] for r in result["attention"]))
    for name in names:
        pts = [(r["T"], r["temp_MiB"], r["ms"]) for r in result["attention"] if r["attention"] == name]
        Ts, mem, ms = zip(*pts)
        ax_mem.plot(Ts, mem, marker="o", label=name)
        ax_time.plot(Ts, ms, marker="o", label=name)
    ax_mem.set(xscale="log", yscale="log", xlabel="T", ylabel="XLA temporary MiB", title="memory, forward + backward")
    ax_time.set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title="time, forward + backward")
    ax_mem.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
