"""The GPT (makemore.py's transformer) and its hand-written backward: size, per-tensor agreement with ``jax.grad`` in
float64 (with the table of observed errors in the test output), llm.c's two checks (a 10-step trajectory on one batch,
save → reload → bit-identical replay), the ``custom_vjp`` adapter, the attention layer's masking and extremes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmc
import pairs
import jnnex.models.gpt as G
from jnnex import strategies
from pairs import f64
from jnnex.check import compare_model, randomise
from jnnex.data import Vocab, load_words, make_splits
from jnnex.layers import combine_static, linear_forward, partition_static
from jnnex.lm import count_params, manual_vjp
from jnnex.models.gpt import GPTConfig, GPTParams, gpt
from jnnex.models.registry import REGISTRY, build_for_words

WORDS = load_words("census-first")[:400]
VOCAB = Vocab.from_words(WORDS)


def random_problem(cfg: GPTConfig, B: int, T: int, seed: int, dtype=jnp.float64):
    """GPT parameters far from the init (LayerNorms and biases perturbed, weights of std ~ 1/sqrt(fan_in) so that
    attention is peaked, not uniform) and a padded batch: ``x (B, T)``, ``y (B, T)`` with ``-1`` after each length."""
    k = jax.random.split(jax.random.key(seed), 5)
    params, _ = gpt(cfg).init(k[0])
    params = randomise(params, k[1], dtype)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [p * (1.0 / (0.02 * np.sqrt(p.shape[0]))) if p.ndim == 2 and p is not params.wte and p is not params.wpe
              else p for p in leaves]  # the matrices to std ~ 1/sqrt(fan_in); embeddings stay small
    params = jax.tree.unflatten(treedef, leaves)
    params = params._replace(wte=params.wte * 25.0, wpe=params.wpe * 25.0)  # std 0.5
    x = jax.random.randint(k[2], (B, T), 0, cfg.vocab_size, jnp.int32)
    lengths = jax.random.randint(k[3], (B, 1), 1, T + 1)
    y = jnp.where(jnp.arange(T)[None] < lengths, jax.random.randint(k[4], (B, T), 0, cfg.vocab_size, jnp.int32), -1)
    return params, x, y


def per_tensor_errors(model, params, x, y, key=None):
    """``{tensor path: max |manual − jax.grad| / scale}`` (:func:`jnnex.check.compare_model`, one compiled program,
    traced anew: a patched backward is seen) and the two losses."""
    rows, extra = compare_model(model, params, (), x, y, key)
    assert len(rows) == len(jax.tree.leaves(params))
    return {r.name: r.rel for r in rows}, *extra["loss"]


def test_makemore_transformer_has_204544_parameters():
    model = gpt(GPTConfig())  # 27 tokens, block size 16, 4 layers, 4 heads, n_embd 64: makemore.py's on names.txt
    params, _ = model.init(jax.random.key(0))
    assert count_params(params) == 204_544
    assert count_params(params.lm_head) == 64 * 27  # the head has no bias and is not tied to wte
    assert len(params.blocks) == 4 and params.blocks[0].qkv.W.shape == (64, 192)


def test_the_gpt2_124m_preset_is_gpt2_small():
    """The preset's shape at GPT-2's own vocabulary has GPT-2 small's 124,439,808 parameters (the tied table counted
    once); nanoGPT's padding to 50,304 adds 47 rows of 768; shapes only (``jax.eval_shape``), nothing allocated."""
    shape, train = REGISTRY["gpt"].presets["gpt2-124m"]

    def n_params(vocab):
        cfg = GPTConfig(vocab_size=vocab, **shape)
        return count_params(jax.eval_shape(lambda k: gpt(cfg).init(k)[0], jax.random.key(0)))

    assert shape == G.GPT2_SMALL and train["batch_size"] == 12 and train["lr"] == 6e-4
    assert n_params(G.GPT2_VOCAB) == 124_439_808
    assert n_params(G.GPT2_VOCAB_PADDED) - n_params(G.GPT2_VOCAB) == 47 * 768 == 36_096


def test_attention_maps_are_causal_softmax_rows():
    """``attention_maps``: (n_layer, B, n_head, T, T), every row a distribution over the positions up to its own —
    zero above the diagonal, summing to 1 — and the first block's equal to a softmax recomputed from its q and k."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=11)
    params, _ = gpt(cfg).init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (3, 6), 0, 11)
    att = G.attention_maps(cfg, params, x)
    assert att.shape == (2, 3, 2, 6, 6)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-6)
    assert float(jnp.abs(jnp.triu(att, 1)).max()) == 0.0
    h = G.token_position_embedding_forward(params.wte, params.wpe, x)[0]
    a = G.layernorm_forward(h, params.blocks[0].ln1.w, params.blocks[0].ln1.b)[0]
    q, k, _ = jnp.split(linear_forward(a, params.blocks[0].qkv.W, params.blocks[0].qkv.b)[0], 3, axis=-1)
    q, k = (G.heads(t, 2) for t in (q, k))
    scores = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), q @ k.transpose(0, 1, 3, 2) / 2.0, -jnp.inf)
    np.testing.assert_allclose(att[0], jax.nn.softmax(scores, -1), rtol=1e-5, atol=1e-6)


def test_init_is_gpt2s():
    cfg = GPTConfig(n_layer=8, n_embd=256)
    params, _ = gpt(cfg).init(jax.random.key(0))
    blk = params.blocks[3]
    np.testing.assert_allclose(float(jnp.std(blk.fc.W)), 0.02, rtol=0.02)
    np.testing.assert_allclose(float(jnp.std(blk.fcproj.W)), 0.02 / np.sqrt(16), rtol=0.02)  # 1/sqrt(2 n_layer)
    np.testing.assert_allclose(float(jnp.std(blk.attproj.W)), 0.02 / np.sqrt(16), rtol=0.02)
    assert not blk.qkv.b.any() and (blk.ln1.w == 1).all() and not blk.ln1.b.any()


def test_config_errors_name_the_arguments():
    with pytest.raises(ValueError, match=r"n_embd \(10\) must be divisible by n_head \(4\)"):
        GPTConfig(n_embd=10)
    with pytest.raises(ValueError, match="dropout must be in"):
        GPTConfig(dropout=1.0)
    model = gpt(GPTConfig(block_size=4))
    params, _ = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"x must have shape \(B, T <= 4\)"):
        model.apply(params, (), jnp.zeros((2, 5), jnp.int32), train=False)


def test_every_tensor_equals_jax_grad_float64_with_the_table(record_property):
    """makemore's exact transformer, float64, random parameters and a padded batch: each of the 53 gradient tensors
    against ``jax.grad`` on its own relative scale (llm.c's lesson: one global tolerance hides silent errors). The
    table of the observed errors is printed at the end of the pytest run."""
    model = gpt(GPTConfig())
    params, x, y = random_problem(model.cfg, 8, 16, seed=0)
    errors, loss_m, loss_a = per_tensor_errors(model, params, x, y)
    np.testing.assert_allclose(loss_m, loss_a, rtol=1e-13)
    assert len(errors) == 53
    rows = "\n".join(f"  {name:<24} {err:.1e}" for name, err in errors.items())
    record_property("table", "GPT (4 layers, 4 heads, n_embd 64, T 16, batch 8), float64: max |manual - jax.grad| / "
                             f"max |jax.grad| per tensor; loss {float(loss_m):.6f}\n{rows}")
    bad = {k: v for k, v in errors.items() if not v <= 1e-12}
    assert not bad, bad


@settings(max_examples=min(6, settings().max_examples))  # each drawn example compiles a new program (~3 s)
@given(n_layer=st.sampled_from([1, 2]), n_head=st.sampled_from([1, 2]), head_size=st.sampled_from([1, 3]),
       V=st.sampled_from([5, 27]), block_size=st.sampled_from([1, 3, 6]), B=st.sampled_from([1, 3]),
       dropout=st.sampled_from([0.0, 0.3]), bias=st.booleans(), tie=st.booleans(), data=st.data())
def test_backward_equals_jax_grad_float64(n_layer, n_head, head_size, V, block_size, B, dropout, bias, tie, data):
    """Drawn shapes (T = 1 and one-element heads included), random parameters, padded targets, with and without
    dropout (the same key on both sides), biases and a tied head: every tensor within 1e-10 of its own scale."""
    T = data.draw(st.integers(1, block_size))
    cfg = GPTConfig(vocab_size=V, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_head * head_size,
                    dropout=dropout, bias=bias, tie=tie)
    model = gpt(cfg)
    params, x, y = random_problem(cfg, B, T, seed=data.draw(strategies.seeds()))
    errors, loss_m, loss_a = per_tensor_errors(model, params, x, y, jax.random.key(7) if dropout else None)
    np.testing.assert_allclose(loss_m, loss_a, rtol=1e-12)
    bad = {k: v for k, v in errors.items() if not v <= 1e-10}
    assert not bad, bad


def test_nanogpts_layout_no_biases_and_a_tied_head():
    """nanoGPT's Shakespeare models (bias=False, the head tied to wte): its CPU recipe's 804,096 parameters (nanoGPT
    prints 0.80M: it leaves out the position table's 8,192); the tied table's gradient is the sum of both uses, by
    hand as by jax.grad, to 1e-12 per tensor; without the head's share it is wrong, and only there."""
    cfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False, tie=True)
    params, _ = gpt(cfg).init(jax.random.key(0))
    assert count_params(params) == 804_096 and params.lm_head is None and params.blocks[0].qkv.b is None
    small = GPTConfig(vocab_size=7, block_size=5, n_layer=2, n_head=2, n_embd=4, bias=False, tie=True)
    params, x, y = random_problem(small, 3, 5, seed=3)
    errors, loss_m, loss_a = per_tensor_errors(gpt(small), params, x, y)
    np.testing.assert_allclose(loss_m, loss_a, rtol=1e-13)
    assert len(errors) == 2 + 2 * 6 + 1 and max(errors.values()) <= 1e-12, errors
    model = gpt(small)
    untied = model.backward_fn  # the slip: the head's share of the table forgotten

    def backward(cfg, params, caches, dlogits):
        grads, act_grads = untied(dataclasses.replace(cfg, tie=False), params, caches, dlogits)
        return grads._replace(lm_head=None), act_grads

    errors, _, _ = per_tensor_errors(dataclasses.replace(model, backward_fn=backward), params, x, y)
    assert {k for k, v in errors.items() if not v <= 1e-10} == {".wte"}


@pytest.mark.parametrize("row_sum", [True, False])
def test_a_wrong_attention_backward_is_caught_per_tensor(monkeypatch, row_sum):
    """The classic slip — the softmax backward without its ``⟨att, datt⟩`` term — written into the model: the
    per-tensor check names exactly the tensors the slip reaches (below the attention), not the ones above it. With the
    term, the same rewritten backward passes (so the failure is the slip's)."""
    def attend_backward(dy, cache):
        q, k, v, att, _ = cache
        B, nh, T, hs = q.shape
        dyh = dy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
        datt = jnp.einsum("bhtd,bhsd->bhts", dyh, v)
        dv = jnp.einsum("bhts,bhtd->bhsd", att, dyh)
        centred = datt - (att * datt).sum(-1, keepdims=True) if row_sum else datt
        dpre = att * centred / np.sqrt(hs)
        return jnp.einsum("bhts,bhsd->bhtd", dpre, k), jnp.einsum("bhts,bhtd->bhsd", dpre, q), dv

    monkeypatch.setattr(G, "attend_backward", attend_backward)
    model = gpt(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=2, n_embd=4))
    params, x, y = random_problem(model.cfg, 2, 4, seed=1)
    errors, _, _ = per_tensor_errors(model, params, x, y)
    bad = {k for k, v in errors.items() if not v <= 1e-10}
    below = {".wte", ".wpe", ".blocks[0].ln1.w", ".blocks[0].ln1.b", ".blocks[0].qkv.W", ".blocks[0].qkv.b"}
    assert bad == (set() if row_sum else below)


def small_model(dropout=0.0):
    spec = REGISTRY["gpt"]
    return build_for_words(spec, WORDS, VOCAB, n_layer=2, n_head=2, n_embd=16, dropout=dropout)


def test_ten_steps_on_one_batch_manual_equals_autodiff():
    """llm.c's ``test_gpt2``: 10 AdamW steps on one fixed batch, hand-written against ``jax.grad``: the loss falls
    the same way on both, step by step (float64, to 1e-10)."""
    model = small_model()
    splits = make_splits(WORDS, model.block_size, vocab=VOCAB, per_position=True)
    x, y = (jnp.asarray(a[:8]) for a in splits.train)
    losses = llmc.ten_steps(model, x, y)
    np.testing.assert_allclose(losses["manual"], losses["autodiff"], rtol=1e-10)
    assert losses["manual"][-1] < 0.75 * losses["manual"][0]  # it learns the batch
    assert (np.diff(losses["manual"]) < 0).all()


def test_save_reload_rerun_is_bit_identical(tmp_path):
    """llm.c's determinism check: 5 steps, save the training state, 5 more; reload the save and rerun the 5: the
    same losses bit for bit, and the same samples (float32 and dropout on, as in training)."""
    model = small_model(dropout=0.2).with_gradients("manual")
    splits = make_splits(WORDS, model.block_size, vocab=VOCAB, per_position=True)
    X, Y = (jnp.asarray(a) for a in splits.train)
    losses_a, losses_b, samples_a, samples_b = llmc.save_reload_rerun(model, X, Y, REGISTRY["gpt"].train,
                                                                      tmp_path / "checkpoint.npz")
    np.testing.assert_array_equal(losses_a, losses_b)
    np.testing.assert_array_equal(samples_a, samples_b)


def test_custom_vjp_adapter_runs_jax_grad_on_the_hand_written_backward():
    """``manual_vjp``: ``jax.grad`` of an arbitrary function of the logits (not the training loss) equals plain
    autodiff; and it really runs on the model's backward — a deliberately wrong one changes the gradient."""
    model = gpt(GPTConfig(vocab_size=5, block_size=4, n_layer=2, n_head=2, n_embd=4))
    params, x, y = random_problem(model.cfg, 3, 4, seed=2)
    w = jax.random.normal(jax.random.key(9), (3, 4, 5), jnp.float64)

    def f(logits_fn, params):
        logits = logits_fn(params, (), x)
        return jnp.sum(w * jnp.tanh(logits)) + jax.nn.logsumexp(logits[:, -1]).sum()

    plain = jax.jit(jax.grad(lambda p: f(lambda p, s, x: model.apply(p, s, x, train=True)[0], p)))(params)
    adapted = jax.jit(jax.grad(lambda p: f(manual_vjp(model), p)))(params)
    for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(b))))

    def doubled(cfg, params, caches, dlogits):
        grads, act_grads = model.backward_fn(cfg, params, caches, dlogits)
        return jax.tree.map(lambda g: 2 * g, grads), act_grads

    wrong = jax.jit(jax.grad(lambda p: f(manual_vjp(dataclasses.replace(model, backward_fn=doubled)), p)))(params)
    np.testing.assert_allclose(wrong.lm_head, 2 * plain.lm_head, rtol=1e-10)


attention_forward, attention_backward = G.qkv_attention_forward, G.qkv_attention_backward


def test_attention_masked_positions_get_exactly_zero():
    """Output position t reads only positions <= t: an upstream gradient at t alone gives exactly 0 (not ~1e-17)
    at every later position of q, k and v, and the attention weights above the diagonal are exactly 0."""
    qkv = jax.random.normal(jax.random.key(0), (2, 6, 3 * 8), jnp.float64) * 3.0
    y, cache = attention_forward(qkv, 2)
    att = np.asarray(cache[1][3])
    above = att[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]]
    assert (above == 0).all(), f"{np.count_nonzero(above)} attention weights above the diagonal are not 0 (largest " \
                               f"{np.abs(above).max():.3g})"
    for t in range(6):
        dy = jnp.zeros_like(y).at[:, t].set(jax.random.normal(jax.random.key(t), (2, 8), jnp.float64))
        dqkv, _ = attention_backward(dy, cache)
        later = np.asarray(dqkv)[:, t + 1:]
        assert (later == 0).all(), f"a gradient at position {t} reaches later positions: {np.abs(later).max():.3g}"
        assert np.abs(np.asarray(dqkv)[:, :t + 1]).max() > 0


def test_a_later_token_changes_no_earlier_logit():
    """Causality of the whole model, float64, random parameters: replacing the tokens after position t changes no
    logit at positions <= t (bit for bit), and does change the logits after it."""
    cfg = GPTConfig(vocab_size=11, block_size=7, n_layer=2, n_head=2, n_embd=8)
    model = gpt(cfg)
    params, x, _ = random_problem(cfg, 3, 7, seed=3)
    apply = jax.jit(lambda x: model.apply(params, (), x, train=False)[0])  # one program for all seven calls
    logits = np.asarray(apply(x))
    for t in range(6):
        other = x.at[:, t + 1:].set((x[:, t + 1:] + 1 + t) % cfg.vocab_size)
        changed = np.asarray(apply(other))
        earlier = np.abs(changed[:, :t + 1] - logits[:, :t + 1]).max()
        assert earlier == 0, f"changing the tokens after position {t} moved an earlier logit by {earlier:.3g}"
        assert np.abs(changed[:, t + 1:] - logits[:, t + 1:]).max() > 1e-3


def test_attention_at_extremes_stays_finite():
    """T = 1 (each row fully masked but its diagonal: att = 1 exactly, dq = dk = 0) and scores of ±1e4 (one-hot
    rows): outputs and gradients finite, and equal to ``jax.vjp``'s."""
    one = jax.random.normal(jax.random.key(1), (3, 1, 12), jnp.float64)
    y, cache = attention_forward(one, 2)
    np.testing.assert_array_equal(cache[1][3], 1.0)
    np.testing.assert_allclose(y, one[..., 8:], rtol=1e-15)  # the output is the value itself
    dqkv, _ = attention_backward(jnp.ones_like(y), cache)
    assert (np.asarray(dqkv)[..., :8] == 0).all()
    big = jax.random.normal(jax.random.key(2), (2, 5, 12), jnp.float64) * 150.0  # q·k/√2 of order ±1e4
    _, cache = attention_forward(big, 2)
    scores = np.einsum("btd,bsd->bts", np.asarray(big[..., :2]), np.asarray(big[..., 6:8])) / np.sqrt(2)
    assert np.abs(scores).max() > 1e4
    for qkv in (one, big):
        y, cache = attention_forward(qkv, 2)
        dqkv, _ = attention_backward(jax.random.normal(jax.random.key(3), y.shape, jnp.float64), cache)
        assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(dqkv)).all()
    from jnnex.check import assert_backward
    assert_backward(attention_forward, attention_backward, big, 2)


def test_layernorm_backward_recomputes_from_mean_and_rstd():
    """The cache is llm.c's — the input, the gain, mean and rstd per row — not the normalised input."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 5), jnp.float64)
    _, (x_c, w_c, mean, rstd, _) = G.layernorm_forward(x, jnp.ones(5, jnp.float64), jnp.zeros(5, jnp.float64))
    assert mean.shape == rstd.shape == (2, 3, 1)
    np.testing.assert_allclose(rstd[..., 0], 1 / np.sqrt(np.var(np.asarray(x), -1) + 1e-5), rtol=1e-12)


def test_gelu_is_gpt2s_tanh_form():
    x = jnp.linspace(-6, 6, 101, dtype=jnp.float64)
    np.testing.assert_allclose(G.gelu_forward(x)[0], jax.nn.gelu(x, approximate=True), rtol=1e-14, atol=1e-300)


def test_improved_preset_settings():
    """The preset the README reports: what it changes, and that it trains (dropout on) on the hand-written
    backward."""
    model_over, train_over = REGISTRY["gpt"].presets["improved"]
    assert model_over == {"n_embd": 128, "dropout": 0.3}
    tcfg = dataclasses.replace(REGISTRY["gpt"].train, **train_over)
    assert (tcfg.optimizer, tcfg.lr, tcfg.weight_decay, tcfg.decay_mask, tcfg.boundaries, tcfg.steps) == \
        ("adamw", 1e-3, 0.1, "matrices", (30_000, 45_000), 50_000)
    model = gpt(GPTConfig(**model_over))
    assert model.stochastic and count_params(model.init(jax.random.key(0))[0]) == 802_304
    assert isinstance(model.init(jax.random.key(0))[0], GPTParams)


# ----------------------------------------------------------------------------------------------------------------------
# The transformer's own pairs (jnnex/models/gpt.py, above the model, as in llm.c's train_gpt2.c)

FIXED = {
    "token_position_embedding": (f64(5, 2), f64(4, 2), jnp.array([[1, 4, 1]], jnp.int32)),
    "layernorm": (f64(2, 3, 4), f64(4), f64(4)),
    "gelu": (f64(2, 3, 4),),
    "residual": (f64(2, 3, 4), f64(2, 3, 4)),
    "split_heads": (f64(2, 3, 12), 2),
    "attend": (f64(2, 2, 3, 2), f64(2, 2, 3, 2) * 0.5, f64(2, 2, 3, 2) * 2.0),
    "qkv_attention": (f64(2, 3, 12), 2),
    "self_attention": (f64(2, 3, 4), f64(4, 12), f64(12), f64(4, 4), f64(4), 2),
}

test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared = \
    pairs.tests(G, FIXED)


def test_nanogpts_shakespeare_presets_are_its_recipes():
    """The CPU command of nanoGPT's README and config/train_shakespeare_char.py, field by field."""
    spec = REGISTRY["gpt"]
    for name, layout, train in [
        ("shakespeare-cpu", dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
         dict(steps=2_000, batch_size=12)),
        ("shakespeare", dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
         dict(steps=5_000, batch_size=64)),
    ]:
        model_over, train_over = spec.presets[name]
        assert model_over == {**layout, "bias": False, "tie": True}
        tcfg = dataclasses.replace(spec.train, **train_over)
        assert {k: getattr(tcfg, k) for k in train} == train
        assert (tcfg.optimizer, tcfg.lr, tcfg.schedule, tcfg.warmup, tcfg.min_lr, tcfg.decay_steps, tcfg.betas,
                tcfg.weight_decay, tcfg.decay_mask, tcfg.grad_clip, tcfg.eval_iters) == \
            ("adamw", 1e-3, "cosine", 100, 1e-4, train["steps"], (0.9, 0.99), 0.1, "matrices", 1.0, 20)
    params, _ = jax.eval_shape(gpt(GPTConfig(vocab_size=65, **spec.presets["shakespeare"][0])).init,
                               jax.random.key(0))
    assert count_params(params) - 256 * 384 == 10_646_784  # nanoGPT's "10.65M" leaves out the position table
    bpe_model, bpe_train = spec.presets["shakespeare-cpu-bpe"]  # the CPU recipe on 512 BPE tokens, ~ as many weights
    assert bpe_train == spec.presets["shakespeare-cpu"][1]
    params, _ = jax.eval_shape(gpt(GPTConfig(vocab_size=512, **bpe_model)).init, jax.random.key(0))
    assert count_params(params) == 810_588 and abs(810_588 / 804_096 - 1) < 0.01


@pytest.mark.slow
def test_the_shakespeare_gpu_model_per_tensor_float64(record_property):
    """nanoGPT's GPU model (6 layers, n_embd 384, block 256, tied, no biases) at batch 1 of 256 positions, float64:
    every one of its tensors' hand-written gradients against jax.grad (dropout on, the same key both sides)."""
    cfg = GPTConfig(vocab_size=65, **REGISTRY["gpt"].presets["shakespeare"][0])
    params, x, y = random_problem(cfg, 1, 256, seed=2)
    errors, loss_m, loss_a = per_tensor_errors(gpt(cfg), params, x, y, jax.random.key(4))
    np.testing.assert_allclose(loss_m, loss_a, rtol=1e-12)
    assert len(errors) == 2 + 6 * 6 + 1
    record_property("table", "nanoGPT's Shakespeare GPT (6 x 384, T 256, batch 1, dropout 0.2), float64: worst "
                             f"tensor {max(errors, key=errors.get)} {max(errors.values()):.1e}, best "
                             f"{min(errors, key=errors.get)} {min(errors.values()):.1e} (of {len(errors)})")
    assert max(errors.values()) <= 1e-10, errors


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_the_blocks_scan_as_one_function_each_way_float64(name):
    """The blocks are one function each way, so they stack and scan: ``lax.scan`` of ``block_forward`` over the
    stacked blocks (the block's index traced: its dropout masks ``fold_in`` it) gives the forward's last activation,
    and a reverse scan of ``block_backward`` over the stacked caches gives every block's gradient the model's backward
    gives — in training, with dropout — to 1e-12. What a pipeline stage or a scanned deep model builds on."""
    import jnnex.models.llama as L

    mod = G if name == "gpt" else L
    cfg_cls, build = (GPTConfig, gpt) if name == "gpt" else (L.LlamaConfig, L.llama)
    cfg = cfg_cls(vocab_size=11, block_size=6, n_layer=3, n_head=2, n_embd=8, dropout=0.25,
                  **({} if name == "gpt" else {"n_kv_head": 1}))
    model = build(cfg)
    params = randomise(model.init(jax.random.key(0))[0], jax.random.key(1), jnp.float64)
    x = jax.random.randint(jax.random.key(2), (3, 6), 0, 11, jnp.int32)
    key = jax.random.key(3)

    @jax.jit
    def run(params, x, dlast):
        out = model.forward(params, (), x, train=True, key=key)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *params.blocks)
        h0 = out.caches.blocks[0].ln1[0] if name == "gpt" else out.caches.blocks[0].norm1[0]  # the stream in
        static = []

        def one(h, blk_i):  # a scan carries arrays: the cache's shapes and flags are kept aside (the same each step)
            blk, i = blk_i
            h, cache = mod.block_forward(cfg, blk, h, i, train=True, key=key)
            arrays, kept = partition_static(cache)
            static.append(kept)
            return h, arrays

        h, caches = jax.lax.scan(one, h0, (stacked, jnp.arange(cfg.n_layer)))
        back = lambda dh, c: mod.block_backward(dh, combine_static(c, static[0]))  # noqa: E731
        dh0, dblocks = jax.lax.scan(back, dlast, caches, reverse=True)
        dh, wanted = dlast, []  # the model's backward's block loop, from dlast at the last block, last first
        for c in reversed(out.caches.blocks):
            dh, dblk = mod.block_backward(dh, c)
            wanted.append(dblk)
        return h, out.acts[-1], dblocks, jax.tree.map(lambda *a: jnp.stack(a), *reversed(wanted)), dh0, dh

    dlast = jax.random.normal(jax.random.key(4), (3, 6, 8), jnp.float64)
    h, want_h, dblocks, want_dblocks, dh0, want_dh0 = run(params, x, dlast)
    np.testing.assert_allclose(h, want_h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dh0, want_dh0, rtol=1e-12, atol=1e-12)
    for got, want in zip(jax.tree.leaves(dblocks), jax.tree.leaves(want_dblocks), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
