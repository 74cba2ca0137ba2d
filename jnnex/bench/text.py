"""The text suite: the BPE tokenizer (train to 512 and encode tiny Shakespeare, beside Hugging Face ``tokenizers``
when installed; bytes per token for vocabularies 256 … 4,096), sampling with the KV cache against re-running the
whole context (1,000 tokens at block size 256), and the training step of nanoGPT's CPU recipe (tokens per second, on
the hand-written backward in float32 and in bfloat16 and on ``jax.grad``, beside the same step in PyTorch eager
when installed, and as a fraction of the matmul rate measured in the same rounds).

Tiny Shakespeare is read from ``$JNNEX_SHAKESPEARE_TXT`` or ``../shared/data/tinyshakespeare.txt`` beside the
repository; never copied, never downloaded.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jnnex import bpe, run as runs, text
from jnnex.bench.harness import interleaved, table
from jnnex.bench.training import matmul_peak, peak_contender
from jnnex.lm import continue_text
from jnnex.models.gpt import GPTConfig, gpt
from jnnex.optim import make_optimizer
from jnnex.train import init_train_state, make_run, make_step

VOCABS = (256, 512, 1024, 2048, 4096)


def shakespeare() -> Path:
    path = Path(os.environ.get("JNNEX_SHAKESPEARE_TXT",
                               Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"))
    if not path.is_file():
        raise ValueError(f"the text suite reads tiny Shakespeare from {path} (set JNNEX_SHAKESPEARE_TXT)")
    return path


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def tokenizer(body: str, quick: bool) -> tuple[list[dict], list[dict], str]:
    """Train to 512 and encode the text, jnnex and (when installed) ``tokenizers``; then bytes per token of the
    text for each vocabulary (one training to the largest: a smaller vocabulary is its first merges)."""
    rows = []
    tok, t_train = _timed(lambda: bpe.train(body, 512))
    fresh = bpe.Tokenizer(tok.merges, tok.pattern)  # encoding without the pieces cached by earlier calls
    ids, t_encode = _timed(lambda: fresh.encode(body))
    rows.append({"tokenizer": "jnnex.bpe (GPT-4 split, Python)", "train_512_s": t_train, "encode_s": t_encode,
                 "bytes_per_token": len(body.encode()) / len(ids)})
    try:
        import tokenizers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, bytes as characters
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        _, t_train = _timed(lambda: hf.train_from_iterator([body], trainer))
        enc, t_encode = _timed(lambda: hf.encode(body))
        rows.append({"tokenizer": f"tokenizers {tokenizers.__version__} (GPT-2 split, Rust)", "train_512_s": t_train,
                     "encode_s": t_encode, "bytes_per_token": len(body.encode()) / len(enc.ids)})
        peer = f"tokenizers {tokenizers.__version__}"
    except ImportError:
        peer = "tokenizers: not installed (peer skipped)"
    largest = VOCABS[2] if quick else VOCABS[-1]
    full = bpe.train(body, largest)
    compression = []
    for V in (v for v in VOCABS if v <= largest):
        part = bpe.Tokenizer(full.merges[: V - 256], full.pattern)
        n = len(part.encode(body))
        compression.append({"vocab_size": V, "tokens": n, "bytes_per_token": len(body.encode()) / n})
    return rows, compression, peer


def kv_cache(quick: bool) -> list[dict]:
    """Tokens per second generating ``n`` tokens from a newline at block size 256, the CPU recipe's GPT (random
    weights: the speed does not depend on them), with the cache and re-running the whole context."""
    n_new = 40 if quick else 1000
    cfg = GPTConfig(vocab_size=65, block_size=32 if quick else 256, n_layer=1 if quick else 4, n_head=4,
                    n_embd=32 if quick else 128, bias=False, tie=True)
    model = gpt(cfg)
    params, state = model.init(jax.random.key(0))
    contenders = {}
    for name, cache in (("KV cache", True), ("whole context", False)):
        call = (lambda cache=cache: continue_text(model, params, state, [0], n_new, jax.random.key(1), cache=cache))
        call()  # compile
        contenders[name] = call
    timings = interleaved(contenders, 1 if quick else 3)
    base = timings["whole context"]["median"]
    return [{"sampler": name, "tokens": n_new, "seconds": t["median"], "tokens_per_s": n_new / t["median"],
             "speedup": base / t["median"], "spread": t["spread"]} for name, t in timings.items()]


def training_step(path: Path, quick: bool) -> tuple[list[dict], str]:
    """The CPU recipe's training step (``--preset shakespeare-cpu``: batch 12 of 64 tokens), µs and tokens/s."""
    settings = {"n_layer": 1, "n_embd": 32, "n_head": 2} if quick else {}
    rc = runs.RunConfig.new("gpt", str(path), preset="shakespeare-cpu", **settings)
    model, splits = runs.prepare(rc)
    tcfg = rc.train
    tokens = jnp.asarray(np.asarray(splits.train.tokens))
    empty = jnp.zeros((0,), jnp.int32)
    B, T = tcfg.batch_size, model.block_size
    peak = matmul_peak(quick)
    peak_call, peak_flops = peak_contender(max((k for k in peak["gflops"] if k.startswith("jax")),
                                               key=peak["gflops"].get))
    n_steps = 5 if quick else 50
    contenders, flops = {}, {}
    bf16 = gpt(dataclasses.replace(rc.model_config, precision="bfloat16"))  # the same model, computing in bfloat16
    for name, g, mdl in (("jax.grad", "autodiff", model), ("manual", "manual", model),
                         ("manual, bfloat16", "manual", bf16)):
        m = mdl.with_gradients(g)
        opt = make_optimizer(tcfg)
        step = make_step(m, opt)
        ts = init_train_state(m, opt, jax.random.key(0))
        x = jnp.zeros((B, T), jnp.int32)
        flops[name] = float(jax.jit(step).lower(ts, (x, x), jax.random.key(0)).compile().cost_analysis()["flops"])
        run_fn = make_run(step, B, window=T)
        jax.block_until_ready(run_fn(ts, tokens, empty, jax.random.key(1), n_steps=n_steps))
        contenders[name] = lambda run_fn=run_fn, ts=ts: jax.block_until_ready(
            run_fn(ts, tokens, empty, jax.random.key(1), n_steps=n_steps))
    try:
        import torch

        from jnnex.bench.torch_peer import make_torch_nanogpt_step
        torch_steps = make_torch_nanogpt_step(model, np.asarray(splits.train.tokens), B, tcfg)
        torch_steps(2)
        contenders["torch eager"] = lambda: torch_steps(n_steps)
        torch_info = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        torch_info = "torch: not installed (peer skipped)"
    contenders["matmul peak"] = peak_call
    timings = interleaved(contenders, 1 if quick else 7)
    group_peak = peak_flops / timings.pop("matmul peak")["median"] / 1e9
    torch_us = 1e6 * timings["torch eager"]["median"] / n_steps if "torch eager" in timings else None
    rows = []
    for name, tm in timings.items():
        us = 1e6 * tm["median"] / n_steps
        f = flops.get(name, flops["manual"])
        rows.append({"step": name, "us_per_step": us, "tokens_per_s": B * T / us * 1e6, "spread": tm["spread"],
                     "gflops": f / us / 1e3, "of_xla_peak": f / us / 1e3 / group_peak, "xla_peak_gflops": group_peak,
                     "numpy_peak_gflops": max(v for k, v in peak["gflops"].items() if k.startswith("numpy")),
                     "torch_over_this": torch_us / us if torch_us else None})
    return rows, torch_info


def run(quick: bool = False) -> dict:
    path = shakespeare()
    body = text.read_text(path)
    if quick:
        body = body[:20_000]
    tok_rows, compression, peer = tokenizer(body, quick)
    kv_rows = kv_cache(quick)
    step_rows, torch_info = training_step(path, quick)
    out = (f"Tokenizer, {len(body):,} characters; {peer}\n\n"
           + table(tok_rows, ["tokenizer", "train_512_s", "encode_s", "bytes_per_token"])
           + "\n\nCompression (GPT-4 split, trained to each vocabulary)\n\n"
           + table(compression, ["vocab_size", "tokens", "bytes_per_token"])
           + "\n\nSampling 1,000 tokens at block size 256 (nanoGPT CPU recipe's GPT)\n\n"
           + table(kv_rows, ["sampler", "tokens", "seconds", "tokens_per_s", "speedup", "spread"])
           + f"\n\nTraining step, nanoGPT's CPU recipe (batch 12 x 64 tokens); {torch_info}\n\n"
           + table(step_rows, ["step", "us_per_step", "tokens_per_s", "spread", "gflops", "of_xla_peak",
                               "xla_peak_gflops", "numpy_peak_gflops", "torch_over_this"]))
    return {"name": "text", "rows": step_rows, "tokenizer": tok_rows, "compression": compression, "tokenizer_peer": peer,
            "kv_cache": kv_rows, "steps": step_rows, "torch": torch_info, "device": str(jax.devices()[0]),
            "table": out}


def plot(result: dict, path: Path) -> Path:
    """Bytes per token against the vocabulary size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = result["compression"]
    ax.plot([r["vocab_size"] for r in rows], [r["bytes_per_token"] for r in rows], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("bytes per token")
    ax.set_title("BPE on tiny Shakespeare (GPT-4 split)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
