"""Byte-level byte-pair encoding (BPE): the tokenizer of GPT-2 and GPT-4, after the tokenizer lecture and minbpe
(Karpathy, 2024; Sennrich et al. 2016 for BPE on words, Radford et al. 2019 for BPE on bytes).

A text is its UTF-8 bytes, ids 0..255, so every string has an encoding and nothing is ever "unknown". Training
repeatedly finds the most frequent adjacent pair of ids and gives it a new id (256, 257, ...): that pair's *merge*,
its *rank* the order it was made in. Encoding applies the merges in rank order — the lowest-ranked pair present
first, as GPT-2's encoder does — and decoding concatenates each id's bytes.

**Ties.** When two pairs are equally frequent, training merges the smaller pair (compared as (first id, second id)),
so a text and a vocabulary size give one tokenizer, on every machine.

**Two kinds.** With ``pattern=None`` the merges run over the raw bytes of the whole text (the lecture's
``BasicTokenizer``). With a split pattern (``GPT4_SPLIT_PATTERN`` by default, or ``GPT2_SPLIT_PATTERN``) the text is
first cut into pieces — letters, numbers, punctuation, whitespace — and no merge crosses a piece (the
``RegexTokenizer``): a token never spans a word and its punctuation. Training counts each distinct piece once (with
its multiplicity) and, after each merge, recounts only the pieces the merge touched, so it is fast on a corpus; the
basic kind is one piece as long as the text, recounted whole at every merge (written for the lecture's small texts).

**Special tokens** (``<|endoftext|>``, ...) take the last ids. They are produced by :meth:`Tokenizer.encode` only
where the caller allows them (``allowed_special``); by default text that contains one is refused, since a special
token arriving from user text is how prompts get spoofed.

**Files** (:meth:`Tokenizer.save`, :func:`load`) are plain text, one merge per line, readable and diffable::

    jnnex-bpe 1
    pattern "'(?i:[sdmt]|ll|ve|re)|..."
    special 1
    "<|endoftext|>" 512
    merges 255
    101 32
    ...

>>> tok = train("aaabdaaabac", 259, pattern=None)
>>> tok.encode("aaabdaaabac"), tok.decode([258, 100, 258, 97, 99])
([258, 100, 258, 97, 99], 'aaabdaaabac')
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex

# The split patterns of GPT-2 and of GPT-4 (cl100k), as tiktoken gives them. GPT-4's adds case-insensitive
# contractions, numbers of at most three digits, and keeps newlines apart from the other whitespace.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                      r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
MAGIC = "jnnex-bpe 1"


# ----------------------------------------------------------------------------------------------------------------------
# The two operations training and encoding are made of


def pair_counts(ids: Sequence[int], counts: Counter | None = None, weight: int = 1) -> Counter:
    """How often each adjacent pair occurs in ``ids`` (added, times ``weight``, to ``counts`` when given).

    >>> pair_counts([1, 2, 3, 1, 2])
    Counter({(1, 2): 2, (2, 3): 1, (3, 1): 1})
    """
    counts = Counter() if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] += weight
    return counts


def merge(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """``ids`` with every occurrence of ``pair`` replaced by ``new_id``, left to right (``aaa`` with ``(a, a)``
    gives ``Xa``).

    >>> merge([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def utf8(text: str, what: str = "text") -> bytes:
    """``text`` as UTF-8; a lone surrogate (which UTF-8 cannot hold) is a ``ValueError`` naming where it is."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds a lone surrogate U+{ord(text[e.start]):04X} at index {e.start}: it is not "
                         "a character and has no UTF-8 encoding (was the text decoded with errors='surrogateescape' "
                         "or read from a broken file?)") from None


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A trained byte-level BPE tokenizer: its merges in rank order, its split pattern, its special tokens.

    Ids 0..255 are the bytes, ``256 + r`` is the merge of rank ``r``, then the special tokens.
    """

    merges: tuple[tuple[int, int], ...]  # merges[r] = the pair that id 256 + r replaces
    pattern: str | None = GPT4_SPLIT_PATTERN  # None: the basic tokenizer, merges over the raw bytes
    special: tuple[tuple[str, int], ...] = ()  # (token, id), ids after the merges'

    def __post_init__(self):
        for r, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + r and 0 <= b < 256 + r):
                raise ValueError(f"merge {r} ({a}, {b}) refers to an id not yet made (ids below {256 + r} exist)")
        if len(set(self.merges)) != len(self.merges):
            raise ValueError("a pair is merged twice")
        for k, (token, i) in enumerate(self.special):
            if not token or i != 256 + len(self.merges) + k:
                raise ValueError(f"special token {token!r} has id {i}; the special tokens take the ids after the "
                                 f"merges', in order ({256 + len(self.merges) + k} here)")

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges) + len(self.special)

    @functools.cached_property
    def ranks(self) -> dict[tuple[int, int], int]:
        return {pair: r for r, pair in enumerate(self.merges)}

    @functools.cached_property
    def vocab(self) -> dict[int, bytes]:
        """Every id's bytes (a special token's, its UTF-8)."""
        vocab = {i: bytes([i]) for i in range(256)}
        for r, (a, b) in enumerate(self.merges):
            vocab[256 + r] = vocab[a] + vocab[b]
        for token, i in self.special:
            vocab[i] = token.encode("utf-8")
        return vocab

    @functools.cached_property
    def _split(self):
        return None if self.pattern is None else regex.compile(self.pattern)

    @functools.cached_property
    def _special_split(self):
        return regex.compile("(" + "|".join(regex.escape(t) for t, _ in self.special) + ")")

    # -- encode ------------------------------------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: str | Iterable[str] = "none_raise") -> list[int]:
        """``text`` as token ids.

        Args:
            text: any string (a lone surrogate is refused: it has no UTF-8).
            allowed_special: which special tokens in ``text`` become their ids: ``"all"``, a set of tokens, or none
                — ``"none_raise"`` (the default) refuses text containing any special token, ``"none"`` encodes them
                as the ordinary text they are.
        """
        utf8(text)
        special = dict(self.special)
        if allowed_special == "all":
            allowed = set(special)
        elif allowed_special in ("none", "none_raise"):
            allowed = set()
        elif isinstance(allowed_special, str):
            raise ValueError(f"allowed_special must be 'all', 'none', 'none_raise' or a set of special tokens, got "
                             f"{allowed_special!r}")
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(special)
            if unknown:
                raise ValueError(f"allowed_special names {sorted(unknown)}, which are not this tokenizer's special "
                                 f"tokens ({sorted(special) or 'it has none'})")
        if allowed_special != "none":
            for token in sorted(set(special) - allowed):
                at = text.find(token)
                if at >= 0:
                    raise ValueError(f"the text holds the special token {token!r} at index {at}, which is not allowed "
                                     "here; pass allowed_special={" + repr(token) + "} (or 'all') to encode it as its "
                                     "id, or allowed_special='none' to encode it as ordinary text")
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for k, part in enumerate(self._special_split.split(text)):  # odd parts are the special tokens matched
            if k % 2 == 1 and part in allowed:
                ids.append(special[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """``text`` as ids, special tokens being ordinary text."""
        pieces = [text] if self._split is None else self._split.findall(text)
        ids: list[int] = []
        for piece in pieces:
            ids.extend(self._encode_piece(piece))
        return ids

    @functools.cached_property
    def _pieces(self) -> dict[str, tuple[int, ...]]:
        return {}  # each distinct piece's ids, as GPT-2's encoder caches them (a text repeats its words)

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """One piece: apply the merges in rank order — at each turn the lowest-ranked pair present, everywhere."""
        if piece in self._pieces:
            return self._pieces[piece]
        ids = list(utf8(piece))
        ranks = self.ranks
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, len(ranks)))
            if pair not in ranks:
                break  # no pair left that training merged
            ids = merge(ids, pair, 256 + ranks[pair])
        if len(self._pieces) < 1 << 17:
            self._pieces[piece] = tuple(ids)
        return tuple(ids)

    # -- decode ------------------------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``. Bytes that are not valid UTF-8 on their own (a list cut inside a character) read as
        U+FFFD, as tiktoken's and minbpe's decoders do."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        vocab = self.vocab
        out = []
        for i in ids:
            if int(i) not in vocab:
                raise ValueError(f"token id {int(i)} is outside this tokenizer's vocabulary "
                                 f"(0 .. {self.vocab_size - 1})")
            out.append(vocab[int(i)])
        return b"".join(out)

    # -- reading it --------------------------------------------------------------------------------------------------

    def describe(self, limit: int | None = None) -> str:
        """The merges as a learner reads them, one per line: ``[e][ ] -> [e ] 256`` (control characters escaped)."""
        vocab = self.vocab
        lines = [f"[{render(vocab[a])}][{render(vocab[b])}] -> [{render(vocab[256 + r])}] {256 + r}"
                 for r, (a, b) in enumerate(self.merges[:limit])]
        lines += [f"special {token!r} {i}" for token, i in self.special]
        return "\n".join(lines)

    # -- files -------------------------------------------------------------------------------------------------------

    def to_text(self) -> str:
        lines = [MAGIC, f"pattern {json.dumps(self.pattern)}", f"special {len(self.special)}"]
        lines += [f"{json.dumps(token)} {i}" for token, i in self.special]
        lines += [f"merges {len(self.merges)}"] + [f"{a} {b}" for a, b in self.merges]
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to ``path`` (atomically: a crash leaves the old file or the new, never half)."""
        from jnnex.rundir import write_text  # (imported here: rundir imports jax, this module does not need it)
        write_text(path, self.to_text())


def render(b: bytes) -> str:
    """Bytes as printable text: decoded (U+FFFD where not UTF-8), control characters as ``\\u000a``-style escapes."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in b.decode("utf-8", errors="replace"))


def from_text(text: str, where: str = "tokenizer") -> Tokenizer:
    """The tokenizer of a :meth:`Tokenizer.to_text` document; an error names ``where``, the line and what was
    expected."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    at = 0

    def bad(what: str):
        return ValueError(f"{where}, line {at + 1}: {what} (is it a jnnex BPE tokenizer file, written by "
                          "Tokenizer.save?)")

    def line(prefix: str) -> str:
        nonlocal at
        if at >= len(lines):
            raise bad(f"the file ends early; expected {prefix!r}")
        if not lines[at].startswith(prefix):
            raise bad(f"expected {prefix!r}, found {lines[at][:60]!r}")
        at += 1
        return lines[at - 1][len(prefix):]

    def count(prefix: str) -> int:
        nonlocal at
        rest = line(prefix)
        if not rest.isdigit():
            at -= 1
            raise bad(f"expected a count after {prefix!r}, found {rest!r}")
        return int(rest)

    if not lines or lines[0] != MAGIC:
        raise ValueError(f"{where} is not a jnnex BPE tokenizer file (its first line should be {MAGIC!r}, found "
                         f"{(lines[0][:60] if lines else '')!r})")
    at = 1
    try:
        pattern = json.loads(line("pattern "))
    except json.JSONDecodeError as e:
        at -= 1
        raise bad(f"the pattern is not a JSON string ({e.msg})") from None
    if pattern is not None and not isinstance(pattern, str):
        raise bad("the pattern must be a JSON string or null")
    special = []
    for _ in range(count("special ")):
        if at >= len(lines):
            raise bad("the file ends inside the special tokens")
        token, _, i = lines[at].rpartition(" ")
        try:
            token = json.loads(token)
        except json.JSONDecodeError:
            raise bad(f"expected a special token as a JSON string and its id, found {lines[at][:60]!r}") from None
        if not isinstance(token, str) or not i.isdigit():
            raise bad(f"expected a special token as a JSON string and its id, found {lines[at][:60]!r}")
        special.append((token, int(i)))
        at += 1
    merges = []
    n = count("merges ")
    for _ in range(n):
        if at >= len(lines):
            raise bad(f"the file ends after {len(merges)} of its {n} merges")
        parts = lines[at].split(" ")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise bad(f"expected a merge, two ids, found {lines[at][:60]!r}")
        merges.append((int(parts[0]), int(parts[1])))
        at += 1
    if at != len(lines):
        raise bad(f"unexpected text after the {n} merges")
    if pattern is not None:
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"{where}: its split pattern does not compile ({e})") from None
    try:
        return Tokenizer(tuple(merges), pattern, tuple(special))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved at ``path`` by :meth:`Tokenizer.save`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"tokenizer file {str(path)!r} is not UTF-8 text (not a jnnex BPE tokenizer file)") from None
    return from_text(text, f"tokenizer file {str(path)!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Training


def train(text: str, vocab_size: int, *, pattern: str | None = GPT4_SPLIT_PATTERN,
          special_tokens: Sequence[str] = ()) -> Tokenizer:
    """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

    Each step merges the most frequent adjacent pair (ties: the smaller pair); pairs never cross the pieces of
    ``pattern``. A pair seen once is still merged, as minbpe does; training ends with fewer merges (and a smaller
    ``vocab_size``) only when no pair is left at all.

    Args:
        text: the training text (any string without lone surrogates).
        vocab_size: the vocabulary wanted, special tokens included; at least 256 + their number.
        pattern: the split pattern (``None``: the basic tokenizer).
        special_tokens: strings given the last ids (``"<|endoftext|>"``).
    """
    special_tokens = tuple(special_tokens)
    if type(vocab_size) is not int or vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be an integer of at least 256 (the bytes) + {len(special_tokens)} (the "
                         f"special tokens), got {vocab_size!r}")
    if len(set(special_tokens)) != len(special_tokens) or not all(isinstance(t, str) and t for t in special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
    utf8(text)
    pieces = Counter([text] if pattern is None else regex.findall(pattern, text))
    words = [list(piece.encode("utf-8")) for piece in pieces]  # each distinct piece once ...
    weights = list(pieces.values())                              # ... with how often it occurs
    counts: Counter = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> the words it may occur in
    for w, (ids, weight) in enumerate(zip(words, weights)):
        pair_counts(ids, counts, weight)
        for pair in zip(ids, ids[1:]):
            where[pair].add(w)
    heap = [(-c, pair) for pair, c in counts.items()]  # (-count, pair): the most frequent, then the smallest, first
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < vocab_size - 256 - len(special_tokens):
        while heap and counts.get(heap[0][1], 0) != -heap[0][0]:
            heapq.heappop(heap)  # stale: that pair's count changed since it was pushed
        if not heap:
            break  # no pair left to merge
        _, pair = heapq.heappop(heap)
        new_id = 256 + len(merges)
        merges.append(pair)
        changed = set()
        for w in sorted(where.pop(pair)):
            ids, weight = words[w], weights[w]
            merged = merge(ids, pair, new_id)
            if len(merged) == len(ids):
                continue  # (the set is not pruned when a merge removes a pair from a word)
            before, after = pair_counts(ids), pair_counts(merged)
            for p in before.keys() | after.keys():
                delta = after[p] - before[p]
                if delta:
                    counts[p] += delta * weight
                    changed.add(p)
            for p in after:
                where[p].add(w)
            words[w] = merged
        for p in changed:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                del counts[p]
    n = 256 + len(merges)
    return Tokenizer(tuple(merges), pattern, tuple((t, n + k) for k, t in enumerate(special_tokens)))
