"""A mixture of experts against the dense Llama on tiny Shakespeare, at equal active parameters and equal steps: the
loss and the time, side by side.

The dense model is the Llama's ``shakespeare-cpu`` recipe (4 blocks, n_embd 128, SwiGLU 342 wide, 2,000 steps of 12
× 64 tokens). The mixtures replace each block's SwiGLU by ``E`` GELU experts, each token going to ``top_k`` of them,
each expert ``3 · 342 / (2 · top_k)`` wide (``LlamaConfig.expert_width``): a token's active MLP parameters are the
dense model's. Rows: dense; 8 experts top-2, dropless; the same with a capacity factor of 1.25 (choices past an
expert's capacity dropped). Every run is the hand-written backward, seed 0, the recipe's AdamW settings.

``val_loss``: the loss over every window of the validation split at the end (cross-entropy alone; the training
objective also holds the weighted balancing loss). ``ms_per_step``: one compiled 50-step chunk of each model, timed in
interleaved rounds (this machine is shared and noisy: the ratio is what to read). ``total_params``: every parameter,
the experts all counted. Tiny Shakespeare is read from ``$JNNEX_SHAKESPEARE_TXT`` or ``../shared/data``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jnnex import run as runs
from jnnex.bench.harness import interleaved, quick_splits, table
from jnnex.bench.text import shakespeare
from jnnex.lm import count_params
from jnnex.optim import make_optimizer
from jnnex.train import fit, init_train_state, make_run, make_step

VARIANTS = {"dense": {}, "8 experts, top-2, dropless": {"n_expert": 8, "expert_top_k": 2},
            "8 experts, top-2, capacity 1.25": {"n_expert": 8, "expert_top_k": 2, "expert_capacity": 1.25}}


def run(quick: bool = False) -> dict:
    path = shakespeare()
    small = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 2, "steps": 20, "eval_every": 20} if quick else {}
    rows, contenders = [], {}
    for name, extra in VARIANTS.items():
        rc = runs.RunConfig.new("llama", str(path), preset="shakespeare-cpu", gradients="manual", **small, **extra)
        model, splits = runs.prepare(rc)
        splits = quick_splits(splits) if quick else splits
        result = fit(model, splits, rc.train)
        params = result.ts.params
        cfg = model.cfg
        rows.append({"model": name, "total_params": count_params(params),
                     "active_mlp_params_per_block": (3 * cfg.n_embd * cfg.hidden if cfg.n_expert is None else
                                                     2 * cfg.expert_top_k * cfg.n_embd * cfg.expert_width),
                     "steps": rc.train.steps, "train_loss": float(np.mean(result.losses[-50:])),
                     "val_loss": float(result.evals[-1]["val_loss"])})
        opt = make_optimizer(rc.train)
        ts = init_train_state(model, opt, jax.random.key(0))
        tokens = jnp.asarray(np.asarray(splits.train.tokens))
        run_fn = make_run(make_step(model, opt), rc.train.batch_size, window=model.block_size)
        n = 5 if quick else 50
        args = (ts, tokens, jnp.zeros((0,), jnp.int32), jax.random.key(1))
        jax.block_until_ready(run_fn(*args, n_steps=n))
        contenders[name] = lambda run_fn=run_fn, args=args, n=n: jax.block_until_ready(run_fn(*args, n_steps=n))
    timings = interleaved(contenders, 1 if quick else 5)
    n = 5 if quick else 50
    base = timings["dense"]["median"]
    for row in rows:
        t = timings[row["model"]]
        row.update(ms_per_step=1e3 * t["median"] / n, spread=t["spread"], time_vs_dense=t["median"] / base)
    dense = rows[0]["val_loss"]
    for row in rows:
        row["val_vs_dense"] = row["val_loss"] - dense
    cols = ["model", "total_params", "active_mlp_params_per_block", "steps", "train_loss", "val_loss", "val_vs_dense",
            "ms_per_step", "spread", "time_vs_dense"]
    text = ("The Llama's shakespeare-cpu recipe, dense against a mixture of experts at equal active parameters and "
            "equal steps (hand-written backward, float32, seed 0)\n\n" + table(rows, cols))
    return {"name": "moe", "rows": rows, "device": str(jax.devices()[0]), "table": text,
            "settings": {"quick": quick, "variants": VARIANTS, **small}}
