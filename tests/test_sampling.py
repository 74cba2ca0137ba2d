"""Continuing a text (:func:`jnnex.lm.continue_text`): the GPT's KV cache gives the full forward's logits at every
position, past block_size too (the halves policy of the docstring); temperature, top-k and top-p filter as documented;
a seed gives the same text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jnnex.check import randomise
from jnnex.lm import continue_text, filter_logits
from jnnex.models.gpt import GPTConfig, gpt


def contexts(prompt_len: int, n_new: int, T: int) -> list[int]:
    """How many tokens each drawn token sees under the halves policy: from the prompt's length, +1 a token, back to
    T // 2 (+1) when the buffer is full."""
    out, length = [], min(prompt_len, T)
    for _ in range(n_new):
        out.append(length)
        length = T // 2 + 1 if length == T else length + 1
    return out


def problem(dtype, bias=True, tie=False, T=7):
    cfg = GPTConfig(vocab_size=11, block_size=T, n_layer=2, n_head=2, n_embd=8, bias=bias, tie=tie)
    model = gpt(cfg)
    params, state = model.init(jax.random.key(0))
    return model, randomise(params, jax.random.key(1), dtype), state


@pytest.mark.parametrize("dtype, tol, bias, tie", [(jnp.float64, 1e-12, True, False), (jnp.float64, 1e-12, False, True),
                                                   (jnp.float32, 1e-5, False, True)],
                         ids=["makemore-float64", "nanogpt-float64", "nanogpt-float32"])
def test_cached_logits_equal_the_full_forward_everywhere(dtype, tol, bias, tie):
    """30 tokens from a 3-token prompt at block size 7 (four refills): each drawn token's logits equal the full
    forward over the window the docstring says it sees."""
    model, params, state = problem(dtype, bias, tie)
    prompt, n_new, T = [1, 2, 3], 30, model.block_size
    toks, logits = continue_text(model, params, state, prompt, n_new, jax.random.key(3), n=2, with_logits=True)
    seq = np.concatenate([np.tile(prompt, (2, 1)), toks], axis=1)
    worst, full = 0.0, jax.jit(lambda window: model.apply(params, state, window, train=False)[0][:, -1])
    for s, seen in enumerate(contexts(len(prompt), n_new, T)):
        want = full(jnp.asarray(seq[:, len(prompt) + s - seen : len(prompt) + s]))  # (B, V)
        worst = max(worst, float(jnp.abs(logits[s] - want).max() / jnp.abs(want).max()))
    assert worst <= tol, worst
    assert max(contexts(len(prompt), n_new, T)) == T and min(contexts(len(prompt), n_new, T)[5:]) == T // 2 + 1


def test_without_the_cache_the_window_slides_by_one():
    model, params, state = problem(jnp.float64)
    prompt, n_new, T = [4, 5, 6], 30, model.block_size
    toks, logits = continue_text(model, params, state, prompt, n_new, jax.random.key(5), n=2, with_logits=True,
                                 cache=False)
    seq = np.concatenate([prompt, toks[0]])
    full = jax.jit(lambda window: model.apply(params, state, window, train=False)[0][0, -1])
    for s in range(n_new):
        end = len(prompt) + s
        want = full(jnp.asarray(seq[max(0, end - T) : end])[None])
        np.testing.assert_allclose(logits[s, 0], want, rtol=1e-12, atol=1e-12)


# The calls below share the compiled programs of the tests above (the same static arguments: n = 2, logits kept).


def test_a_seed_gives_the_same_text_and_the_cache_the_same_tokens_before_it_slides():
    model, params, state = problem(jnp.float64)
    kw = dict(n=2, with_logits=True)
    a = continue_text(model, params, state, [1, 2, 3], 30, jax.random.key(9), **kw)[0]
    assert (a == continue_text(model, params, state, [1, 2, 3], 30, jax.random.key(9), **kw)[0]).all()
    assert not (a == continue_text(model, params, state, [1, 2, 3], 30, jax.random.key(10), **kw)[0]).all()
    b = continue_text(model, params, state, [1, 2, 3], 30, jax.random.key(9), cache=False, **kw)[0]
    full = model.block_size - 3  # the prompt's 3 tokens, then the same context until the buffer is full
    assert (a[:, :full] == b[:, :full]).all()


@given(logits=st.lists(st.floats(-5, 5), min_size=6, max_size=6), top_p=st.floats(0.01, 1.0),
       top_k=st.sampled_from([None, 1, 3, 6]))
def test_filters_keep_what_the_docstring_says(logits, top_p, top_k):
    x = np.asarray(logits, np.float32)
    got = np.asarray(filter_logits(jnp.asarray(x)[None], jnp.float32(0.5), top_k, jnp.float32(top_p)))[0]
    kept = np.isfinite(got)
    z = x / 0.5
    order = np.argsort(-z, kind="stable")
    allowed = order[: top_k or 6]
    p = np.exp(z[allowed] - z[allowed].max())
    p /= p.sum()
    n_keep = int(np.searchsorted(np.cumsum(p) - p, top_p, side="left"))  # ranks whose mass before them < top_p
    # (ties between equal logits may be ordered either way: compare the kept values, not the indices)
    assert sorted(z[kept].tolist()) == sorted(z[allowed[:max(n_keep, 1)]].tolist())
    np.testing.assert_allclose(got[kept], z[kept], rtol=1e-6)
    assert kept[np.argmax(z)]  # the most likely token always stays


def test_greedy_is_the_argmax():
    """top_p near 0 keeps the most likely token alone (top_k=1 likewise: test_filters_keep_what_the_docstring_says)."""
    model, params, state = problem(jnp.float64)
    toks, logits = continue_text(model, params, state, [2, 3, 4], 30, jax.random.key(0), n=2, top_p=1e-6,
                                 with_logits=True)
    np.testing.assert_array_equal(toks.T, np.argmax(logits, axis=-1))


def test_bad_sampling_input_is_named():
    model, params, state = problem(jnp.float32)
    for kwargs, message in [({"top_p": 0.0}, r"top_p must be in \(0, 1\]"), ({"top_k": 12}, r"top_k must be"),
                            ({"temperature": 0.0}, "temperature must be > 0")]:
        with pytest.raises(ValueError, match=message):
            continue_text(model, params, state, [1], 3, jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="the prompt is empty"):
        continue_text(model, params, state, [], 3, jax.random.key(0))
    with pytest.raises(ValueError, match=r"token ids outside the vocabulary \[0, 11\)"):
        continue_text(model, params, state, [11], 3, jax.random.key(0))
