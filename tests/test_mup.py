"""μP for the GPT (``param="mup"``, ``base_width``): at its base width it is the standard model to the bit; wider, its
hand-written gradients equal ``jax.grad`` per tensor in float64, its KV-cache decode equals its forward, its learning
rates are Adam's times the multipliers; and the coordinate check — flat under μP, growing under the standard
parametrisation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jnnex.data import Vocab, load_words, make_splits
from jnnex.lm import manual_gradients
from jnnex.models.gpt import GPTConfig, gpt
from jnnex.optim import TrainConfig, make_optimizer
from jnnex.scale import coord_check


def tiny(**kw):
    return gpt(GPTConfig(**{"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16, **kw}))


def batch(V=11, B=4, T=8):
    return (jax.random.randint(jax.random.key(1), (B, T), 0, V), jax.random.randint(jax.random.key(2), (B, T), -1, V))


@pytest.mark.parametrize("tie", [False, True])
def test_mup_at_its_base_width_is_the_standard_model_to_the_bit(tie):
    standard, mup = tiny(tie=tie), tiny(tie=tie, param="mup", base_width=16)
    p_s, p_m = (m.init(jax.random.key(0))[0] for m in (standard, mup))
    for a, b in zip(jax.tree.leaves(p_s), jax.tree.leaves(p_m)):
        np.testing.assert_array_equal(a, b)
    x, y = batch()
    g_s, g_m = (manual_gradients(m, p_s, (), x, y) for m in (standard, mup))
    assert float(g_s.loss) == float(g_m.loss)
    for a, b in zip(jax.tree.leaves(g_s.grads), jax.tree.leaves(g_m.grads)):
        np.testing.assert_array_equal(a, b)
    assert mup.lr_scale_fn(mup.cfg, p_m) is None  # no multipliers: the optimiser is the standard one
    assert type(make_optimizer(TrainConfig(optimizer="adam"), mup)) is type(make_optimizer(TrainConfig(
        optimizer="adam")))


@pytest.mark.parametrize("tie", [False, True])
def test_wider_mup_gradients_by_hand_equal_jax_grad_per_tensor_in_float64(tie):
    """Four times the base width: the attention's √hs₀/hs and the readout's 1/r are in the forward, and in the
    hand-written backward."""
    model = tiny(tie=tie, n_embd=32, param="mup", base_width=8)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0))[0])
    x, y = batch()
    (loss, _), want = jax.jit(jax.value_and_grad(model.objective, has_aux=True))(params, (), x, y)
    got = jax.jit(lambda p: manual_gradients(model, p, (), x, y))(params)  # (each one program, not op by op)
    np.testing.assert_allclose(got.loss, loss, rtol=1e-14)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got.grads)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12, err_msg=jax.tree_util.keystr(path))


def test_mup_initialises_the_hidden_matrices_1_over_sqrt_r_and_decodes_as_it_trains():
    wide, base = tiny(n_embd=64, param="mup", base_width=16), tiny(n_embd=64)
    p_w, p_b = (m.init(jax.random.key(0))[0] for m in (wide, base))
    np.testing.assert_allclose(p_w.blocks[0].qkv.W, p_b.blocks[0].qkv.W / 2, rtol=1e-6)  # r = 4: std / √4
    np.testing.assert_array_equal(p_w.wte, p_b.wte)  # the embeddings and the readout keep GPT-2's 0.02
    np.testing.assert_array_equal(p_w.lm_head, p_b.lm_head)
    x = jax.random.randint(jax.random.key(3), (2, 8), 0, 11)
    full = wide.apply(p_w, (), x, train=False)[0]
    _, cache = wide.prefill_fn(wide.cfg, p_w, x)
    for pos in (0, 5):
        step, _ = wide.decode_fn(wide.cfg, p_w, cache, x[:, pos], pos)
        np.testing.assert_allclose(step, full[:, pos], rtol=1e-5, atol=1e-6)


def test_mup_trains_the_hidden_matrices_at_1_over_r_the_learning_rate():
    """One Adam step from the same gradients: the blocks' matrices move 1/r as far as Adam alone moves them; the
    embeddings, gains, biases and readout as far."""
    model = tiny(n_embd=32, param="mup", base_width=8)
    params = model.init(jax.random.key(0))[0]
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    tcfg = TrainConfig(optimizer="adam", lr=1e-2, lr_boundaries=())
    with jax.numpy_dtype_promotion("standard"):
        plain = make_optimizer(tcfg)
        mup = make_optimizer(tcfg, model)
        u_plain, _ = plain.update(grads, plain.init(params), params)
        u_mup, _ = mup.update(grads, mup.init(params), params)
    np.testing.assert_allclose(u_mup.blocks[1].fc.W, u_plain.blocks[1].fc.W / 4, rtol=1e-6)
    np.testing.assert_array_equal(u_mup.blocks[1].fc.b, u_plain.blocks[1].fc.b)
    np.testing.assert_array_equal(u_mup.wte, u_plain.wte)
    np.testing.assert_array_equal(u_mup.lm_head, u_plain.lm_head)


def test_the_coordinate_check_is_flat_under_mup_and_grows_under_the_standard_parametrisation():
    """Widths 32 … 256 (8×), 5 Adam steps at 3e-3 on one batch of names: the log–log slope of every block's output
    and of the logits against width within ±0.1 under μP (base width 32); the standard parametrisation's blocks
    grow faster than linearly (measured: slopes 1.6–1.7, the logits' 0.7)."""
    words = load_words("census-first")
    X, Y = make_splits(words, 16, vocab=Vocab.from_words(words), per_position=True).train
    x, y = jnp.asarray(X[:32]), jnp.asarray(Y[:32])
    slopes = {}
    for param in ("standard", "mup"):
        def build(width, param=param):
            return gpt(GPTConfig(vocab_size=27, block_size=16, n_layer=2, n_head=4, n_embd=width, param=param,
                                 base_width=32 if param == "mup" else None)).with_gradients("manual")

        slopes[param] = coord_check(build, [32, 64, 128, 256], x, y, steps=5, lr=3e-3)["slopes"]
    assert all(abs(s) <= 0.1 for s in slopes["mup"].values()), slopes
    assert all(slopes["standard"][f"block {i}"] > 1 for i in range(2)), slopes


@pytest.mark.parametrize("over, message", [
    ({"param": "ntk"}, r"param must be one of \('standard', 'mup'\), got 'ntk'"),
    ({"base_width": 8}, "base_width is μP's base: give param mup too"),
    ({"param": "mup", "base_width": 7}, r"base_width \(7\) must be divisible by n_head \(2\)"),
    ({"param": "mup", "base_width": 0}, "base_width must be an integer >= 1"),
])
def test_bad_parametrisations_are_named(over, message):
    with pytest.raises(ValueError, match=message):
        tiny(**over)


def test_the_scale_updates_transform_keeps_no_state():
    from jnnex.optim import scale_updates
    t = scale_updates(lambda tree: jax.tree.map(lambda _: 0.5, tree))
    assert t.init({"a": jnp.ones(3)}) == optax.EmptyState()
    u, _ = t.update({"a": jnp.ones(3)}, optax.EmptyState())
    np.testing.assert_array_equal(u["a"], 0.5 * np.ones(3))


@pytest.mark.parametrize("attention", ["plain", "tiled"])
def test_the_llama_under_mup_base_equals_standard_and_its_gradients_by_hand_equal_jax_grad(attention):
    """The Llama: at its base width the standard model to the bit; at 4× it (plain or tiled attention, the tiled
    pair carrying μP's scale too) its hand-written gradients equal ``jax.grad`` per tensor in float64."""
    from jnnex.models.llama import LlamaConfig, llama
    kw = {"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 2, "n_kv_head": 1, "attention": attention,
          "tile": 4}
    std, base = llama(LlamaConfig(n_embd=16, **kw)), llama(LlamaConfig(n_embd=16, param="mup", base_width=16, **kw))
    x, y = batch()
    p = std.init(jax.random.key(0))[0]
    a, b = manual_gradients(std, p, (), x, y), manual_gradients(base, p, (), x, y)
    for u, v in zip(jax.tree.leaves(a.grads), jax.tree.leaves(b.grads)):
        np.testing.assert_array_equal(u, v)
    wide = llama(LlamaConfig(n_embd=32, param="mup", base_width=8, **kw))
    params = jax.tree.map(lambda t: t.astype(jnp.float64), wide.init(jax.random.key(0))[0])
    (_, _), want = jax.jit(jax.value_and_grad(wide.objective, has_aux=True))(params, (), x, y)
    got = jax.jit(lambda p: manual_gradients(wide, p, (), x, y))(params)  # (each one program, not op by op)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got.grads)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="param mup with n_expert is not supported yet"):
        LlamaConfig(param="mup", n_expert=4)
