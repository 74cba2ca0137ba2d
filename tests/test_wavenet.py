"""The WaveNet tree and its convolutional form (makemore part 5): the lecture's sizes, the hand-written backwards
against jax.grad in float64 over drawn shapes, and the two forms agreeing at every position in eval mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pairs
import jnnex.models.wavenet as wn
from jnnex import strategies
from jnnex.check import assert_model_gradients, randomise
from jnnex.data import Vocab, build_sequences, build_windows, load_words
from jnnex.lm import count_params
from pairs import f64
from jnnex.models.wavenet import WaveNetConfig, WaveNetConvConfig, wavenet, wavenet_conv

WORDS = load_words("census-first")[:40]
VOCAB = Vocab.from_words(WORDS)


def test_gated_levels_are_twice_as_wide_before_the_gate():
    model = wavenet(WaveNetConfig(gated=True))
    params, state = model.init(jax.random.key(0))
    assert [lv.W.shape for lv in params.levels] == [(48, 256), (256, 256), (256, 256)]
    assert state[0].mean.shape == (256,)
    out = model.forward(params, state, jnp.zeros((3, 8), jnp.int32), train=True)
    assert [a.shape for a in out.acts] == [(3, 4, 128), (3, 2, 128), (3, 1, 128)]


def test_the_lecture_network_has_76579_parameters():
    params, state = wavenet().init(jax.random.key(0))
    assert count_params(params) == 76_579
    assert [lv.W.shape for lv in params.levels] == [(48, 128), (256, 128), (256, 128)]
    assert all(lv.b is None for lv in params.levels) and params.out.W.shape == (128, 27)
    assert len(state) == 3 and all(s.mean.shape == (128,) for s in state)


def test_init_is_the_lectures():
    params, _ = wavenet(WaveNetConfig(n_hidden=512)).init(jax.random.key(1))
    assert abs(float(params.C.std()) - 1.0) < 0.05  # embeddings N(0, 1)
    for lv, fan_in in zip(params.levels, (48, 1024, 1024)):
        assert abs(float(lv.W.std()) * fan_in**0.5 - 1.0) < 0.05  # N(0, 1/fan_in), gain 1
    assert abs(float(params.out.W.std()) * 512**0.5 - 0.1) < 0.01 and not np.asarray(params.out.b).any()


@pytest.mark.parametrize("T", [2, 4, 8, 16, 32])
def test_any_power_of_two_is_a_tree_of_log2_levels(T):
    """Deeper than three levels works (makemore's squeeze at T' = 1 broke it): log2(T) levels, each
    (B, T/2^(l+1), H)."""
    model = wavenet(WaveNetConfig(block_size=T, n_embd=3, n_hidden=5))
    params, state = model.init(jax.random.key(0))
    out = model.forward(params, state, jnp.zeros((4, T), jnp.int32), train=True)
    assert out.logits.shape == (4, 27)
    assert [a.shape for a in out.acts] == [(4, T // 2 ** (i + 1), 5) for i in range(T.bit_length() - 1)]


@pytest.mark.parametrize("T", [1, 3, 6, 12, 0, -8])
def test_a_block_size_that_is_not_a_power_of_two_is_a_clear_error(T):
    with pytest.raises(ValueError, match="block_size must be (a power of two|an integer >= 1)"):
        WaveNetConfig(block_size=T)
    with pytest.raises(ValueError, match="context must be a power of two"):
        WaveNetConvConfig(context=T)


def test_wrong_window_is_a_clear_error():
    model = wavenet()
    params, state = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 8\)"):
        model.forward(params, state, jnp.zeros((2, 3), jnp.int32), train=False)


# ----------------------------------------------------------------------------------------------------------------------
# The hand-written backwards, against jax.grad in float64


@st.composite
def problems(draw, conv: bool):
    """A drawn WaveNet (tree or convolutional; tanh or gated; with or without dropout) with random parameters (γ/β
    and the output bias not 1/0), random running statistics, a batch and a dropout key; the convolutional one on
    padded words of 6 positions with ignored targets after words of 1 to 6."""
    T = draw(st.sampled_from([2, 4, 8, 16]))
    widths = dict(n_embd=draw(st.sampled_from([2, 5])), n_hidden=draw(st.sampled_from([3, 8])),
                  vocab_size=draw(st.sampled_from([5, 27])), gated=draw(st.booleans()),
                  dropout=draw(st.sampled_from([0.0, 0.3])))
    B = draw(strategies.batch_sizes(max_size=8))
    seed = draw(strategies.seeds())
    k = jax.random.split(jax.random.key(seed), 3)
    if conv:  # words of 6 positions; one-position words are test_conv_backward_on_one_character_words's
        model = wavenet_conv(WaveNetConvConfig(context=T, block_size=6, **widths))
    else:
        model = wavenet(WaveNetConfig(block_size=T, **widths))
    params, state = model.init(k[0])
    params = randomise(params, k[1], jnp.float64)
    state = tuple(s._replace(var=jnp.abs(s.var) + 0.5) for s in randomise(state, k[2], jnp.float64, scale=0.2))
    rng = np.random.default_rng(seed)
    V, S = widths["vocab_size"], model.block_size
    x = rng.integers(0, V, (B, S)).astype(np.int32)
    if conv:
        y = rng.integers(0, V, (B, S)).astype(np.int32)
        lengths = rng.integers(1, S + 1, B)
        y[np.arange(S)[None, :] >= lengths[:, None]] = -1  # the tail after each word is ignored
    else:
        y = rng.integers(0, V, (B,)).astype(np.int32)
    return model, params, state, jnp.asarray(x), jnp.asarray(y), jax.random.key(seed + 1)


def assert_manual_equals_jax_grad(model, params, state, x, y, key):
    """The same dropout masks on both sides (one key): the hand-written gradients equal jax.grad's."""
    assert_model_gradients(model, params, state, x, y, key)


@given(problems(conv=False))
def test_tree_backward_equals_jax_grad_float64(problem):
    assert_manual_equals_jax_grad(*problem)


@given(problems(conv=True))
def test_conv_backward_equals_jax_grad_float64(problem):
    assert_manual_equals_jax_grad(*problem)


@pytest.mark.parametrize("context", [2, 4])
def test_conv_backward_on_one_character_words(context):
    """Sequences of length 1 (only the start token is read). Kept to short contexts on purpose: with context 16 and
    one real position, 15 of every 16 rows BatchNorm pools at the first level are the same start-token pair, so dC[0]
    is a cancellation of terms 1e10-1e13 times larger than itself (measured) and both backwards return rounding
    noise there; comparing noise proves nothing."""
    model = wavenet_conv(WaveNetConvConfig(context=context, block_size=1, vocab_size=5, n_embd=2, n_hidden=3))
    for seed in range(3):
        k = jax.random.split(jax.random.key(seed), 4)
        params, state = model.init(k[0])
        params = randomise(params, k[1], jnp.float64)
        state = jax.tree.map(lambda s: s.astype(jnp.float64), state)
        x, y = (jax.random.randint(kk, (8, 1), 0, 5, dtype=jnp.int32) for kk in k[2:])
        assert_manual_equals_jax_grad(model, params, state, x, y, None)


def test_conv_ignored_targets_get_no_gradient():
    """Inputs after a word's end only reach ignored predictions through BatchNorm's statistics (the documented
    train-mode difference); in eval mode they reach nothing: changing them changes no gradient of the loss."""
    model = wavenet_conv(WaveNetConvConfig(block_size=8, n_embd=3, n_hidden=4))
    params, state = model.init(jax.random.key(0))
    params = randomise(params, jax.random.key(1), jnp.float64)
    state = jax.tree.map(lambda s: s.astype(jnp.float64), state)
    x, y = (jnp.asarray(a) for a in build_sequences(WORDS[:6], VOCAB, 8))
    assert (y == -1).any()
    x_other = jnp.where(y == -1, (x + 3) % VOCAB.size, x)

    def eval_loss(p, x):
        return model.loss(p, state, x, y, train=False)[0]

    grad = jax.jit(jax.grad(eval_loss))  # one program for both calls
    g, g_other = grad(params, x), grad(params, x_other)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_other)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------------------
# The convolutional form is the tree at every position


def trained_looking(T, seed=0):
    """A tree and its convolutional form sharing random parameters and running statistics (float64)."""
    tree = wavenet(WaveNetConfig(block_size=T, vocab_size=VOCAB.size, n_embd=4, n_hidden=6))
    conv = wavenet_conv(WaveNetConvConfig(context=T, block_size=16, vocab_size=VOCAB.size, n_embd=4, n_hidden=6))
    params, state = tree.init(jax.random.key(seed))
    params = randomise(params, jax.random.key(seed + 1), jnp.float64, scale=1.0)
    state = tuple(s._replace(mean=s.mean + 0.3, var=s.var * 2.0) for s in
                  jax.tree.map(lambda a: a.astype(jnp.float64), state))
    return tree, conv, params, state


def test_conv_init_is_the_trees():
    tree, conv, _, _ = trained_looking(8)
    for a, b in zip(jax.tree.leaves(tree.init(jax.random.key(3))), jax.tree.leaves(conv.init(jax.random.key(3)))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("T", [2, 8, 16])
def test_eval_mode_conv_equals_the_tree_at_every_position(T):
    """Every predicted character of every word, first positions included: the convolution's logits at position t
    are the tree's on the window ending at t (start tokens before the word), to 1e-12."""
    tree, conv, params, state = trained_looking(T)
    words = [w for w in WORDS if len(w) < 16][:25]
    Xw, _ = build_windows(words, VOCAB, T)  # (N, T): len + 1 windows per word, in order
    Xs, Ys = build_sequences(words, VOCAB, 16)  # (W, 16) words, -1 after each end
    tree_logits = np.asarray(tree.apply(params, state, jnp.asarray(Xw), train=False)[0])  # (N, V)
    conv_logits = np.asarray(conv.apply(params, state, jnp.asarray(Xs), train=False)[0])  # (W, 16, V)
    picked = conv_logits[np.asarray(Ys) >= 0]  # the predicted positions, word by word: (N, V)
    assert picked.shape == tree_logits.shape
    np.testing.assert_allclose(picked, tree_logits, rtol=0, atol=1e-12 * np.abs(tree_logits).max())


def test_train_mode_is_a_different_model():
    """In train mode the convolution's BatchNorm pools over every position of the padded words, the tree's over its
    windows' nodes: the same parameters give different predictions (and running statistics)."""
    tree, conv, params, state = trained_looking(8)
    words = WORDS[:8]
    Xw, _ = build_windows(words, VOCAB, 8)
    Xs, Ys = build_sequences(words, VOCAB, 16)
    t_logits, t_state = tree.apply(params, state, jnp.asarray(Xw), train=True)
    c_logits, c_state = conv.apply(params, state, jnp.asarray(Xs), train=True)
    assert np.abs(np.asarray(c_logits)[np.asarray(Ys) >= 0] - np.asarray(t_logits)).max() > 1e-3
    assert np.abs(np.asarray(c_state[0].mean) - np.asarray(t_state[0].mean)).max() > 1e-6


def test_lecture_sizes_on_names_txt(names_txt):
    from jnnex.data import make_splits

    words = load_words(names_txt)
    splits = make_splits(words, 8)
    assert [len(s[0]) for s in (splits.train, splits.dev, splits.test)] == [182_625, 22_655, 22_866]


def test_dropout_needs_a_key_in_training_and_nothing_in_eval():
    model = wavenet(WaveNetConfig(dropout=0.5, n_embd=3, n_hidden=4))
    assert model.stochastic
    params, state = model.init(jax.random.key(0))
    x = jnp.zeros((4, 8), jnp.int32)
    with pytest.raises(ValueError, match="needs a key"):
        model.forward(params, state, x, train=True)
    a = model.apply(params, state, x, train=False)[0]
    np.testing.assert_array_equal(a, wavenet(WaveNetConfig(n_embd=3, n_hidden=4)).apply(params, state, x,
                                                                                          train=False)[0])
    t1, t2 = (model.forward(params, state, x, train=True, key=jax.random.key(k)).logits for k in (1, 2))
    assert not np.allclose(t1, t2)  # a different mask per key


@pytest.mark.slow
def test_improved_preset_trains_on_its_hand_written_backward(tmp_path, capsys):
    """The preset's gated, dropout-regularised net through the command line, on the manual backward."""
    import json

    from jnnex.cli import main

    data = tmp_path / "words.txt"
    data.write_text("\n".join(WORDS) + "\n")
    assert main(["train", "--model", "wavenet", "--preset", "improved", "--data", str(data), "--backward", "manual",
                 "--steps", "20", "--out", str(tmp_path / "run"), "--json"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["dev_loss"])
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model_config"]["gated"] and cfg["model_config"]["dropout"] == 0.1
    assert cfg["train_config"]["optimizer"] == "adamw" and cfg["backward"] == "manual"


def test_dropout_runs_resume_exactly():
    """Each step's dropout key depends on the step number alone: 20 steps in one call draw the masks of 10 + 10 (what
    makes a resumed run of a stochastic model equal an unbroken one; `fit` resumes with the same compiled chunk, so
    bit-identically — here the 20- and 10-step programs differ, and float32 rounding with them, in the last bit)."""
    from jnnex.optim import TrainConfig, make_optimizer
    from jnnex.train import init_train_state, make_run, make_step

    model = wavenet(WaveNetConfig(vocab_size=VOCAB.size, n_embd=3, n_hidden=4, dropout=0.5)).with_gradients("manual")
    X, Y = (jnp.asarray(a) for a in build_windows(WORDS, VOCAB, 8))
    opt = make_optimizer(TrainConfig(optimizer="adamw", lr=1e-2))
    run = make_run(make_step(model, opt), 16)
    ts = init_train_state(model, opt, jax.random.key(0))
    whole, _ = run(ts, X, Y, jax.random.key(1), 20)
    half, _ = run(ts, X, Y, jax.random.key(1), 10)
    cut, _ = run(half, X, Y, jax.random.key(1), 10)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(cut)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # other masks would move them by ~1e-2 (below)
    other, _ = run(ts, X, Y, jax.random.key(2), 20)
    assert np.abs(np.asarray(other.params.C) - np.asarray(whole.params.C)).max() > 1e-3


@pytest.mark.parametrize("conv", [False, True])
def test_running_statistics_count_every_position(conv):
    """One train-mode forward's new running statistics, against numpy from scratch: level 0's pre-BatchNorm
    activations are each pair of neighbouring embeddings times W (the tree pairs positions 2t, 2t+1; the convolution
    every t, t+1 of the word left-padded with start tokens), and the statistics run over every one of the B·T' rows —
    the variance Bessel-corrected over B·T' numbers, not B."""
    cfg = (WaveNetConvConfig if conv else WaveNetConfig)(vocab_size=7, n_embd=3, n_hidden=5, **(
        {"block_size": 6, "context": 8} if conv else {"block_size": 8}))
    model = (wavenet_conv if conv else wavenet)(cfg)
    params, state = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 7, (4, 6 if conv else 8)).astype(np.int32)
    new_state = model.apply(params, state, jnp.asarray(x), train=True)[1]
    C, W = np.asarray(params.C, np.float64), np.asarray(params.levels[0].W, np.float64)
    if conv:
        e = C[np.concatenate([np.zeros((4, 7), np.int32), x], axis=1)]  # (B, 13, 3)
        pairs = np.concatenate([e[:, :-1], e[:, 1:]], axis=-1)  # (B, 12, 6): every neighbouring pair
    else:
        e = C[x]  # (B, 8, 3)
        pairs = np.concatenate([e[:, 0::2], e[:, 1::2]], axis=-1)  # (B, 4, 6): positions 2t, 2t+1
    h = (pairs @ W).reshape(-1, 5)  # (B·T', H)
    assert h.shape[0] == 4 * (12 if conv else 4)
    np.testing.assert_allclose(new_state[0].mean, 0.1 * h.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_state[0].var, 0.9 + 0.1 * h.var(0, ddof=1), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# The WaveNet's own pairs (jnnex/models/wavenet.py, above its forward)

FIXED = {
    "gated_tanh": (f64(4, 6),),
    "flatten_consecutive": (f64(2, 4, 3), 2),
    "causal_conv": (f64(2, 5, 3), f64(6, 4), 2),
}

test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared = \
    pairs.tests(wn, FIXED)


def test_causal_conv_is_the_tree_at_every_position():
    """Stacked kernel-2 convolutions with dilations 1, 2, 4 give at output t the tree's pairing of inputs t .. t+7
    (flatten pairs, the same weight), for every t: the tree is the convolution sampled every 2^l-th position."""
    x, Ws = f64(3, 12, 2), [f64(4, 5), f64(10, 5) * 0.5, f64(10, 5) * 0.3]
    h = x
    for level, W in enumerate(Ws):
        h = jnp.tanh(wn.causal_conv_forward(h, W, 2**level)[0])  # (3, 12 - (2^(l+1) - 1), 5)
    assert h.shape == (3, 5, 5)
    for t in range(5):
        tree = x[:, t : t + 8]
        for W in Ws:
            tree = jnp.tanh(wn.flatten_consecutive_forward(tree, 2)[0] @ W)
        np.testing.assert_allclose(h[:, t], tree[:, 0], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape, n", [((2, 3, 4), 2), ((2, 8), 2)])
def test_flatten_consecutive_needs_a_divisible_length(shape, n):
    with pytest.raises(ValueError, match="divisible"):
        wn.flatten_consecutive_forward(jnp.zeros(shape), n)


@pytest.mark.parametrize("dilation", [0, 5, 2.0])
def test_causal_conv_dilation_must_fit(dilation):
    with pytest.raises(ValueError, match="dilation"):
        wn.causal_conv_forward(f64(2, 5, 3), f64(6, 4), dilation)
