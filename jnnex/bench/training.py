"""Training throughput against the machine's limit: steps/s and achieved GFLOP/s of the jitted, scanned training step
of every trainable language model (on ``jax.grad`` and, where it has one, on its hand-written backward) at batch 32,
256 and 4,096, next to the float32 matmul peak measured in the same run — and, only when PyTorch is installed, the same
networks trained in PyTorch eager on the CPU, timed in the same rounds.

FLOPs per step are XLA's own count for the compiled single step (``cost_analysis()["flops"]``), so GFLOP/s reads as
"useful arithmetic per second"; the fraction of the matmul peak says how close a step comes to what the cores can do.
The peak is XLA's fastest float32 ``jnp.dot`` (n = 1,024 or 2,048, found first), timed again inside every group's
rounds, next to the steps it divides; numpy's BLAS rate is measured once at the start, for reference.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.bench.harness import interleaved, table
from jnnex.data import Vocab, load_words, make_splits
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.optim import TrainConfig, make_optimizer
from jnnex.train import init_train_state, make_run, make_step

STEPS_PER_CALL = {32: 200, 256: 50, 4096: 5}  # one timing sample ≈ tens of milliseconds at every batch size


def matmul_peak(quick: bool = False) -> dict:
    """float32 matmul GFLOP/s: jitted ``jnp.dot`` (the sizes interleaved), then numpy's BLAS on its own.

    Not interleaved with each other on purpose: OpenBLAS's worker threads keep spinning for up to ~0.1 s after a call
    and steal a core from whatever runs next — measured here, XLA's matmul at n = 2,048 fell from ~170 to ~130 GFLOP/s
    when it ran right after numpy's.
    """
    sizes = (512,) if quick else (1024, 2048)
    rng = np.random.default_rng(0)
    gflops = {}
    for lib in ("jax", "numpy"):
        contenders = {}
        for n in sizes:
            a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
            if lib == "jax":
                dot, ja, jb = jax.jit(jnp.dot), jnp.asarray(a), jnp.asarray(b)
                dot(ja, jb).block_until_ready()
                contenders[f"jax n={n}"] = lambda dot=dot, ja=ja, jb=jb: dot(ja, jb).block_until_ready()
            else:
                contenders[f"numpy n={n}"] = lambda a=a, b=b: a @ b
        for name, t in interleaved(contenders, 3 if quick else 7).items():
            n = int(name.split("n=")[1])
            gflops[name] = 2.0 * n**3 / t["median"] / 1e9
    return {"gflops": gflops, "peak_gflops": max(gflops.values()),
            "xla_peak_gflops": max(v for k, v in gflops.items() if k.startswith("jax"))}


PEAK = "matmul peak"


def peak_contender(best: str):
    """XLA's fastest matmul of :func:`matmul_peak` as one more contender, so that every group of steps is divided by
    the rate measured in its own rounds (the load on this shared machine drifts between groups). XLA's own ``jnp.dot``
    and not numpy's: the steps and it share one thread pool, and no other library's threads spin between them."""
    n = int(best.split("n=")[1])
    a, b = (jnp.asarray(np.random.default_rng(i).standard_normal((n, n)).astype(np.float32)) for i in range(2))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return (lambda: dot(a, b).block_until_ready()), 2.0 * n**3


def _variants(model):
    yield "jax.grad", model
    if model.backward_fn is not None:
        yield "manual", model.with_gradients("manual")


def run(quick: bool = False) -> dict:
    batches = (32,) if quick else (32, 256, 4096)
    repeats = 1 if quick else 7
    words = load_words("census-first")
    peak = matmul_peak(quick)
    peak_call, peak_flops = peak_contender(max((k for k in peak["gflops"] if k.startswith("jax")),
                                                key=peak["gflops"].get))
    torch_peer = _torch()
    rows, skipped = [], {}
    for name, spec in REGISTRY.items():
        if spec.fit_fn is not None or spec.train.batch_size is None:
            continue  # counted, or full-batch by design
        if quick and name != "bn-mlp":
            continue
        vocab = Vocab.from_words(words)
        model = build_for_words(spec, words, vocab)
        splits = make_splits(words, model.block_size, vocab=vocab, per_position=model.per_position)
        X, Y = jnp.asarray(splits.train[0]), jnp.asarray(splits.train[1])
        for batch in batches:
            n_steps = 20 if quick else STEPS_PER_CALL[batch]
            contenders, flops, first_call = {}, {}, {}
            models = dict(_variants(model))
            for variant, model in models.items():
                opt = make_optimizer(TrainConfig())
                step = make_step(model, opt)
                run_fn = make_run(step, batch)
                ts = init_train_state(model, opt, jax.random.key(0))
                x, y = X[:batch], Y[:batch]
                compiled = jax.jit(step).lower(ts, (x, y), jax.random.key(0)).compile()
                flops[variant] = float(compiled.cost_analysis()["flops"])
                t0 = time.perf_counter()
                jax.block_until_ready(run_fn(ts, X, Y, jax.random.key(1), n_steps=n_steps))  # compile + warm
                first_call[variant] = time.perf_counter() - t0
                contenders[variant] = (lambda run_fn=run_fn, ts=ts:
                                       jax.block_until_ready(run_fn(ts, X, Y, jax.random.key(1), n_steps=n_steps)))
            if torch_peer is not None and name not in skipped:
                try:
                    torch_step = torch_peer(models["jax.grad"], np.asarray(X), np.asarray(Y), batch)
                except NotImplementedError as e:  # a model the peer does not know: skipped, with the reason
                    skipped[name] = str(e)
                else:
                    torch_step(1)
                    contenders["torch eager"] = lambda torch_step=torch_step: torch_step(n_steps)
            contenders[PEAK] = peak_call  # the limit, measured in the same rounds as the steps it divides
            timings = interleaved(contenders, repeats)
            group_peak = peak_flops / timings.pop(PEAK)["median"] / 1e9
            base = timings["jax.grad"]["median"] / n_steps
            for variant, t in timings.items():
                per_step = t["median"] / n_steps
                f = flops.get(variant, flops["jax.grad"])  # torch does the same arithmetic (its own count unknown)
                rows.append({"model": name, "batch": batch, "step": variant, "us_per_step": 1e6 * per_step,
                             "spread": t["spread"], "steps_per_s": 1.0 / per_step, "vs_jax_grad": per_step / base,
                             "mflop_per_step": f / 1e6, "gflops": f / per_step / 1e9, "peak_gflops": group_peak,
                             "of_peak": f / per_step / 1e9 / group_peak,
                             "first_call_s": first_call.get(variant)})  # compile + one call of n_steps
    for r in rows:  # PyTorch as a ratio: how many times faster jnnex's step is
        torch_row = next((t for t in rows if t["model"] == r["model"] and t["batch"] == r["batch"]
                          and t["step"] == "torch eager"), None)
        r["torch_over_this"] = torch_row["us_per_step"] / r["us_per_step"] if torch_row else None
    cols = ["model", "batch", "step", "us_per_step", "spread", "steps_per_s", "vs_jax_grad", "mflop_per_step",
            "gflops", "peak_gflops", "of_peak", "torch_over_this"]
    peak_text = ", ".join(f"{k}: {v:.1f}" for k, v in peak["gflops"].items())
    text = f"float32 matmul GFLOP/s at the start ({peak_text}); of_peak divides by XLA's jnp.dot timed in each " \
        "group's rounds (peak_gflops)\n" + \
        ("torch: " + _torch_version() if torch_peer else "torch: not installed (peer skipped)") + "\n" + \
        "".join(f"torch peer skipped for {k}: {v}\n" for k, v in skipped.items()) + "\n" + table(rows, cols)
    return {"name": "training", "rows": rows, "matmul": peak, "torch_skipped": skipped,
            "torch": _torch_version() if torch_peer else None,
            "table": text, "settings": {"batches": list(batches), "repeats": repeats,
                                         "steps_per_call": {b: (20 if quick else STEPS_PER_CALL[b]) for b in batches},
                                         "data": "census-first", "optimizer": "SGD, TrainConfig() defaults"}}


def _torch_version():
    import torch

    return f"{torch.__version__} ({torch.get_num_threads()} threads)"


def _torch():
    """A builder of PyTorch-eager training steps, or None when torch is not installed (it is never a dependency)."""
    try:
        import torch
    except ImportError:
        return None
    from jnnex.bench.torch_peer import make_torch_step

    del torch
    return make_torch_step
