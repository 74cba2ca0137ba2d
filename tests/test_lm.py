"""The language-model contract (:mod:`jnnex.lm`) where a model meets it: one forward signature for every model, and
sampling — past the block size too — equal to the plainest loop a reader would write."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnex.check import randomise
from jnnex.data import Vocab, load_words
from jnnex.lm import generate
from jnnex.models.registry import REGISTRY, build_for_words

WORDS = load_words("census-first")[:200]
VOCAB = Vocab.from_words(WORDS)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_forward_takes_key_none(name):
    """One signature, ``forward(cfg, params, state, x, train, key=None)``: a model without random layers ignores
    the key, so the contract never asks which kind a model is."""
    spec = REGISTRY[name]
    model = spec.build(spec.config())
    assert inspect.signature(model.forward_fn).parameters["key"].default is None
    params, state = model.init(jax.random.key(0))
    x = jnp.zeros((2, model.block_size), jnp.int32)
    a = model.forward(params, state, x, train=False).logits
    b = model.forward(params, state, x, train=False, key=jax.random.key(3)).logits
    np.testing.assert_array_equal(a, b)


def reference_sample(model, params, state, key, n, max_len):
    """The sampler as a reader would write it: keep the whole sequence, feed the model its last ``block_size``
    tokens (a window model: left-padded with start tokens; a per-position model: from the start token, padded after,
    reading the prediction at the last token), draw with ``fold_in(key, t)``; a finished word emits 0."""
    T = model.block_size
    seqs = [[0] for _ in range(n)] if model.per_position else [[0] * T for _ in range(n)]
    done = np.zeros(n, bool)
    out = []
    for t in range(max_len):
        ctx = [s[-T:] for s in seqs]  # crop to the context the model takes
        x = np.zeros((n, T), np.int32)
        for i, c in enumerate(ctx):
            x[i, : len(c)] = c
        logits, _ = model.apply(params, state, jnp.asarray(x), train=False)
        if model.per_position:
            logits = logits[:, len(ctx[0]) - 1]  # (n, V): the prediction after the last token read
        tok = np.asarray(jax.random.categorical(jax.random.fold_in(key, t), logits.astype(jnp.float32) / 1.0, axis=-1))
        tok = np.where(done, 0, tok)
        done |= tok == 0
        for s, k in zip(seqs, tok):
            s.append(int(k))
        out.append(tok)
    return np.stack(out, axis=1)  # (n, max_len)


# The sampler is the same code for every model of a kind; these are models whose random predictions depend on the
# whole context (a small random GPT's hardly do: each row's own token and position dominate), so that a context built
# wrongly changes the tokens drawn.
@pytest.mark.parametrize("name, settings", [("rnn", {"block_size": 4}), ("gru", {"block_size": 4}),
                                            ("bow", {"block_size": 4}), ("wavenet-conv", {"block_size": 4}),
                                            ("mlp", {})])
def test_sampling_past_the_block_size_equals_a_plain_loop(name, settings):
    """Words longer than the context (a per-position model of block size 4 writing 16 tokens, 64 at once): the
    compiled sampler's tokens equal the reference loop's, which slides the context along once it is full. Parameters randomised so that
    every prediction depends on its context."""
    model = build_for_words(REGISTRY[name], WORDS, VOCAB, **settings)
    params, state = model.init(jax.random.key(0))
    params = jax.tree.map(lambda p: p * 3.0, randomise(params, jax.random.key(1), jnp.float32, scale=1.0))
    key = jax.random.key(2)
    got = generate(model, params, state, key, 64, max_len=16)
    want = reference_sample(model, params, state, key, 64, 16)
    assert (want[:, model.block_size:] != 0).any(), "the reference never wrote past the block size"
    np.testing.assert_array_equal(got, want)
