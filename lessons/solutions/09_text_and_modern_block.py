"""Solutions to lesson 9's BPE exercise, minbpe's ``exercise.md`` steps (read them after trying).

The lesson's page supplies two helpers: ``get_stats(ids, counts)``, the counts of adjacent pairs, and
``merge(ids, pair, idx)``, which replaces every occurrence of ``pair`` by ``idx``. The answers are in ``SOLUTIONS``:

- step 1, the basic tokenizer: ``train_basic``, ``encode_basic`` and ``decode``;
- step 2, the regex split: ``train_regex`` and ``encode_regex``;
- step 3, special tokens: ``encode_special``.

Ties in training go to the smaller pair, as ``jnnex.bpe`` breaks them. ``SLIP`` plants two classic mistakes, and
the grader must name exactly those steps:

- encoding by merging the leftmost mergeable pair instead of the lowest-ranked one;
- regex training that counts the pairs across the chunks' boundaries, as if the text had not been split.
"""

import regex


def _best(counts):
    return min(counts, key=lambda p: (-counts[p], p))  # the most frequent pair; ties to the smaller pair


def train_basic(text, vocab_size, get_stats, merge):
    ids, merges = list(text.encode("utf-8")), []
    for idx in range(256, vocab_size):
        counts = get_stats(ids, {})
        if not counts:
            break
        pair = _best(counts)
        ids = merge(ids, pair, idx)
        merges.append(pair)
    return merges


def _encode_chunk(ids, ranks, get_stats, merge):
    while len(ids) >= 2:
        pair = min(get_stats(ids, {}), key=lambda p: ranks.get(p, float("inf")))  # the lowest rank present
        if pair not in ranks:
            break
        ids = merge(ids, pair, 256 + ranks[pair])
    return ids


def encode_basic(text, merges, get_stats, merge):
    ranks = {pair: r for r, pair in enumerate(merges)}
    return _encode_chunk(list(text.encode("utf-8")), ranks, get_stats, merge)


def decode(ids, merges):
    vocab = {i: bytes([i]) for i in range(256)}
    for r, (a, b) in enumerate(merges):
        vocab[256 + r] = vocab[a] + vocab[b]
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def train_regex(text, vocab_size, pattern, get_stats, merge):
    chunks, merges = [list(c.encode("utf-8")) for c in regex.findall(pattern, text)], []
    for idx in range(256, vocab_size):
        counts = {}
        for ids in chunks:  # pairs within a chunk only: never across the split
            get_stats(ids, counts)
        if not counts:
            break
        pair = _best(counts)
        chunks = [merge(ids, pair, idx) for ids in chunks]
        merges.append(pair)
    return merges


def encode_regex(text, merges, pattern, get_stats, merge):
    ranks = {pair: r for r, pair in enumerate(merges)}
    return [i for c in regex.findall(pattern, text) for i in _encode_chunk(list(c.encode("utf-8")), ranks,
                                                                            get_stats, merge)]


def encode_special(text, merges, pattern, special, get_stats, merge):
    split = "(" + "|".join(regex.escape(s) for s in special) + ")"
    ids = []
    for part in regex.split(split, text):  # the special tokens, captured, are the odd parts
        if part in special:
            ids.append(special[part])
        elif part:
            ids.extend(encode_regex(part, merges, pattern, get_stats, merge))
    return ids


def _leftmost(text, merges, get_stats, merge):
    ranks = {pair: r for r, pair in enumerate(merges)}
    ids = list(text.encode("utf-8"))
    while True:
        pair = next((p for p in zip(ids, ids[1:]) if p in ranks), None)  # the first mergeable pair, not the best
        if pair is None:
            return ids
        ids = merge(ids, pair, 256 + ranks[pair])


def _across_chunks(text, vocab_size, pattern, get_stats, merge):
    return train_basic("".join(regex.findall(pattern, text)), vocab_size, get_stats, merge)  # the split is lost


SOLUTIONS = {"train_basic": train_basic, "encode_basic": encode_basic, "decode": decode, "train_regex": train_regex,
             "encode_regex": encode_regex, "encode_special": encode_special}
SLIP = {"encode_basic": _leftmost, "train_regex": _across_chunks}
