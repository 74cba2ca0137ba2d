"""One long text as a stream of tokens: the "Let's build GPT" lecture and nanoGPT's ``shakespeare_char``.

A word list (:mod:`jnnex.data`) gives one example per word. A *text* is different: any UTF-8 file, read as one long
sequence, split by position as nanoGPT's ``prepare.py`` does — the first 90 % of its characters for training, the last
10 % for validation (tiny Shakespeare: 1,003,854 / 111,540 characters) — and each part encoded by a tokenizer:

* ``char``: the sorted distinct characters of the whole text (tiny Shakespeare has 65), one id each;
* ``bpe``: byte-level BPE (:mod:`jnnex.bpe`), trained on the training part only.

A training example is ``block_size + 1`` contiguous tokens at a uniformly random offset: the model reads the first T
and predicts each next one, at every position. The offsets are drawn inside the jitted step
(:func:`jnnex.train.make_run`), as the word models' rows are.

**Two losses of a split**, never confused:

* *exact* — every token of the split predicted once, token-weighted: windows of T tokens every ``stride`` tokens (by
  default T / 2); the first window scores all of its positions, each later one only its last ``stride``, which
  nothing before scored. So every prediction past the first window sees at least ``T - stride`` tokens of context,
  and the whole split is covered; :func:`exact_windows` builds them as rows whose unscored targets are ``-1``.
* *estimate* — nanoGPT's ``estimate_loss``: the mean loss of ``eval_iters`` random batches (200 by default there, 20
  in its CPU recipe). Cheap and noisy; what nanoGPT's README numbers are.

**Words or text?** A data file is a word list when no line holds whitespace inside it (after stripping): names.txt is
one name a line, Shakespeare is prose. ``jnnex train --corpus words|text`` (``RunConfig.new(corpus=...)``) overrides
the guess; the run's ``config.json`` records the choice.

**Token files.** Encoding a long text takes a while, so a run keeps its tokens: ``tokens-<key>.train.u16`` and
``.val.u16`` beside the run (``uint16`` for vocabularies up to 65,536, else ``uint32``), keyed by the sha256 of the
text and of the tokenizer, read back through ``np.memmap``. The text is read, and encoded, in pieces of a few MB, so
a character run never holds the whole text as a Python string (BPE training reads its training part whole); the
training tokens are placed on the device whole (2 bytes a token), which bounds a run at about half the device's
memory in tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jnnex.settings import positive_int
from jnnex.data import missing_file

CORPUS_KINDS = ("words", "text")
TOKENIZERS = ("char", "bpe")
VAL_FRACTION = 0.1  # nanoGPT's: the last 10 % of the text
_PIECE = 1 << 22  # characters read (and encoded) at a time: 4 MiB of ASCII


# ----------------------------------------------------------------------------------------------------------------------
# Reading a text


def check_text_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is a readable, non-empty UTF-8 file; a ``ValueError`` naming it otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {str(path)!r} is a directory (expected a UTF-8 text file)")
    if not path.is_file():
        raise missing_file(path, "a UTF-8 text file")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty")
    return path


def read_pieces(path: str | os.PathLike, piece: int = _PIECE) -> Iterator[str]:
    """The text of ``path`` in pieces of about ``piece`` characters, each ending at a line end where one is near
    (so a BPE split pattern never sees a word cut in two); a UTF-8 byte-order mark at the start is dropped."""
    path = check_text_file(path)
    carry = ""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            while block := f.read(piece):
                block = carry + block
                cut = block.rfind("\n") + 1
                if cut == 0:  # no line end in the block: keep reading until there is one, or the file ends
                    carry = block
                    continue
                carry = block[cut:]
                yield block[:cut]
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not valid UTF-8 ({e.reason} at byte {e.start} of a piece read "
                         "from it)") from None
    except OSError as e:
        raise ValueError(f"data file {str(path)!r} cannot be read: {e.strerror or e}") from None
    if carry:
        yield carry


def read_text(path: str | os.PathLike) -> str:
    """The whole text of ``path`` (UTF-8; a byte-order mark dropped); errors name the file."""
    return "".join(read_pieces(path))


def corpus_kind(path: str | os.PathLike, lines: int = 10_000) -> str:
    """``"words"`` when no line among the first ``lines`` holds whitespace inside it (after stripping), else
    ``"text"``: the guess when ``--corpus`` is not given."""
    with open(check_text_file(path), encoding="utf-8-sig", errors="replace") as f:
        for k, line in enumerate(f):
            if k >= lines:
                break
            if len(line.strip().split()) > 1:
                return "text"
    return "words"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def split_point(path: str | os.PathLike, val_fraction: float = VAL_FRACTION) -> int:
    """Where the training part ends, in characters: ``int(n * (1 - val_fraction))`` of the text's n characters
    (nanoGPT's ``data[:int(n*0.9)]``)."""
    n = sum(len(p) for p in read_pieces(path))
    return int(n * (1 - val_fraction))


def split_pieces(path, cut: int) -> tuple[Iterator[str], Iterator[str]]:
    """The pieces of the text before character ``cut`` and from it on (two passes over the file)."""

    def part(first: bool):
        seen = 0
        for piece in read_pieces(path):
            a, b = max(0, min(cut - seen, len(piece))), len(piece)
            seen += len(piece)
            if first and a:
                yield piece[:a]
            if not first and a < b:
                yield piece[a:]

    return part(True), part(False)


# ----------------------------------------------------------------------------------------------------------------------
# The character tokenizer (the byte-level one is jnnex.bpe's)


@dataclasses.dataclass(frozen=True)
class Chars:
    """A text's distinct characters, sorted, one id each (nanoGPT's ``shakespeare_char``: ``stoi``, ``itos``).

    >>> tok = Chars.from_text("hello")
    >>> tok.chars, tok.encode("hell"), tok.decode([1, 0, 2, 2, 3])
    ('ehlo', [1, 0, 2, 2], 'hello')
    """

    chars: str

    def __post_init__(self):
        if not self.chars or len(set(self.chars)) != len(self.chars) or "".join(sorted(self.chars)) != self.chars:
            raise ValueError(f"chars must be distinct characters, sorted, at least one; got {self.chars[:40]!r}")

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> Chars:
        seen = set(text) if isinstance(text, str) else set().union(*map(set, text))
        return cls("".join(sorted(seen)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @functools.cached_property
    def stoi(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        """``text`` as ids; characters the vocabulary lacks are a ``ValueError`` naming them."""
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            missing = sorted({c for c in text if c not in stoi})
            raise ValueError(f"{len(missing)} character(s) of the text are not in the vocabulary of "
                             f"{self.vocab_size} characters: {''.join(missing)[:40]!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        out = []
        for i in ids:
            if not 0 <= int(i) < len(chars):
                raise ValueError(f"token id {int(i)} is outside the vocabulary (0 .. {len(chars) - 1})")
            out.append(chars[int(i)])
        return "".join(out)

    def to_text(self) -> str:
        return self.chars


def tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{tokenizer.to_text()}".encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# A text as tokens


class Stream(NamedTuple):
    """A split of a text as token ids, in order: ``tokens (N,)`` (an array or a ``np.memmap``)."""

    tokens: np.ndarray


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_to_file(pieces: Iterable[str], tokenizer, path: Path) -> int:
    """Encode ``pieces`` with ``tokenizer`` into the raw token file ``path`` (written beside, then renamed: a killed
    run never leaves half a file under the final name); the number of tokens."""
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as f:
            for piece in pieces:
                ids = np.asarray(tokenizer.encode(piece), dtype)
                f.write(ids.tobytes())
                n += ids.size
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def token_files(path, tokenizer, cut: int, where: Path, data_sha256: str) -> tuple[Stream, Stream]:
    """The train and val streams of the text ``path`` (cut at character ``cut``) under ``tokenizer``: read from
    ``where``'s token files when they exist for this text and tokenizer, encoded and written there first otherwise."""
    key = f"{data_sha256[:16]}-{tokenizer_sha256(tokenizer)[:16]}"
    dtype = token_dtype(tokenizer.vocab_size)
    suffix = "u16" if dtype == np.uint16 else "u32"
    where.mkdir(parents=True, exist_ok=True)
    streams = []
    for name, pieces in zip(("train", "val"), split_pieces(path, cut)):
        file = where / f"tokens-{key}.{name}.{suffix}"
        if not file.is_file():
            encode_to_file(pieces, tokenizer, file)
        n = file.stat().st_size // dtype.itemsize
        streams.append(Stream(np.memmap(file, dtype, "r", shape=(n,)) if n else np.zeros((0,), dtype)))
    return streams[0], streams[1]


def encode_streams(path, tokenizer, cut: int) -> tuple[Stream, Stream]:
    """The train and val streams of the text ``path`` in memory (no files): for tests and small texts."""
    dtype = token_dtype(tokenizer.vocab_size)
    return tuple(Stream(np.asarray([i for p in pieces for i in tokenizer.encode(p)], dtype))
                 for pieces in split_pieces(path, cut))


def check_stream(stream: Stream, block_size: int, vocab_size: int, what: str) -> None:
    """A ``ValueError`` naming ``what`` unless ``stream`` holds at least ``block_size + 1`` ids in ``[0, V)``."""
    tokens = stream.tokens
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what}: a stream is a 1-D array of integer token ids, got {tokens.dtype} {tokens.shape}")
    if len(tokens) < block_size + 1:
        raise ValueError(f"{what} has {len(tokens):,} tokens, fewer than block_size + 1 = {block_size + 1:,}: a "
                         "training example is block_size + 1 contiguous tokens (a longer text, or a smaller "
                         "--block-size)")
    if int(tokens.max()) >= vocab_size:
        raise ValueError(f"{what}: token id {int(tokens.max())} is outside the model's vocabulary of {vocab_size}")


def exact_windows(tokens: np.ndarray, block_size: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows that score every token of ``tokens`` after the first exactly once: ``X, Y (n, T) int32``, ``Y = -1``
    where a position is not scored (module docstring). ``stride`` defaults to ``T // 2`` (at least 1).

    >>> X, Y = exact_windows(np.arange(7), block_size=4, stride=2)
    >>> X.tolist(), Y.tolist()
    ([[0, 1, 2, 3], [2, 3, 4, 5]], [[1, 2, 3, 4], [-1, -1, 5, 6]])
    """
    positive_int("block_size", block_size)
    T = block_size
    if stride is None:
        stride = max(1, T // 2)
    positive_int("stride", stride)
    if stride > T:
        raise ValueError(f"stride {stride} is larger than block_size {T}: tokens between windows would go unscored")
    n = len(tokens) - 1  # predictions: tokens[1:] from what precedes each
    if n < 1:
        raise ValueError("a stream of fewer than 2 tokens has nothing to predict")
    starts = list(range(0, max(n - T, 0) + 1, stride))
    if starts[-1] + T < n:
        starts.append(n - T)  # the last window ends at the last token
    X = np.zeros((len(starts), T), np.int32)
    Y = np.full((len(starts), T), -1, np.int32)
    scored_to = 0  # predictions [0, scored_to) are scored (prediction j's target is tokens[j + 1])
    for r, s in enumerate(starts):
        width = min(T, n - s)
        X[r, :width] = tokens[s : s + width]
        first = max(scored_to - s, 0)
        Y[r, first:width] = tokens[s + 1 + first : s + 1 + width]
        scored_to = s + width
    return X, Y


def rows_at(tokens, offsets, block_size: int):
    """``block_size + 1`` contiguous tokens at each offset, widened to int32: ``offsets (B,) -> (B, T + 1)`` (the
    model reads the first T and predicts the last T). Traceable: the jitted step draws its batches with it."""
    return tokens[offsets[:, None] + jnp.arange(block_size + 1, dtype=jnp.int32)[None, :]].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "batches", "batch_size"))
def _estimate(model, params, state, tokens, key, batches: int, batch_size: int):
    T = model.block_size
    offsets = jax.random.randint(key, (batches, batch_size), 0, tokens.shape[0] - T, dtype=jnp.int32)  # (n, B)

    def batch_loss(o):  # o (B,)
        rows = rows_at(tokens, o, T)  # (B, T + 1)
        loss, _ = model.loss(params, state, rows[:, :-1], rows[:, 1:], train=False)
        return loss.astype(jnp.float32)

    return jax.lax.map(batch_loss, offsets).mean()


def estimate_loss(model, params, state, tokens, key, batches: int, batch_size: int) -> float:
    """nanoGPT's ``estimate_loss``: the mean of ``batches`` random batches' mean losses, in eval mode. ``tokens``
    ``(N,)``, on the device or not; ``key`` draws the offsets."""
    return float(_estimate(model, params, state, jnp.asarray(tokens), key, batches, batch_size))


@dataclasses.dataclass(frozen=True)
class TextSplits:
    """A text's two parts as streams, with its tokenizer: what :class:`jnnex.data.Splits` is for words."""

    vocab: object  # the tokenizer (Chars or jnnex.bpe.Tokenizer)
    block_size: int
    parts: tuple[Stream, Stream]  # (train, val)

    @property
    def names(self) -> tuple[str, str]:
        return ("train", "val")

    @property
    def train(self) -> Stream:
        return self.parts[0]

    @property
    def dev(self) -> Stream:
        return self.parts[1]

    @property
    def test(self) -> None:
        return None


def utf8_bytes(tokenizer, ids) -> int:
    """How many bytes of UTF-8 the tokens ``ids`` stand for (to turn a loss per token into one per byte)."""
    if hasattr(tokenizer, "decode_bytes"):
        return len(tokenizer.decode_bytes(ids))
    return len(tokenizer.decode(ids).encode("utf-8"))


def make_tokenizer(path: str | os.PathLike, kind: str = "char", vocab_size: int | None = None,
                   val_fraction: float = VAL_FRACTION):
    """A text's tokenizer: ``"char"``, its characters (all of the text's, as nanoGPT's), or ``"bpe"``, byte-level
    BPE of ``vocab_size`` tokens (default 512) trained on the training part (all but the last ``val_fraction``)."""
    if kind not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {kind!r}")
    if kind == "char":
        if vocab_size is not None:
            raise ValueError("--vocab-size applies to --tokenizer bpe; a character tokenizer has the text's "
                             "characters")
        return Chars.from_text(read_pieces(path))
    size = 512 if vocab_size is None else vocab_size
    if type(size) is not int or size < 256:
        raise ValueError(f"--vocab-size must be an integer of at least 256 (a byte-level BPE tokenizer starts from "
                         f"the 256 bytes), got {size!r}")
    from jnnex import bpe

    tok = bpe.train("".join(split_pieces(path, split_point(path, val_fraction))[0]), size)
    if tok.vocab_size < size:  # training stopped: no pair left to merge
        raise ValueError(f"--vocab-size {size:,}: the training part of {str(path)!r} has no pair of tokens left to "
                         f"merge after {len(tok.merges):,} merges, so its vocabulary stops at {tok.vocab_size:,}; give "
                         f"--vocab-size {tok.vocab_size} or less")
    return tok


def load_text(path: str | os.PathLike, tokenizer: str = "char", *, vocab_size: int | None = None,
              val_fraction: float = VAL_FRACTION) -> TextSplits:
    """A text file as train and val token streams, split by position (the last ``val_fraction`` for val), with its
    tokenizer (:func:`make_tokenizer`). What a text run reads, without a run (``block_size`` is 0 here: the model's
    sets it)::

        data = load_text("tinyshakespeare.txt")
        data.vocab.vocab_size, len(data.train.tokens), len(data.dev.tokens)   # (65, 1003854, 111540)
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    path = check_text_file(path)
    tok = make_tokenizer(path, tokenizer, vocab_size, val_fraction)
    return TextSplits(tok, 0, encode_streams(path, tok, split_point(path, val_fraction)))
