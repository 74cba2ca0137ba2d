"""The Llama block (jnnex/models/llama.py) and the tiled attention (jnnex/models/flash.py): each pair against
``jax.vjp`` in float64; the tiled attention against the plain pair; the model's per-tensor float64 table against
``jax.grad`` (printed in the test output), llm.c's two checks, the tied head, the KV cache with rotated keys."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmc
import pairs
import jnnex.models.flash as F
import jnnex.models.llama as L
from jnnex import strategies
from jnnex.check import compare_model, randomise
from jnnex.data import Vocab, load_words, make_splits
from jnnex.lm import continue_text, count_params, manual_vjp
from jnnex.models.gpt import attend_backward, attend_forward
from jnnex.models.llama import LlamaConfig, LlamaParams, llama
from pairs import f64

# ----------------------------------------------------------------------------------------------------------------------
# The pairs, each backward against jax.vjp of its forward in float64

FIXED = {
    "rmsnorm": (f64(2, 3, 4), f64(4)),
    "rope": (f64(2, 2, 3, 4), 0),
    "swiglu": (f64(2, 3, 6),),
    "split_gqa": (f64(2, 3, 16), 2, 1),
    "repeat_kv": (f64(2, 1, 3, 4), 2),
    "attention": (f64(2, 3, 8), f64(8, 16), f64(8, 8), 2, 1, 2),
}

test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared = \
    pairs.tests(L, FIXED)
test_flash_pair_backward_equals_vjp_float64, test_flash_pair_rejects_a_wrongly_shaped_gradient, \
    test_flash_pairs_are_declared = pairs.tests(F, {"flash_attend": (f64(2, 2, 5, 2), f64(2, 2, 5, 2) * 0.5,
                                                                     f64(2, 2, 5, 2) * 2.0, 2)})


def test_rmsnorm_normalises_to_unit_rms_and_caches_rstd():
    x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64) * 4 + 2
    y, (_, _, rstd) = L.rmsnorm_forward(x, jnp.ones(5, jnp.float64), eps=0.0)
    np.testing.assert_allclose(jnp.sqrt((y * y).mean(-1)), 1.0, rtol=1e-14)
    assert rstd.shape == (3, 1)


def test_rope_rotates_pairs_so_scores_depend_on_distance_only():
    """What rotary positions are for: ``rope(q at a) · rope(k at b)`` depends on ``a − b`` only (shifting both by 7
    changes nothing), norms are kept, and position 0 is the identity."""
    q, k = (jax.random.normal(jax.random.key(i), (1, 1, 6, 8), jnp.float64) for i in (1, 2))
    rq, _ = L.rope_forward(q, 0)
    rk, _ = L.rope_forward(k, 0)
    sq, _ = L.rope_forward(q, 7)
    sk, _ = L.rope_forward(k, 7)
    np.testing.assert_allclose(rq[0, 0] @ rk[0, 0].T, sq[0, 0] @ sk[0, 0].T, rtol=1e-12)
    np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-14)
    np.testing.assert_array_equal(rq[0, 0, 0], q[0, 0, 0])
    assert not np.allclose(rq[0, 0, 1:], q[0, 0, 1:])


def test_rope_is_the_rotate_half_convention_with_frequencies_base_to_the_minus_2i_over_hs():
    """The rotation pinned to values written out here, not by the helper the model uses: channel i and channel
    i + hs/2 of a head rotate by pos · base^(-2i/hs) (Llama's, Hugging Face's ``inv_freq = 1 / base^(arange(0, hs,
    2) / hs)``). With hs 8 and base 10,000 the four frequencies are 1, 0.1, 0.01, 0.001 — a rotation by
    base^(-i/hs) would turn pair 1 by 10^-0.5 a step instead."""
    hs, T, base = 8, 5, 10_000.0
    x = np.asarray(jax.random.normal(jax.random.key(3), (1, 1, T, hs), jnp.float64))
    want = np.empty_like(x)
    for pos in range(T):
        for i in range(hs // 2):
            theta = (pos + 3) * [1.0, 0.1, 0.01, 0.001][i]
            a, b = x[0, 0, pos, i], x[0, 0, pos, i + hs // 2]
            want[0, 0, pos, i] = a * np.cos(theta) - b * np.sin(theta)
            want[0, 0, pos, i + hs // 2] = b * np.cos(theta) + a * np.sin(theta)
    got, _ = L.rope_forward(jnp.asarray(x), 3, base)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


def test_swiglu_width_is_llamas_rule():
    assert L.hidden_width(4096, 256) == 11008  # Llama 2 7B's MLP
    assert L.hidden_width(64, 32) == 192 and LlamaConfig(n_embd=128).hidden == 352


def test_repeat_kv_backward_sums_each_group():
    """llm.c's repkv backward: the shared head's gradient is the sum over the query heads of its group."""
    dy = jax.random.normal(jax.random.key(0), (1, 6, 2, 3), jnp.float64)  # 6 query heads, 2 key/value heads
    dx, _ = L.repeat_kv_backward(dy, ((1, 2, 2, 3), 3))
    np.testing.assert_allclose(dx[0, 1], dy[0, 3] + dy[0, 4] + dy[0, 5], rtol=1e-15)


# ----------------------------------------------------------------------------------------------------------------------
# The tiled attention equals the plain pair


@functools.partial(jax.jit, static_argnums=3)
def tiled_against_plain(q, k, v, tile):
    """The tiled pair's output and three gradients against the plain pair's, one random upstream gradient: each
    error relative to the largest reference value, or, where the reference cancels to ~0 (T = 1, one-hot rows: dq =
    dk = 0), to the size of the terms that cancel (|dy| |v| |q or k|): rounding is relative to those."""
    y, cache = F.flash_attend_forward(q, k, v, tile)
    y_ref, cache_ref = attend_forward(q, k, v)
    dy = jax.random.normal(jax.random.key(1), y.shape, q.dtype)
    grads, grads_ref = F.flash_attend_backward(dy, cache)[:3], attend_backward(dy, cache_ref)
    terms = jnp.abs(dy).max() * jnp.abs(v).max() * jnp.maximum(jnp.abs(q).max(), jnp.abs(k).max())
    return jnp.stack([jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), floor)
                      for a, b, floor in zip((y, *grads), (y_ref, *grads_ref), (1e-30, terms, terms, terms))])


CASES = [  # (B, nh, T, hs, tile, score scale): T a multiple of the tile or not, T = 1, a tile longer than T, ±1e4
    (2, 3, 13, 4, 4, 3.0), (1, 2, 16, 8, 4, 1.0), (2, 1, 1, 4, 4, 3.0), (1, 2, 5, 2, 16, 1.0), (2, 2, 9, 4, 2, 150.0),
    (1, 1, 7, 2, 1, 150.0),
]


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)], ids=["float64", "float32"])
def test_tiled_attention_equals_the_plain_pair(dtype, tol):
    """Outputs and the three gradients of the tiled pair within ``tol`` of the plain pair's (relative to the
    largest), for the cases above; scores of ±1e4 reach it (one-hot rows). (The pair check above draws its shapes
    against ``jax.vjp`` of the tiled forward itself.)"""
    for i, (B, nh, T, hs, tile, scale) in enumerate(CASES):
        q, k, v = (jax.random.normal(jax.random.key(10 * i + j), (B, nh, T, hs), dtype) for j in range(3))
        q, k = q * scale, k * scale
        errors = np.asarray(tiled_against_plain(q, k, v, tile))
        assert errors.max() <= tol, (CASES[i], errors)
    scores = np.einsum("bhtd,bhsd->bhts", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(hs)
    assert np.abs(scores).max() > 1e4


def test_tiled_attention_rows_that_see_only_their_diagonal():
    """Rows whose every earlier score is −1e4 below the diagonal's: the output is the row's own value and the
    gradients are finite and the plain pair's."""
    T, hs = 7, 8
    q = jnp.tile(jnp.eye(T, hs, dtype=jnp.float64)[None, None] * 100.0, (1, 2, 1, 1))  # q_t · k_t' = 1e4 δ(t, t')
    v = jax.random.normal(jax.random.key(0), (1, 2, T, hs), jnp.float64)
    y, _ = jax.jit(F.flash_attend_forward, static_argnums=3)(q, q * np.sqrt(hs), v, 3)
    np.testing.assert_allclose(y, v.transpose(0, 2, 1, 3).reshape(1, T, 2 * hs), rtol=1e-12, atol=1e-300)
    assert np.asarray(tiled_against_plain(q, q * np.sqrt(hs), v, 3)).max() <= 1e-12


def test_a_wrong_tiled_backward_is_caught():
    """The classic slip in FlashAttention's backward — ``D`` left out of ``ds`` — fails the comparison."""
    @jax.jit  # one program (the loops compiled once, not op by op)
    def grads(q, k, v, dy):
        _, (q_, k_, v_, o, lse, tile, scale) = F.flash_attend_forward(q, k, v, 2)
        good = F.flash_attend_backward(dy, (q_, k_, v_, o, lse, tile, scale))
        wrong = F.flash_attend_backward(dy, (q_, k_, v_, jnp.zeros_like(o), lse, tile, scale))  # D = rowsum(dO ⊙ 0) = 0
        return good, wrong, attend_backward(dy, attend_forward(q, k, v)[1])

    q, k, v = (jax.random.normal(jax.random.key(i), (1, 2, 5, 4), jnp.float64) for i in range(3))
    good, wrong, ref = grads(q, k, v, jax.random.normal(jax.random.key(5), (1, 5, 8), jnp.float64))
    assert all(np.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(good[:3], ref))
    assert not np.allclose(wrong[0], ref[0], rtol=1e-3)


def test_tile_must_be_a_positive_integer():
    q = jnp.zeros((1, 1, 3, 2))
    for tile in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="tile must be a positive integer"):
            F.flash_attend_forward(q, q, q, tile)


# ----------------------------------------------------------------------------------------------------------------------
# The model

WORDS = load_words("census-first")[:400]
VOCAB = Vocab.from_words(WORDS)


def random_problem(cfg: LlamaConfig, B: int, T: int, seed: int, dtype=jnp.float64):
    """Llama parameters far from the init (norm gains perturbed, matrices of std ~ 1/sqrt(fan_in)) and a padded
    batch ``x (B, T)``, ``y (B, T)`` with ``-1`` after each length."""
    k = jax.random.split(jax.random.key(seed), 5)
    params, _ = llama(cfg).init(k[0])
    params = randomise(params, k[1], dtype)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [p * (1.0 / (0.02 * np.sqrt(p.shape[0]))) if p.ndim == 2 and p is not params.wte else p for p in leaves]
    params = jax.tree.unflatten(treedef, leaves)._replace(wte=params.wte * 25.0)
    x = jax.random.randint(k[2], (B, T), 0, cfg.vocab_size, jnp.int32)
    lengths = jax.random.randint(k[3], (B, 1), 1, T + 1)
    y = jnp.where(jnp.arange(T)[None] < lengths, jax.random.randint(k[4], (B, T), 0, cfg.vocab_size, jnp.int32), -1)
    return params, x, y


def per_tensor_errors(model, params, x, y, key=None):
    rows, extra = compare_model(model, params, (), x, y, key)
    assert len(rows) == len(jax.tree.leaves(params))
    return {r.name: r.rel for r in rows}, *extra["loss"]


def test_every_tensor_equals_jax_grad_float64_with_the_table(record_property):
    """A grouped-query Llama (4 query heads, 2 key/value heads), float64, random parameters, a padded batch: each
    gradient tensor against ``jax.grad`` on its own scale; the table in the test output."""
    model = llama(LlamaConfig(n_kv_head=2))
    params, x, y = random_problem(model.cfg, 8, 16, seed=0)
    errors, loss_m, loss_a = per_tensor_errors(model, params, x, y)
    np.testing.assert_allclose(loss_m, loss_a, rtol=1e-13)
    assert len(errors) == 2 + 4 * 6 + 1
    rows = "\n".join(f"  {name:<24} {err:.1e}" for name, err in errors.items())
    record_property("table", "Llama (4 layers, 4 heads, 2 key/value heads, n_embd 64, T 16, batch 8), float64: "
                             f"max |manual - jax.grad| / max |jax.grad| per tensor; loss {float(loss_m):.6f}\n{rows}")
    bad = {k: v for k, v in errors.items() if not v <= 1e-12}
    assert not bad, bad


@settings(max_examples=min(6, settings().max_examples))  # each drawn example compiles a new program
@given(n_layer=st.sampled_from([1, 2]), heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (2, 2)]),
       head_size=st.sampled_from([2, 4]), V=st.sampled_from([5, 27]), block_size=st.sampled_from([1, 3, 6]),
       B=st.sampled_from([1, 3]), dropout=st.sampled_from([0.0, 0.3]), tie=st.booleans(),
       attention=st.sampled_from(["plain", "tiled"]), data=st.data())
def test_backward_equals_jax_grad_float64(n_layer, heads, head_size, V, block_size, B, dropout, tie, attention, data):
    """Drawn shapes (T = 1 included), grouped heads, dropout, a tied head, plain or tiled attention (tiles of 2):
    every tensor within 1e-10 of its own scale."""
    T = data.draw(st.integers(1, block_size))
    n_head, n_kv_head = heads
    cfg = LlamaConfig(vocab_size=V, block_size=block_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                      n_embd=n_head * head_size, ffn_multiple=4, dropout=dropout, tie=tie, attention=attention, tile=2)
    params, x, y = random_problem(cfg, B, T, seed=data.draw(strategies.seeds()))
    errors, loss_m, loss_a = per_tensor_errors(llama(cfg), params, x, y, jax.random.key(7) if dropout else None)
    np.testing.assert_allclose(loss_m, loss_a, rtol=1e-12)
    bad = {k: v for k, v in errors.items() if not v <= 1e-10}
    assert not bad, bad


def test_a_tied_head_gets_both_uses_and_the_slip_is_caught():
    """Tied: the table's gradient is the embedding's scatter-add plus the head's ``(dW_head)ᵀ``; leaving the head's
    share out is wrong exactly at ``.wte``."""
    cfg = LlamaConfig(vocab_size=7, block_size=5, n_layer=2, n_head=2, n_kv_head=1, n_embd=4, ffn_multiple=4, tie=True)
    model = llama(cfg)
    params, x, y = random_problem(cfg, 3, 5, seed=3)
    assert params.lm_head is None
    errors, _, _ = per_tensor_errors(model, params, x, y)
    assert max(errors.values()) <= 1e-12, errors
    untied = model.backward_fn

    def backward(cfg, params, caches, dlogits):
        grads, act_grads = untied(dataclasses.replace(cfg, tie=False), params, caches, dlogits)
        return grads._replace(lm_head=None), act_grads

    errors, _, _ = per_tensor_errors(dataclasses.replace(model, backward_fn=backward), params, x, y)
    assert {k for k, v in errors.items() if not v <= 1e-10} == {".wte"}


def test_a_rope_backward_by_the_positive_angle_is_caught(monkeypatch):
    """The slip the docstring warns of — undoing the rotation by rotating again — is named at the tensors below the
    attention only."""
    def rope_backward(dy, cache):
        shape, cos, sin = cache
        d1, d2 = jnp.split(dy, 2, axis=-1)
        return jnp.concatenate([d1 * cos - d2 * sin, d2 * cos + d1 * sin], axis=-1), None

    monkeypatch.setattr(L, "rope_backward", rope_backward)
    cfg = LlamaConfig(vocab_size=5, block_size=4, n_layer=1, n_head=2, n_kv_head=1, n_embd=4, ffn_multiple=4)
    params, x, y = random_problem(cfg, 2, 4, seed=1)
    errors, _, _ = per_tensor_errors(llama(cfg), params, x, y)
    assert {k for k, v in errors.items() if not v <= 1e-10} == {".wte", ".blocks[0].norm1", ".blocks[0].qkv.W"}


def test_parameter_count_and_layout():
    """Grouped heads shrink the fused projection; no biases, no position table; the MLP's three matrices."""
    cfg = LlamaConfig(vocab_size=27, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
    params, _ = llama(cfg).init(jax.random.key(0))
    blk = params.blocks[0]
    assert blk.qkv.W.shape == (64, 64 + 2 * 32) and blk.qkv.b is None
    assert blk.fc.W.shape == (64, 2 * 192) and blk.fcproj.W.shape == (192, 64)
    per_block = 64 * 128 + 64 * 64 + 64 * 384 + 192 * 64 + 2 * 64
    assert count_params(params) == 27 * 64 + 4 * per_block + 64 + 64 * 27


def test_config_errors_name_the_setting():
    for kwargs, message in [
        (dict(n_head=4, n_kv_head=3), r"n_head \(4\) must be divisible by n_kv_head \(3\)"),
        (dict(n_embd=12, n_head=4), "head size n_embd / n_head must be even, got 3"),
        (dict(attention="tiled", tile=0), "tile must be a positive integer"),
        (dict(tile=1.5), "tile must be a positive integer"),
        (dict(attention="flash"), "attention must be one of"),
        (dict(rope_base=0), "rope_base must be a number > 0"),
        (dict(n_kv_head=0), "n_kv_head must be an integer >= 1"),
        (dict(ffn_multiple=0), "ffn_multiple must be an integer >= 1"),
        (dict(norm_eps=-1e-5), "norm_eps must be a number > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            LlamaConfig(**kwargs)


def small_model(dropout=0.0, **kw):
    from jnnex.models.registry import REGISTRY, build_for_words
    return build_for_words(REGISTRY["llama"], WORDS, VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                           dropout=dropout, **kw)


@pytest.mark.parametrize("attention", ["plain", "tiled"])
def test_ten_steps_on_one_batch_manual_equals_autodiff(attention):
    """llm.c's ``test_gpt2`` on the Llama: 10 AdamW steps on one batch, hand-written against ``jax.grad``, float64,
    with the plain and the tiled attention."""
    model = small_model(attention=attention, tile=4)
    splits = make_splits(WORDS, model.block_size, vocab=VOCAB, per_position=True)
    x, y = (jnp.asarray(a[:8]) for a in splits.train)
    losses = llmc.ten_steps(model, x, y)
    np.testing.assert_allclose(losses["manual"], losses["autodiff"], rtol=1e-10)
    assert losses["manual"][-1] < 0.75 * losses["manual"][0] and (np.diff(losses["manual"]) < 0).all()


def test_save_reload_rerun_is_bit_identical(tmp_path):
    """5 steps, save, 5 more; reload and rerun: the same losses bit for bit and the same samples (dropout on)."""
    from jnnex.models.registry import REGISTRY
    model = small_model(dropout=0.2).with_gradients("manual")
    splits = make_splits(WORDS, model.block_size, vocab=VOCAB, per_position=True)
    X, Y = (jnp.asarray(a) for a in splits.train)
    losses_a, losses_b, samples_a, samples_b = llmc.save_reload_rerun(model, X, Y, REGISTRY["llama"].train,
                                                                      tmp_path / "checkpoint.npz")
    np.testing.assert_array_equal(losses_a, losses_b)
    np.testing.assert_array_equal(samples_a, samples_b)


def test_manual_vjp_runs_jax_grad_on_the_hand_written_backward():
    model = llama(LlamaConfig(vocab_size=5, block_size=4, n_layer=2, n_head=2, n_kv_head=1, n_embd=4, ffn_multiple=4))
    params, x, _ = random_problem(model.cfg, 3, 4, seed=2)
    w = jax.random.normal(jax.random.key(9), (3, 4, 5), jnp.float64)

    def f(logits_fn, params):
        return jnp.sum(w * jnp.tanh(logits_fn(params, (), x)))

    plain = jax.jit(jax.grad(lambda p: f(lambda p, s, x: model.apply(p, s, x, train=True)[0], p)))(params)
    adapted = jax.jit(jax.grad(lambda p: f(manual_vjp(model), p)))(params)
    for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("dtype, tol, n_kv_head, attention",
                         [(jnp.float64, 1e-12, 1, "plain"), (jnp.float64, 1e-12, 2, "tiled"),
                          (jnp.float32, 1e-5, 1, "tiled")])
def test_cached_logits_equal_the_full_forward_everywhere(dtype, tol, n_kv_head, attention):
    """The KV cache holds keys already rotated, at their positions: 30 tokens from a 3-token prompt at block size
    7 (the window slides by halves, the positions start again at 0 after each refill) give the full forward's
    logits at every step."""
    from test_sampling import contexts
    cfg = LlamaConfig(vocab_size=11, block_size=7, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=8,
                      ffn_multiple=4, attention=attention, tile=3)
    model = llama(cfg)
    params, state = model.init(jax.random.key(0))
    params = randomise(params, jax.random.key(1), dtype)
    prompt, n_new, T = [1, 2, 3], 30, cfg.block_size
    toks, logits = continue_text(model, params, state, prompt, n_new, jax.random.key(3), n=2, with_logits=True)
    seq = np.concatenate([np.tile(prompt, (2, 1)), toks], axis=1)
    worst, full = 0.0, jax.jit(lambda window: model.apply(params, state, window, train=False)[0][:, -1])
    for s, seen in enumerate(contexts(len(prompt), n_new, T)):
        want = full(jnp.asarray(seq[:, len(prompt) + s - seen : len(prompt) + s]))
        worst = max(worst, float(jnp.abs(logits[s] - want).max() / jnp.abs(want).max()))
    assert worst <= tol, worst


def test_the_kv_cache_keeps_only_the_shared_heads():
    cfg = LlamaConfig(vocab_size=11, block_size=7, n_layer=2, n_head=4, n_kv_head=1, n_embd=8, ffn_multiple=4)
    model = llama(cfg)
    params, _ = model.init(jax.random.key(0))
    _, cache = jax.eval_shape(lambda p: L.prefill(cfg, p, jnp.zeros((2, 7), jnp.int32)), params)  # shapes only
    assert cache.k[0].shape == (2, 1, 7, 2) and len(cache.v) == 2
    assert isinstance(params, LlamaParams)


def test_the_shakespeare_preset_is_the_gpts_recipe_block_for_block():
    """``llama --preset shakespeare-cpu``: the GPT's CPU recipe's shape (4 layers, 4 heads, n_embd 128, block 64, tied
    head) and training settings exactly; no biases and no position table, so SwiGLU 342 wide brings the parameter
    count within 1 % of the GPT's (the GPT-vs-Llama table compares the two at equal steps and size)."""
    from jnnex.models.gpt import GPTConfig, gpt
    from jnnex.models.registry import REGISTRY

    model_over, train_over = REGISTRY["llama"].presets["shakespeare-cpu"]
    gpt_over, gpt_train = REGISTRY["gpt"].presets["shakespeare-cpu"]
    assert train_over == gpt_train
    assert {k: model_over[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "tie")} == \
        {k: gpt_over[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "tie")}
    cfg = LlamaConfig(vocab_size=65, **model_over)
    params, _ = jax.eval_shape(llama(cfg).init, jax.random.key(0))
    gpt_params, _ = jax.eval_shape(gpt(GPTConfig(vocab_size=65, **gpt_over)).init, jax.random.key(0))
    assert cfg.hidden == 342 and count_params(params) == 796_928 and count_params(gpt_params) == 804_096
