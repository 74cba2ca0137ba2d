"""Datasets: word lists, the character vocabulary, context windows, splits, and two-moons.

The character-level language models of makemore (Karpathy, 2022) read a list of words, one per line, and learn to
continue a word one character at a time. A boundary token (index 0, printed as ``'.'``) marks both the start and the
end of a word, so ``"emma"`` gives the bigrams ``.e em mm ma a.``.

Corpora:

* ``census-first`` (default, embedded, no network): the US Census 1990 first names shipped inside the PyPI package
  ``names`` 0.3.0 (MIT): ``dist.male.first`` (1,219 rows) then ``dist.female.first`` (4,275 rows), lower-cased and
  de-duplicated in order of first appearance: **5,163 names**.
* ``census-last``: ``dist.all.last`` from the same package: **88,799 surnames**.
* any UTF-8 text file, one word per line (makemore's convention): whitespace stripped, blank lines skipped. The
  makemore ``names.txt`` (32,033 names, sha256 ``0a30b555…8cc4d``) is what the lecture numbers are measured on.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.settings import positive_int

BOUNDARY = "."
CORPORA = ("census-first", "census-last")
NAMES_TXT_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
SPLIT_NAMES = ("train", "dev", "test")


# ----------------------------------------------------------------------------------------------------------------------
# Word lists


def _census_file(filename: str) -> list[str]:
    import names  # the data package; imported lazily so `import jnnex` stays light

    path = Path(names.__file__).with_name(filename)
    with open(path, encoding="ascii") as f:
        return [line.split()[0].lower() for line in f if line.strip()]


def census_first_names() -> list[str]:
    """The 5,163 distinct US Census first names (male file first, then female), lower-cased, in a stable order."""
    return list(dict.fromkeys(_census_file("dist.male.first") + _census_file("dist.female.first")))


def census_last_names() -> list[str]:
    """The 88,799 US Census surnames of ``dist.all.last``, lower-cased, in the file's order."""
    return list(dict.fromkeys(_census_file("dist.all.last")))


# Beside the project (../shared/data): where this workplace keeps makemore's names.txt and tiny Shakespeare.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def missing_file(path: str | os.PathLike, expected: str) -> ValueError:
    """The error for a data file that does not exist; where one of that name is in :data:`SHARED_DATA` (``--data
    names.txt`` typed in the project's root), it says where."""
    message = f"data file {str(path)!r} does not exist (expected {expected})"
    near = SHARED_DATA / Path(path).name
    if near.is_file() and near.resolve() != Path(path).resolve():
        message += f"; a file of that name is at {os.path.relpath(near)}: give that path"
    return ValueError(message)


def read_words(path: str | os.PathLike) -> list[str]:
    """Read a UTF-8 text file with one word per line; strips whitespace and skips blank lines.

    A UTF-8 byte-order mark at the start is dropped.

    Raises:
        ValueError: the file is missing, a directory, not UTF-8, or has no non-blank line.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {str(path)!r} is a directory (expected a UTF-8 text file, one word per line)")
    if not path.is_file():
        raise missing_file(path, "a UTF-8 text file, one word per line")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is not a word
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ValueError(f"data file {str(path)!r} cannot be read: {e.strerror or e}") from None
    words = [line.strip() for line in text.splitlines()]
    words = [w for w in words if w]
    if not words:
        raise ValueError(f"data file {str(path)!r} has no usable lines (it is empty or blank)")
    return words


def load_words(source: str | os.PathLike = "census-first") -> list[str]:
    """Words from a named corpus (``census-first``, ``census-last``) or a text file path."""
    if source == "census-first":
        return census_first_names()
    if source == "census-last":
        return census_last_names()
    return read_words(source)


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Sorted characters of a corpus plus a boundary token at index 0.

    >>> v = Vocab.from_words(["emma", "ava"])
    >>> v.encode("ava"), v.decode([1, 4, 1]), v.size
    ([1, 4, 1], 'ava', 5)
    """

    chars: str  # the characters at indices 1 .. V-1, sorted
    boundary: str = BOUNDARY  # the token at index 0

    def __post_init__(self):
        if len(self.boundary) != 1:
            raise ValueError(f"boundary must be a single character, got {self.boundary!r}")
        if self.boundary in self.chars:
            raise ValueError(
                f"the boundary token {self.boundary!r}, which marks where each word starts and ends, also occurs in "
                f"the words; a text with punctuation is read as a text (--corpus text), a word list without "
                f"{self.boundary!r} (or, in the library, Vocab.from_words(words, boundary=...) with another character)"
            )
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("chars must not repeat")

    @classmethod
    def from_words(cls, words: Iterable[str], boundary: str = BOUNDARY) -> Vocab:
        return cls("".join(sorted(set("".join(words)))), boundary)

    @property
    def size(self) -> int:
        """V: the number of tokens, boundary included."""
        return len(self.chars) + 1

    @property
    def vocab_size(self) -> int:
        """V, as a tokenizer names it (:class:`jnnex.text.Chars`, :class:`jnnex.bpe.Tokenizer`)."""
        return self.size

    @property
    def itos(self) -> str:
        return self.boundary + self.chars

    @functools.cached_property
    def stoi(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.itos)}

    def encode(self, word: str) -> list[int]:
        """Character indices of ``word`` (no boundary tokens added)."""
        stoi = self.stoi
        bad = sorted({c for c in word if c not in stoi or c == self.boundary})
        if bad:
            raise ValueError(f"word {word!r} has characters outside the vocabulary: {bad}")
        return [stoi[c] for c in word]

    def decode(self, ids: Iterable[int]) -> str:
        """The string of ``ids``, stopping at the first boundary token (index 0)."""
        out = []
        for i in ids:
            i = int(i)
            if i == 0:
                break
            if not 0 < i < self.size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.size})")
            out.append(self.itos[i])
        return "".join(out)


# ----------------------------------------------------------------------------------------------------------------------
# Context windows and splits


def build_windows(words: Sequence[str], vocab: Vocab, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (context, next character) example of ``words``: ``X (N, T) int32, Y (N,) int32``, N = Σ(len(w) + 1).

    Each word is padded on the left with T boundary tokens and followed by one, as in makemore's ``build_dataset``.

    >>> X, Y = build_windows(["ab"], Vocab.from_words(["ab"]), block_size=2)
    >>> X.tolist(), Y.tolist()
    ([[0, 0], [0, 1], [1, 2]], [1, 2, 0])
    """
    positive_int("block_size", block_size)
    n = sum(len(w) + 1 for w in words)
    X = np.zeros((n, block_size), np.int32)  # (N, T)
    Y = np.zeros((n,), np.int32)  # (N,)
    i = 0
    for w in words:
        ids = vocab.encode(w) + [0]
        padded = [0] * block_size + ids
        for j, target in enumerate(ids):
            X[i] = padded[j : j + block_size]
            Y[i] = target
            i += 1
    return X, Y


def build_sequences(words: Sequence[str], vocab: Vocab, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One padded row per word for per-position models (makemore's ``CharDataset``): ``X, Y (N, T) int32``.

    ``x = [0, c1 … cn, 0, …]`` and ``y = [c1 … cn, 0, -1, …]``: position t predicts the character after the first t,
    the boundary token ends the word, and ``-1`` marks positions with nothing to predict (ignored by the loss).
    ``block_size`` must be at least the longest word + 1.

    >>> X, Y = build_sequences(["ab"], Vocab.from_words(["ab"]), block_size=4)
    >>> X.tolist(), Y.tolist()
    ([[0, 1, 2, 0]], [[1, 2, 0, -1]])
    """
    positive_int("block_size", block_size)
    longest = max((len(w) for w in words), default=0)
    if longest + 1 > block_size:
        raise ValueError(f"block_size {block_size} is too short for a word of {longest} characters (need >= "
                         f"{longest + 1})")
    X = np.zeros((len(words), block_size), np.int32)  # (N, T)
    Y = np.full((len(words), block_size), -1, np.int32)  # (N, T)
    for i, w in enumerate(words):
        ids = vocab.encode(w)
        X[i, 1 : len(ids) + 1] = ids
        Y[i, : len(ids) + 1] = ids + [0]
    return X, Y


def bigram_pairs(words: Sequence[str], vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """All bigrams of ``words`` as ``xs (N,) int32, ys (N,) int32`` (block_size 1 windows)."""
    X, Y = build_windows(words, vocab, 1)
    return X[:, 0], Y


def split_words(
    words: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 42
) -> tuple[list[str], ...]:
    """Shuffle a copy of ``words`` with ``random.Random(seed)`` and cut it into consecutive splits.

    Cut points are ``int(cumulative_fraction * n)``: with seed 42 and (0.8, 0.1, 0.1) on makemore's names.txt this is
    the lecture's split (182,625 / 22,655 / 22,866 examples at block_size 3).
    """
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    words = list(words)
    random.Random(seed).shuffle(words)
    cuts, total = [0], 0.0
    for f in fractions[:-1]:
        total += f
        cuts.append(int(total * len(words)))
    cuts.append(len(words))
    splits = tuple(words[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
    for k, s in enumerate(splits):
        if not s:
            raise ValueError(
                f"split {k} (fraction {fractions[k]}) of {len(words)} words would be empty; use more data or larger fractions"
            )
    return splits


@dataclasses.dataclass(frozen=True)
class Splits:
    """The parts of one corpus as model inputs, with its vocabulary: ``parts[k] = (X, Y)`` for the k-th fraction.

    ``train``, ``dev`` and ``test`` name the first three parts (``None`` where there are fewer).
    """

    vocab: Vocab
    block_size: int
    parts: tuple[tuple[np.ndarray, np.ndarray], ...]  # X (N, T); Y (N,) windows or (N, T) sequences

    @property
    def names(self) -> tuple[str, ...]:
        return SPLIT_NAMES[: len(self.parts)] if len(self.parts) <= len(SPLIT_NAMES) else tuple(
            f"part{k}" for k in range(len(self.parts)))

    def _part(self, k: int):
        return self.parts[k] if k < len(self.parts) else None

    @property
    def train(self):
        return self.parts[0]

    @property
    def dev(self):
        return self._part(1)

    @property
    def test(self):
        return self._part(2)


def make_splits(
    words: Sequence[str],
    block_size: int | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 42,
    vocab: Vocab | None = None,
    *,
    per_position: bool = False,
) -> Splits:
    """Vocabulary from all ``words``, then the examples of each part of :func:`split_words`.

    Window models (default) get :func:`build_windows` of ``block_size``; ``per_position=True`` gives
    :func:`build_sequences`, with ``block_size`` defaulting to the longest word + 1 (makemore's). One fraction keeps
    every word, unshuffled.
    """
    words = list(words)
    vocab = vocab or Vocab.from_words(words)
    parts = split_words(words, fractions, seed)  # validates the fractions
    if len(parts) == 1:
        parts = (words,)  # one part: every word, in the corpus' order
    if per_position:
        block_size = block_size or max(len(w) for w in words) + 1
        build = build_sequences
    else:
        if block_size is None:
            raise ValueError("block_size is needed for window examples")
        build = build_windows
    return Splits(vocab, block_size, tuple(build(p, vocab, block_size) for p in parts))


# ----------------------------------------------------------------------------------------------------------------------
# Two moons (for the first-principles MLP; no scikit-learn needed)


def make_moons(n: int, noise: float, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles, as scikit-learn's ``make_moons``: ``X (n, 2) float64, y (n,) int32 in {0, 1}``.

    The points are shuffled and Gaussian noise of std ``noise`` is added, both from ``key``.
    """
    positive_int("n", n, minimum=2)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    n_out, n_in = n // 2, n - n // 2
    t_out, t_in = np.linspace(0, np.pi, n_out), np.linspace(0, np.pi, n_in)
    X = np.concatenate(
        [np.stack([np.cos(t_out), np.sin(t_out)], 1), np.stack([1 - np.cos(t_in), 0.5 - np.sin(t_in)], 1)]
    )
    y = np.concatenate([np.zeros(n_out, np.int32), np.ones(n_in, np.int32)])
    k_perm, k_noise = jax.random.split(key)
    perm = np.asarray(jax.random.permutation(k_perm, n))
    eps = np.asarray(jax.random.normal(k_noise, (n, 2), jnp.float32), np.float64)
    return X[perm] + noise * eps, y[perm]
