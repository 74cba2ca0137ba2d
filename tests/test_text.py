"""A text as a token stream (:mod:`jnnex.text`): reading in pieces, nanoGPT's split, the character tokenizer, the
exact windows (every token scored once, with the context the docstring promises) against a one-prediction-at-a-time
loop, the estimate, token files, and the batches the jitted step draws."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jnnex import text
from jnnex.lm import evaluate
from jnnex.models.gpt import GPTConfig, gpt
from jnnex.optim import TrainConfig, lr_schedule
from jnnex.train import TrainState, fit, make_run


def test_chars_encode_decode_and_name_what_is_missing():
    tok = text.Chars.from_text("hello world")
    assert tok.chars == " dehlorw" and tok.decode(tok.encode("world hello")) == "world hello"
    with pytest.raises(ValueError, match=r"2 character\(s\) of the text are not in the vocabulary of 8 characters: "
                                         r"'RZ'"):
        tok.encode("ZeRo")
    with pytest.raises(ValueError, match=r"token id 8 is outside the vocabulary \(0 .. 7\)"):
        tok.decode([8])
    with pytest.raises(ValueError, match="sorted"):
        text.Chars("ba")


def test_reading_in_pieces_gives_the_file_back(tmp_path):
    body = "".join(f"line {i} é 👋\n" for i in range(5000)) + "no newline at the end"
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())  # with a byte-order mark, which is not text
    pieces = list(text.read_pieces(path, piece=1000))
    assert "".join(pieces) == body and len(pieces) > 50
    assert all(p.endswith("\n") for p in pieces[:-1])  # cut at line ends
    cut = 12_345
    a, b = text.split_pieces(path, cut)
    assert "".join(a) == body[:cut] and "".join(b) == body[cut:]


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"ab\xffcd\n", r"is not valid UTF-8 \(invalid start byte at byte 2"),
])
def test_a_bad_text_file_is_named(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"data file '{path}' {message}"):
        text.read_text(path)
    with pytest.raises(ValueError, match="is a directory"):
        text.read_text(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        text.read_text(tmp_path / "none.txt")


def test_tiny_shakespeare_splits_as_nanogpt(shakespeare_txt, names_txt):
    """nanoGPT's prepare.py: 65 characters, first 90 % train (1,003,854), last 10 % val (111,540)."""
    cut = text.split_point(shakespeare_txt)
    tok = text.Chars.from_text(text.read_pieces(shakespeare_txt))
    train, val = text.encode_streams(shakespeare_txt, tok, cut)
    assert (tok.vocab_size, len(train.tokens), len(val.tokens)) == (65, 1_003_854, 111_540)
    assert train.tokens.dtype == np.uint16 and tok.decode(val.tokens[:6]) == "?\n\nGRE"
    assert text.corpus_kind(shakespeare_txt) == "text" and text.corpus_kind(names_txt) == "words"


@given(n=st.integers(2, 40), T=st.integers(1, 9), data=st.data())
def test_exact_windows_score_every_token_once_with_the_promised_context(n, T, data):
    """Every prediction j (the target tokens[j + 1]) is scored exactly once, from the right tokens, seeing at least
    min(j + 1, T - stride + 1) of them."""
    stride = data.draw(st.integers(1, T))
    tokens = np.arange(100, 100 + n + 1)  # distinct: a token says where it is
    X, Y = text.exact_windows(tokens, T, stride)
    scored = {}
    for r, t in zip(*np.nonzero(Y >= 0)):
        j = int(Y[r, t]) - 101  # this prediction's index
        assert j not in scored
        scored[j] = t + 1
        assert list(X[r, : t + 1]) == list(tokens[j - t : j + 1])  # the context: the t + 1 tokens up to j
    assert sorted(scored) == list(range(n))
    assert all(seen >= min(j + 1, T - stride + 1) for j, seen in scored.items())


def test_the_exact_loss_is_each_prediction_from_its_context():
    """With stride 1 every prediction sees min(j + 1, T) tokens; the exact loss equals predicting each token alone
    from that context, one forward per prediction."""
    cfg = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = gpt(cfg)
    params, state = model.init(jax.random.key(0))
    params = jax.tree.map(lambda p: p * 20, params)  # far from uniform
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (15,), 0, 5), np.uint16)
    nll = []
    for j in range(len(tokens) - 1):
        ctx = tokens[max(0, j - 3) : j + 1].astype(np.int32)
        padded = np.zeros((1, 4), np.int32)  # one compiled shape: what follows the context cannot reach it (causal)
        padded[0, : len(ctx)] = ctx
        logits, _ = model.apply(params, state, jnp.asarray(padded), train=False)
        nll.append(-float(jax.nn.log_softmax(logits[0, len(ctx) - 1])[tokens[j + 1]]))
    assert evaluate(model, params, state, *text.exact_windows(tokens, 4, stride=1)) == pytest.approx(np.mean(nll),
                                                                                                    rel=1e-6)


def test_the_step_draws_contiguous_windows_everywhere():
    """make_run's window rows: x = tokens[o : o + T], y = tokens[o + 1 : o + T + 1], every offset in [0, N - T)
    drawn (the last included), none past it."""
    N, T, B = 12, 4, 64
    tokens = jnp.arange(N, dtype=jnp.uint16)

    def record(ts, batch, key):
        return ts, {"x": batch[0], "y": batch[1]}

    run = make_run(record, B, window=T)
    ts = TrainState((), (), (), jnp.zeros((), jnp.int32))
    _, got = run(ts, tokens, jnp.zeros((0,), jnp.int32), jax.random.key(0), n_steps=5)
    x, y = np.asarray(got["x"]).reshape(-1, T), np.asarray(got["y"]).reshape(-1, T)
    assert x.dtype == np.int32
    offsets = x[:, 0]
    np.testing.assert_array_equal(x, offsets[:, None] + np.arange(T))
    np.testing.assert_array_equal(y, x + 1)
    assert set(offsets.tolist()) == set(range(N - T))


def test_the_estimate_is_the_mean_of_random_batches():
    cfg = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = gpt(cfg)
    params, state = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (50,), 0, 5).astype(jnp.uint16)
    key = jax.random.key(2)
    offsets = np.asarray(jax.random.randint(key, (3, 2), 0, 50 - 4, dtype=jnp.int32))
    want = np.mean([model.loss(params, state, jnp.stack([tokens[o : o + 4] for o in row]).astype(jnp.int32),
                               jnp.stack([tokens[o + 1 : o + 5] for o in row]).astype(jnp.int32), train=False)[0]
                    for row in offsets])
    assert text.estimate_loss(model, params, state, tokens, key, 3, 2) == pytest.approx(float(want), rel=1e-6)


def test_a_stream_too_short_or_foreign_is_refused():
    with pytest.raises(ValueError, match=r"the val split has 4 tokens, fewer than block_size \+ 1 = 5"):
        text.check_stream(text.Stream(np.arange(4)), 4, 10, "the val split")
    with pytest.raises(ValueError, match="token id 12 is outside the model's vocabulary of 10"):
        text.check_stream(text.Stream(np.arange(13)), 4, 10, "the train split")
    with pytest.raises(ValueError, match="1-D array of integer token ids"):
        text.check_stream(text.Stream(np.zeros((3, 3))), 1, 10, "x")
    model = gpt(GPTConfig(vocab_size=5, block_size=8))
    with pytest.raises(ValueError, match=r"the train split has 6 tokens, fewer than block_size \+ 1 = 9"):
        fit(model, text.Stream(np.arange(6) % 5), TrainConfig(steps=1))


def test_token_files_are_written_once_and_read_back(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("to be or not to be\n" * 50)
    tok = text.Chars.from_text(text.read_text(path))
    cut = text.split_point(path)
    sha = text.file_sha256(path)
    train, val = text.token_files(path, tok, cut, tmp_path / "run", sha)
    want = text.encode_streams(path, tok, cut)
    assert isinstance(train.tokens, np.memmap) and train.tokens.dtype == np.uint16
    for got, w in zip((train, val), want):
        np.testing.assert_array_equal(got.tokens, w.tokens)
    files = sorted((tmp_path / "run").iterdir())
    assert len(files) == 2 and all(f.name.startswith(f"tokens-{sha[:16]}-") for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    text.token_files(path, tok, cut, tmp_path / "run", sha)  # found: not encoded again
    assert [f.stat().st_mtime_ns for f in files] == stamps
    text.token_files(path, text.Chars(tok.chars + "~"), cut, tmp_path / "run", sha)  # another tokenizer: new files
    assert len(list((tmp_path / "run").iterdir())) == 4


def test_the_cosine_schedule_is_nanogpts():
    """get_lr of nanoGPT's train.py (warmup (it + 1) / (warmup + 1), cosine to min_lr at lr_decay_iters, min_lr
    after), at every step of its CPU recipe."""
    def get_lr(it, lr=1e-3, warmup=100, decay=2000, min_lr=1e-4):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay:
            return min_lr
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (decay - warmup))) * (lr - min_lr)

    tcfg = TrainConfig(steps=2000, lr=1e-3, schedule="cosine", warmup=100, min_lr=1e-4)
    got = np.asarray(jax.vmap(lr_schedule(tcfg))(jnp.arange(2100)))
    np.testing.assert_allclose(got, [get_lr(i) for i in range(2100)], rtol=2e-6)
    with pytest.raises(ValueError, match=r"warmup \(2000\) must be shorter than the cosine's 2000 steps"):
        TrainConfig(steps=2000, schedule="cosine", warmup=2000)


@pytest.mark.slow
def test_a_gpt_learns_a_stream(tmp_path):
    """A repeating text: the loss estimates and the exact val loss fall to near 0, the exact one beside the estimate."""
    line = "the quick brown fox jumps over the lazy dog\n"
    tok = text.Chars.from_text(line)
    tokens = np.asarray(tok.encode(line * 40), np.uint16)
    model = gpt(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    tcfg = TrainConfig(steps=300, batch_size=8, lr=1e-2, optimizer="adamw", schedule="cosine", warmup=20,
                       eval_every=300, chunk=100, eval_iters=4)
    res = fit(model, text.Stream(tokens[:1500]), tcfg, evals={"train": text.Stream(tokens[:1500]), "val": text.Stream(tokens[1500:])})
    last = res.evals[-1]
    assert set(last) >= {"train_loss_estimate", "val_loss", "val_loss_estimate"}
    assert last["val_loss"] < 0.3 and last["val_loss_estimate"] < 0.3, last


def test_load_text_is_what_a_run_reads(shakespeare_txt):
    data = text.load_text(shakespeare_txt)
    assert (data.vocab.vocab_size, len(data.train.tokens), len(data.dev.tokens)) == (65, 1_003_854, 111_540)
    import jnnex
    assert jnnex.load_text is text.load_text and jnnex.Stream is text.Stream
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        text.load_text(shakespeare_txt, "words")
