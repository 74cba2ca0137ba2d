"""Activation recomputation (``recompute="blocks"`` on the GPT and the Llama): each block keeps its input alone and
its forward runs again in the hand-written backward. The gradients are the same bits as keeping every cache — float64
and float32, with dropout (the masks drawn again from the same key), plain and tiled attention — and the compiled
step holds less: XLA's own accounting of its temporaries. Times are the benchmark's (``jnnex bench --only
recompute``), not a test's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnex.layers import Recompute
from jnnex.models.gpt import GPTConfig, gpt
from jnnex.models.llama import LlamaConfig, llama

BASE = {  # name: (build, config class, settings)
    "gpt": (gpt, GPTConfig, dict(n_head=2)),
    "llama": (llama, LlamaConfig, dict(n_head=4, n_kv_head=2)),
    "llama-tiled": (llama, LlamaConfig, dict(n_head=4, n_kv_head=2, attention="tiled", tile=4)),
}
CASES = list(BASE)


def make(name, **kw):
    build, config, settings = BASE[name]
    return build(config(**{"vocab_size": 11, "block_size": 16, "n_layer": 3, "n_embd": 16, **settings, **kw}))


def batch(B=4, T=16):
    k1, k2 = jax.random.split(jax.random.key(3))
    return jax.random.randint(k1, (B, T), 0, 11, jnp.int32), jax.random.randint(k2, (B, T), 0, 11, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("name", CASES)
def test_recomputed_blocks_give_the_same_gradients_bit_for_bit(name, dropout, dtype):
    x, y = batch()
    grads = {}
    with jax.enable_x64(dtype == jnp.float64):
        for policy in ("none", "blocks"):
            model = make(name, dropout=dropout, recompute=policy).with_gradients("manual")
            params, state = model.init(jax.random.key(0))
            params = jax.tree.map(lambda p: p.astype(dtype), params)
            key = jax.random.key(7) if dropout else None
            loss, g, _ = jax.jit(model.value_and_grad)(params, state, x, y, key)
            grads[policy] = (loss, g)
            if policy == "blocks":  # what the training forward kept: each block's input, not its caches
                caches = model.forward(params, state, x, train=True, key=key).caches
                assert all(isinstance(c, Recompute) for c in caches.blocks)
    (l0, g0), (l1, g1) = grads["none"], grads["blocks"]
    assert np.asarray(l0) == np.asarray(l1)
    for path, a in jax.tree_util.tree_leaves_with_path(g0):
        b = g1
        for k in path:
            b = b[k.idx] if hasattr(k, "idx") else getattr(b, k.name)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


BF16_CHILD = """
import sys, jax, numpy as np
sys.path.insert(0, "tests")
from test_recompute import batch, make
for name in ("gpt", "llama", "llama-tiled"):
    x, y = batch()
    out = {}
    for policy in ("none", "blocks"):
        model = make(name, precision="bfloat16", recompute=policy).with_gradients("manual")
        params, state = model.init(jax.random.key(0))
        out[policy] = jax.jit(model.value_and_grad)(params, state, x, y)[:2]
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(out["none"]), jax.tree.leaves(out["blocks"]), strict=True))
    print(name, same)
"""


def test_recomputed_blocks_in_bfloat16_give_the_same_gradients_bit_for_bit():
    """precision="bfloat16": the recomputed forward casts the block's parameters as the first forward did, and the
    gradients are the same bits — where XLA rounds every bfloat16 intermediate as written
    (``--xla_allow_excess_precision=false``, in a child process: XLA reads its flags once). With XLA's default, which
    lets a fusion keep a bfloat16 intermediate in float32, the two programs fuse differently and differ in the last
    bfloat16 bits (45 % of one tensor's entries, ~1e-3 relative), as two fusions of any bfloat16 program may. The
    child compiles as the suite's processes do (XLA's costlier passes off: 17.5 s → 5.6 s); planted, the recomputed
    forward on the uncast parameters turns it red there too."""
    import os
    import subprocess
    import sys

    from runfiles import suite_compile_env  # (the suite's cheaper compile: the values are what is compared)
    env = {**os.environ, **suite_compile_env()}
    env["XLA_FLAGS"] += " --xla_allow_excess_precision=false"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    proc = subprocess.run([sys.executable, "-c", BF16_CHILD], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["gpt", "True", "llama", "True", "llama-tiled", "True"], proc.stdout


def test_evaluation_keeps_its_caches_and_a_bad_policy_is_named():
    """Only a training forward recomputes (an evaluation has no backward); an unknown policy is an error naming it."""
    model = make("gpt", recompute="blocks")
    params, state = model.init(jax.random.key(0))
    caches = model.forward(params, state, batch()[0], train=False).caches
    assert not any(isinstance(c, Recompute) for c in caches.blocks)
    for config in (GPTConfig, LlamaConfig):
        with pytest.raises(ValueError, match=r"recompute must be one of \('none', 'blocks'\), got 'some'"):
            config(recompute="some")


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_recomputation_stores_each_blocks_input_alone(name):
    """What the training forward stores for the backward, read from shapes: under ``blocks``, exactly each block's
    input (n_layer arrays of B × T × C) — here under 1/10 of what keeping every cache stores at 8 blocks. (XLA:CPU's
    memory analysis of the compiled step does not show the saving: its temporaries stay put, and ``jax.checkpoint``
    raises them there too; ``jnnex bench --only recompute`` records both.)"""
    stored = {}
    B, T, C, L = 8, 64, 64, 8
    for policy in ("none", "blocks"):
        model = make(name, recompute=policy, n_layer=L, block_size=T, n_embd=C)
        params, state = jax.eval_shape(model.init, jax.random.key(0))
        x = jax.ShapeDtypeStruct((B, T), jnp.int32)
        caches = jax.eval_shape(lambda p, s, x: model.forward(p, s, x, train=True).caches, params, state, x)
        stored[policy] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(caches.blocks)
                             if a.ndim)  # (the index and mode a Recompute keeps are Python values, not arrays)
    assert stored["blocks"] == L * B * T * C * 4, stored
    assert stored["blocks"] < stored["none"] / 10, stored


def test_a_run_with_recomputed_blocks_trains_to_the_same_bits_and_is_estimated_smaller():
    """The run driver end to end (`jnnex train --recompute blocks`): its memory estimate reads the smaller caches
    (a PRNG key among them was an opaque dtype error), and six AdamW steps with dropout end on the same parameters
    as keeping every cache."""
    from jnnex import memory
    from jnnex import run as jrun
    from jnnex.optim import make_optimizer

    results, estimates = {}, {}
    for policy in ("none", "blocks"):
        rc = jrun.RunConfig.new("gpt", recompute=policy, dropout=0.1, n_layer=2, n_embd=16, steps=6, chunk=3,
                                eval_every=6, gradients="manual")
        result = jrun.train(rc, None, progress=False)
        results[policy] = result.params
        estimates[policy] = memory.training_estimate(result.model, make_optimizer(rc.train), 32, 10).activations
    for a, b in zip(jax.tree.leaves(results["none"]), jax.tree.leaves(results["blocks"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert estimates["blocks"] < estimates["none"] / 2, estimates
