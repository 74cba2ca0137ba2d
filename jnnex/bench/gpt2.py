"""GPT-2 small (124M), the configuration that connects the toy to the real thing, on this machine.

* **Every hand-written gradient at full size**: the ``gpt2-124m`` preset (12 layers, 12 heads, n_embd 768, block
  1,024, vocabulary 50,304, the head tied to the token table, biases as GPT-2's; 124,475,904 parameters), its
  hand-written backward against ``jax.grad`` per tensor in float64 at batch 1, T = 64 — the tied table's gradient
  (its two uses added) included. Each tensor's ``max |manual − jax.grad| / max |jax.grad|``; the table groups the
  150 tensors by kind (the worst of the 12 blocks).
* **One training step's time** at batch 1, T = 1,024 in float32: AdamW (the preset's settings), the hand-written
  backward and ``jax.grad``, timed in the same rounds; and XLA's FLOP count of the step over the time.

``--quick``: the same code on a 2-layer, 64-wide GPT-2 of 512 tokens (the code paths, in seconds).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.bench.harness import interleaved, table
from jnnex.check import randomise
from jnnex.lm import count_params
from jnnex.models.gpt import GPT2_SMALL, GPT2_VOCAB_PADDED, GPTConfig, gpt
from jnnex.models.registry import REGISTRY
from jnnex.optim import TrainConfig, make_optimizer
from jnnex.train import init_train_state, make_step

QUICK = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64, "vocab_size": 512}


def config(quick: bool) -> GPTConfig:
    return GPTConfig(**({**GPT2_SMALL, **QUICK} if quick else {**GPT2_SMALL, "vocab_size": GPT2_VOCAB_PADDED}))


def _kind(path: str) -> str:
    """``.blocks[3].fc.W`` -> ``blocks[*].fc.W``: a tensor's kind, its layer left out."""
    import re

    return re.sub(r"\[\d+\]", "[*]", path).lstrip(".")


def accuracy(cfg: GPTConfig, T: int, seed: int = 0) -> tuple[list[dict], float]:
    """Per tensor, the hand-written gradient against ``jax.grad`` in float64 at batch 1 x ``T``: rows grouped by
    kind (the worst of its layers), and the worst of all."""
    with jax.enable_x64(True):
        model = gpt(cfg)
        params, _ = jax.jit(model.init)(jax.random.key(seed))
        params = jax.jit(lambda p: randomise(p, jax.random.key(seed + 1), jnp.float64))(params)
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        y = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        t0 = time.perf_counter()
        _, manual, _ = jax.jit(model.with_gradients("manual").value_and_grad)(params, (), x, y)
        _, auto, _ = jax.jit(model.with_gradients("autodiff").value_and_grad)(params, (), x, y)
        jax.block_until_ready((manual, auto))
        seconds = time.perf_counter() - t0
        worst: dict[str, dict] = {}
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(auto), jax.tree.leaves(manual)):
            a, b = np.asarray(a), np.asarray(b)
            rel = float(np.max(np.abs(b - a)) / max(float(np.max(np.abs(a))), 1e-300))
            kind = _kind(jax.tree_util.keystr(path))
            row = worst.setdefault(kind, {"tensor": kind, "shape": "x".join(map(str, a.shape)), "count": 0,
                                          "f64 max rel": 0.0})
            row["count"] += 1
            row["f64 max rel"] = max(row["f64 max rel"], rel)
    rows = list(worst.values())
    return rows, max(r["f64 max rel"] for r in rows), seconds


def step_time(cfg: GPTConfig, T: int, repeats: int) -> list[dict]:
    """One AdamW step at batch 1 x ``T`` in float32, hand-written backward and ``jax.grad``, timed in the same
    rounds; XLA's FLOP count of each compiled step over its time."""
    tcfg = TrainConfig(**{k: v for k, v in REGISTRY["gpt"].presets["gpt2-124m"][1].items()
                          if k in ("optimizer", "lr", "betas", "weight_decay", "decay_mask", "grad_clip")})
    opt = make_optimizer(tcfg)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
    y = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
    contenders, flops, first = {}, {}, {}
    for name, g in (("jax.grad", "autodiff"), ("manual", "manual")):
        model = gpt(cfg).with_gradients(g)
        ts = init_train_state(model, opt, jax.random.key(0))
        step = jax.jit(make_step(model, opt))
        compiled = step.lower(ts, (x, y), None).compile()
        flops[name] = float(compiled.cost_analysis()["flops"])
        t0 = time.perf_counter()
        jax.block_until_ready(step(ts, (x, y), None))
        first[name] = time.perf_counter() - t0
        contenders[name] = lambda step=step, ts=ts: jax.block_until_ready(step(ts, (x, y), None))
    timings = interleaved(contenders, repeats)
    base = timings["jax.grad"]["median"]
    return [{"step": name, "s_per_step": t["median"], "spread": t["spread"], "vs_jax.grad": t["median"] / base,
             "tokens_per_s": T / t["median"], "GFLOP": flops[name] / 1e9, "GFLOP/s": flops[name] / t["median"] / 1e9,
             "first_call_s": first[name]} for name, t in timings.items()]


def run(quick: bool = False) -> dict:
    cfg = config(quick)
    n = count_params(jax.eval_shape(lambda k: gpt(cfg).init(k)[0], jax.random.key(0)))
    T_check, T_step = (16, 64) if quick else (64, 1024)
    acc, worst, check_s = accuracy(cfg, T_check)
    steps = step_time(cfg, T_step, 1 if quick else 3)
    text = (f"GPT-2 small's shape{' (quick: 2 layers, 64 wide, 512 tokens)' if quick else ''}: {n:,} parameters\n\n"
            f"Hand-written gradients against jax.grad, float64, batch 1 x {T_check} (the worst of each kind's "
            f"tensors; worst of all {worst:.2g}; both gradients computed in {check_s:.0f} s)\n\n"
            + table(acc, ["tensor", "shape", "count", "f64 max rel"])
            + f"\n\nOne AdamW step, float32, batch 1 x {T_step}\n\n"
            + table(steps, ["step", "s_per_step", "spread", "vs_jax.grad", "tokens_per_s", "GFLOP", "GFLOP/s",
                            "first_call_s"]))
    return {"name": "gpt2", "params": n, "accuracy": acc, "worst_f64_rel": worst, "rows": steps, "table": text,
            "settings": {"config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                                 "vocab_size", "bias", "tie")},
                         "T_check": T_check, "T_step": T_step, "backend": jax.default_backend()}}
