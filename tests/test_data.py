"""Corpora, vocabulary, windows, sequences and splits (:mod:`jnnex.data`): counts, by-hand examples, round trips,
bad files and bad settings."""

import random

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jnnex.data import (
    Vocab, bigram_pairs, build_windows, census_first_names, census_last_names, load_words, make_moons, make_splits,
    read_words, split_words,
)

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def test_census_corpora_counts_and_order():
    first = census_first_names()
    assert len(first) == 5163 and len(set(first)) == 5163
    assert first[:3] == ["james", "john", "robert"]  # the male file comes first, in its order
    assert all(w == w.lower() and w.isalpha() for w in first)
    assert census_first_names() == first  # stable
    last = census_last_names()
    assert len(last) == 88799 and last[0] == "smith"
    assert load_words("census-first") == first


def test_read_words_strips_and_skips_blank(tmp_path):
    p = tmp_path / "w.txt"
    p.write_text("  emma \n\n olivia\n\t\nava\n", encoding="utf-8")
    assert read_words(p) == ["emma", "olivia", "ava"]


@pytest.mark.parametrize("content, match", [(b"", "no usable lines"), (b"\n  \n", "no usable lines"),
                                            (b"ab\xff\n", "not valid UTF-8")])
def test_read_words_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_words(p)
    with pytest.raises(ValueError, match="does not exist"):
        read_words(tmp_path / "missing.txt")


def test_vocab_boundary_conflict_and_custom_boundary():
    with pytest.raises(ValueError, match="boundary token '.', which marks where each word starts and ends, also occurs"):
        Vocab.from_words(["a.b"])
    v = Vocab.from_words(["a.b"], boundary="#")
    assert v.itos == "#.ab" and v.encode("a.b") == [2, 1, 3]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Vocab.from_words(["ab"]).encode("abc")


@given(st.lists(st.text(ALPHABET, min_size=1, max_size=12), min_size=1, max_size=20))
def test_encode_decode_round_trip(words):
    v = Vocab.from_words(words)
    for w in words:
        ids = v.encode(w)
        assert v.decode(ids) == w and v.decode(ids + [0, 5]) == w and 0 not in ids


@given(st.lists(st.text(ALPHABET, min_size=1, max_size=10), min_size=1, max_size=20), st.integers(1, 6))
def test_window_count_and_content(words, block_size):
    v = Vocab.from_words(words)
    X, Y = build_windows(words, v, block_size)
    assert X.shape == (sum(len(w) + 1 for w in words), block_size) and X.dtype == np.int32 and Y.dtype == np.int32
    # Reading the targets in order spells every word followed by the boundary.
    assert "".join(v.itos[i] for i in Y) == "".join(w + "." for w in words)
    # Each context is the previous block_size characters (boundary-padded).
    i = 0
    for w in words:
        padded = [0] * block_size + v.encode(w)
        for j in range(len(w) + 1):
            assert X[i].tolist() == padded[j : j + block_size]
            i += 1


def test_windows_by_hand():
    v = Vocab.from_words(["ab", "b"])  # . a b
    X, Y = build_windows(["ab", "b"], v, 2)
    assert X.tolist() == [[0, 0], [0, 1], [1, 2], [0, 0], [0, 2]]
    assert Y.tolist() == [1, 2, 0, 2, 0]
    xs, ys = bigram_pairs(["ab", "b"], v)
    assert xs.tolist() == [0, 1, 2, 0, 2] and ys.tolist() == [1, 2, 0, 2, 0]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        build_windows(["ab"], Vocab.from_words(["ab"]), bad)


@given(st.integers(20, 300), st.integers(0, 10_000))
def test_split_partitions(n, seed):
    words = [f"w{i}" for i in range(n)]
    tr, dev, te = split_words(words, (0.8, 0.1, 0.1), seed)
    assert sorted(tr + dev + te) == sorted(words)
    assert len(tr) == int(0.8 * n) and len(tr) + len(dev) == int(0.9 * n)
    assert split_words(words, (0.8, 0.1, 0.1), seed) == (tr, dev, te)  # deterministic


def test_split_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        split_words(["a"] * 10, (0.5, 0.1))
    with pytest.raises(ValueError, match="would be empty"):
        split_words(["a", "b"], (0.8, 0.1, 0.1))


def test_lecture_split_on_names_txt(names_txt):
    words = read_words(names_txt)
    assert len(words) == 32033
    sp = make_splits(words, 3, seed=42)
    assert [len(s[1]) for s in (sp.train, sp.dev, sp.test)] == [182625, 22655, 22866]
    shuffled = list(words)
    random.Random(42).shuffle(shuffled)
    tr, _, _ = split_words(words, seed=42)
    assert tr == shuffled[:25626]


def test_make_moons():
    X, y = make_moons(100, 0.1, jax.random.key(1))
    assert X.shape == (100, 2) and y.shape == (100,) and set(y.tolist()) == {0, 1} and y.sum() == 50
    X0, y0 = make_moons(100, 0.0, jax.random.key(1))
    # Without noise the outer moon lies on the unit circle and the inner one on a circle around (1, 0.5).
    outer, inner = X0[y0 == 0], X0[y0 == 1]
    np.testing.assert_allclose(np.hypot(*outer.T), 1.0)
    np.testing.assert_allclose(np.hypot(inner[:, 0] - 1, inner[:, 1] - 0.5), 1.0)
    np.testing.assert_array_equal(make_moons(100, 0.1, jax.random.key(1))[0], X)
    with pytest.raises(ValueError, match="n must be"):
        make_moons(1, 0.1, jax.random.key(0))


def test_a_byte_order_mark_is_not_a_character(tmp_path):
    """A UTF-8 file saved with a byte-order mark (Windows editors write one) reads as the same words: the mark does
    not become a vocabulary character of the first word."""
    from jnnex.data import read_words

    (tmp_path / "bom.txt").write_bytes("\ufeffemma\nava\n".encode())
    assert read_words(tmp_path / "bom.txt") == ["emma", "ava"]
    assert Vocab.from_words(read_words(tmp_path / "bom.txt")).chars == "aemv"
