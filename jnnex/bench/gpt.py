"""The GPT: every layer pair and the whole model, hand-written backward against ``jax.grad`` and ``jax.vjp``, at
batches of 8 … 512 sequences of makemore's sizes (T = 16, n_embd 64, 4 heads, V = 27); and the training step (AdamW,
makemore's settings) against the same transformer in PyTorch eager, timed in the same rounds, as a fraction of the
machine's float32 matmul rate measured beside it.

Rows and accuracy as :mod:`jnnex.bench.backward` (time per gradient, XLA temp memory, buffers, compile time;
manual vs ``jax.grad`` in float64 and float32).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jnnex import layers
from jnnex.models import gpt as G
from jnnex.bench.backward import ACC_COLS, SPEED_COLS, ints, measure, model_case, normal, pair_case
from jnnex.bench.harness import interleaved, table
from jnnex.bench.training import matmul_peak, peak_contender
from jnnex.data import Vocab, load_words, make_splits
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.optim import make_optimizer
from jnnex.train import init_train_state, make_run, make_step

T, C, NH, V = 16, 64, 4, 27  # makemore's transformer on names.txt


def cases():
    def emb(b, dt, s):
        return normal(s, (V, C), dt, 0.02), normal(s + 1, (T, C), dt, 0.02), ints(s + 2, (b, T), V)

    def ln(b, dt, s):
        return normal(s, (b, T, C), dt), 1.0 + normal(s + 1, (C,), dt, 0.1), normal(s + 2, (C,), dt, 0.1)

    def qkv(b, dt, s):
        return normal(s, (b, T, C), dt), normal(s + 1, (C, 3 * C), dt, 0.02), normal(s + 2, (3 * C,), dt, 0.02)

    def att(b, dt, s):
        return (normal(s, (b, T, 3 * C), dt),)

    def self_att(b, dt, s):
        return (normal(s, (b, T, C), dt), normal(s + 1, (C, 3 * C), dt, 0.1), normal(s + 2, (3 * C,), dt, 0.02),
                normal(s + 3, (C, C), dt, 0.1), normal(s + 4, (C,), dt, 0.02))

    def gelu(b, dt, s):
        return (normal(s, (b, T, 4 * C), dt),)

    def fcproj(b, dt, s):
        return normal(s, (b, T, 4 * C), dt), normal(s + 1, (4 * C, C), dt, 0.02), normal(s + 2, (C,), dt, 0.02)

    def ce(b, dt, s):
        y = np.array(ints(s + 1, (b, T), V))  # a writable copy
        y[:, T // 2:] = -1  # a padded tail, ignored
        return normal(s, (b, T, V), dt, 2.0), jnp.asarray(y)

    return [
        pair_case(f"token+position embedding (B,{T})->{C}", G.PAIRS["token_position_embedding"], emb),
        pair_case(f"layernorm (B,{T},{C})", G.PAIRS["layernorm"], ln),
        pair_case(f"linear qkv (B,{T},{C})->{3 * C}", layers.PAIRS["linear"], qkv),
        pair_case(f"attention (B,{T},{3 * C}), {NH} heads", G.PAIRS["qkv_attention"], att, n_head=NH),
        pair_case(f"self-attention layer (B,{T},{C})", G.PAIRS["self_attention"], self_att, n_head=NH),
        pair_case(f"gelu (B,{T},{4 * C})", G.PAIRS["gelu"], gelu),
        pair_case(f"linear fcproj (B,{T},{4 * C})->{C}", layers.PAIRS["linear"], fcproj),
        pair_case(f"cross-entropy (B,{T},{V}), half ignored", layers.PAIRS["cross_entropy"], ce),
        model_case("gpt"),
    ]


def training_step(quick: bool) -> tuple[list[dict], str]:
    """µs per AdamW step (makemore's settings, names of census-first) for ``jax.grad``, the hand-written backward and
    PyTorch eager (when installed), with the matmul rate measured in the same rounds. ``quick``: a 1-layer GPT of
    width 16, to exercise the code."""
    words = load_words("census-first")
    vocab = Vocab.from_words(words)
    spec = REGISTRY["gpt"]
    model = build_for_words(spec, words, vocab, **({"n_layer": 1, "n_embd": 16, "n_head": 2} if quick else {}))
    X, Y = (jnp.asarray(a) for a in make_splits(words, model.block_size, vocab=vocab, per_position=True).train)
    peak = matmul_peak(quick)
    peak_call, peak_flops = peak_contender(max((k for k in peak["gflops"] if k.startswith("jax")),
                                               key=peak["gflops"].get))
    try:
        import torch

        from jnnex.bench.torch_peer import make_torch_gpt_step
        torch_info = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        make_torch_gpt_step, torch_info = None, "torch: not installed (peer skipped)"
    rows = []
    for batch in (32,) if quick else (32, 128):
        n_steps = 5 if quick else 50
        contenders, flops, first = {}, {}, {}
        for name, g in (("jax.grad", "autodiff"), ("manual", "manual")):
            m = model.with_gradients(g)
            opt = make_optimizer(spec.train)
            step = make_step(m, opt)
            ts = init_train_state(m, opt, jax.random.key(0))
            flops[name] = float(jax.jit(step).lower(ts, (X[:batch], Y[:batch]), jax.random.key(0)).compile()
                                .cost_analysis()["flops"])
            run_fn = make_run(step, batch)
            t0 = time.perf_counter()
            jax.block_until_ready(run_fn(ts, X, Y, jax.random.key(1), n_steps=n_steps))
            first[name] = time.perf_counter() - t0
            contenders[name] = lambda run_fn=run_fn, ts=ts: jax.block_until_ready(
                run_fn(ts, X, Y, jax.random.key(1), n_steps=n_steps))
        if make_torch_gpt_step is not None:
            torch_steps = make_torch_gpt_step(model, np.asarray(X), np.asarray(Y), batch, spec.train)
            torch_steps(2)
            contenders["torch eager"] = lambda: torch_steps(n_steps)
        contenders["matmul peak"] = peak_call
        timings = interleaved(contenders, 1 if quick else 7)
        group_peak = peak_flops / timings.pop("matmul peak")["median"] / 1e9
        torch_us = 1e6 * timings["torch eager"]["median"] / n_steps if "torch eager" in timings else None
        for name, tm in timings.items():
            us = 1e6 * tm["median"] / n_steps
            f = flops.get(name, flops["jax.grad"])
            rows.append({"batch": batch, "step": name, "us_per_step": us, "spread": tm["spread"],
                         "gflops": f / us / 1e3, "of_peak": f / us / 1e3 / group_peak, "peak_gflops": group_peak,
                         "torch_over_this": torch_us / us if torch_us else None, "first_call_s": first.get(name)})
    return rows, torch_info


def run(quick: bool = False) -> dict:
    batches = (8,) if quick else (8, 32, 64, 128, 512)
    repeats = 2 if quick else 7
    accuracy_batch = batches[0] if quick else 32
    case_list = cases()[3:4] if quick else cases()  # --quick: the attention pair alone (the code paths, cheaply)
    rows, acc_rows = measure(case_list, batches, repeats, accuracy_batch)
    step_rows, torch_info = training_step(quick)
    step_cols = ["batch", "step", "us_per_step", "spread", "gflops", "of_peak", "peak_gflops", "torch_over_this"]
    text = (table(rows, SPEED_COLS) + f"\n\nAccuracy (batch {accuracy_batch}): manual vs jax.grad\n\n"
            + table(acc_rows, ACC_COLS) + f"\n\nTraining step (AdamW, makemore's settings); {torch_info}\n\n"
            + table(step_rows, step_cols))
    return {"name": "gpt", "rows": rows, "accuracy": acc_rows, "steps": step_rows, "torch": torch_info,
            "device": str(jax.devices()[0]), "table": text,
            "settings": {"batches": list(batches), "repeats": repeats, "accuracy_batch": accuracy_batch,
                         "sizes": {"T": T, "n_embd": C, "n_head": NH, "V": V}}}
