"""The byte-level BPE tokenizer (:mod:`jnnex.bpe`): the Wikipedia example, round trips over any Unicode, training
equal to the plain recount-everything algorithm (ties included), encoding by rank equal to applying the merges in
order, files, special tokens, and every refusal naming what was wrong."""

import regex
import pytest
from hypothesis import given, strategies as st

from jnnex import bpe

# Any string UTF-8 can hold: every character but the surrogates (category Cs), emoji, CJK, combining marks included.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
CORPUS = ("Hello world's 123 numbers, hello again! 안녕하세요 👋 (café, cafe\u0301) 你好，世界。\n\n"
          "    indented\tand\r\nwindows lines; the the the thee thou 1234567 😉😉") * 3


def reference_train(text: str, vocab_size: int, pattern) -> list[tuple[int, int]]:
    """minbpe's algorithm as the lecture writes it: recount every pair of every piece at every merge; ties to the
    smaller pair (the documented rule)."""
    pieces = [list(p.encode("utf-8")) for p in ([text] if pattern is None else regex.findall(pattern, text))]
    merges = []
    for new_id in range(256, vocab_size):
        counts = {}
        for ids in pieces:
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        pieces = [bpe.merge(ids, pair, new_id) for ids in pieces]
    return merges


def reference_encode(tok: bpe.Tokenizer, text: str) -> list[int]:
    """Every merge applied in rank order to each piece (what encoding by the lowest rank present must equal)."""
    out = []
    for piece in ([text] if tok.pattern is None else regex.findall(tok.pattern, text)):
        ids = list(piece.encode("utf-8"))
        for r, pair in enumerate(tok.merges):
            ids = bpe.merge(ids, pair, 256 + r)
        out += ids
    return out


def test_the_wikipedia_example():
    tok = bpe.train("aaabdaaabac", 256 + 3, pattern=None)
    # aa (4 times) -> 256; then (97, 98) "ab" and (256, 97) "Za" both twice: the smaller pair; then Z Y.
    assert tok.merges == ((97, 97), (97, 98), (256, 257))
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"
    assert tok.vocab[258] == b"aaab"


@pytest.mark.parametrize("pattern", [None, bpe.GPT2_SPLIT_PATTERN, bpe.GPT4_SPLIT_PATTERN],
                         ids=["basic", "gpt2", "gpt4"])
def test_training_equals_the_plain_algorithm_and_is_deterministic(pattern):
    """The incremental counts (only the pieces a merge touched are recounted) give the merges of recounting
    everything, on a text with ties, repeats and multi-byte characters; twice the same."""
    want = reference_train(CORPUS, 256 + 60, pattern)
    tok = bpe.train(CORPUS, 256 + 60, pattern=pattern)
    assert list(tok.merges) == want and len(want) == 60
    assert bpe.train(CORPUS, 256 + 60, pattern=pattern) == tok


@given(text=TEXT, n_merges=st.integers(0, 30), kind=st.sampled_from([None, bpe.GPT4_SPLIT_PATTERN]))
def test_training_equals_the_plain_algorithm_on_any_text(text, n_merges, kind):
    assert list(bpe.train(text, 256 + n_merges, pattern=kind).merges) == reference_train(text, 256 + n_merges, kind)


@pytest.fixture(scope="module", params=[None, bpe.GPT2_SPLIT_PATTERN, bpe.GPT4_SPLIT_PATTERN],
                ids=["basic", "gpt2", "gpt4"])
def tokenizer(request):
    return bpe.train(CORPUS, 256 + 80, pattern=request.param, special_tokens=["<|endoftext|>"])


@given(text=TEXT)
def test_decode_encode_is_the_identity_on_any_string(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids == reference_encode(tokenizer, text)  # merges by rank = every merge in order


def test_round_trips_of_the_hard_cases(tokenizer):
    for text in ("", "?", "안녕하세요 👋 (hello)", "e\u0301\u0301", "👨‍👩‍👧", "\x00\x7f\n\r\n\t", CORPUS):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode(CORPUS)
    assert len(ids) < len(CORPUS.encode()) and ids == reference_encode(tokenizer, CORPUS)


def test_a_lone_surrogate_is_refused_naming_where():
    tok = bpe.train("abc", 257, pattern=None)
    for call in (lambda: tok.encode("ab\ud800c"), lambda: bpe.train("ab\udfffc", 300)):
        with pytest.raises(ValueError, match=r"lone surrogate U\+D[8F]\w\w at index 2"):
            call()


def test_special_tokens_only_where_allowed(tokenizer):
    eot = "<|endoftext|>"
    (token, eot_id), = tokenizer.special
    assert token == eot and eot_id == tokenizer.vocab_size - 1 == 256 + len(tokenizer.merges)
    text = f"hello{eot}world"
    with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>' at index 5.*allowed_special"):
        tokenizer.encode(text)
    ids = tokenizer.encode(text, allowed_special={eot})
    assert ids == tokenizer.encode("hello") + [eot_id] + tokenizer.encode("world")
    assert tokenizer.encode(text, allowed_special="all") == ids
    ordinary = tokenizer.encode(text, allowed_special="none")
    assert eot_id not in ordinary and tokenizer.decode(ordinary) == text == tokenizer.decode(ids)
    with pytest.raises(ValueError, match=r"allowed_special names \['<\|fim\|>'\]"):
        tokenizer.encode("x", allowed_special={"<|fim|>"})
    with pytest.raises(ValueError, match="allowed_special must be"):
        tokenizer.encode("x", allowed_special="some")


def test_save_load_gives_the_same_tokenizer_and_ids(tokenizer, tmp_path):
    path = tmp_path / "tok.bpe"
    tokenizer.save(path)
    loaded = bpe.load(path)
    assert loaded == tokenizer and loaded.encode(CORPUS) == tokenizer.encode(CORPUS)
    lines = path.read_text().splitlines()
    assert lines[0] == "jnnex-bpe 1" and lines[2] == "special 1" and lines[4] == "merges 79"  # 256 + 79 + 1
    assert lines[5] == " ".join(map(str, tokenizer.merges[0]))  # one merge a line: readable and diffable


def test_describe_prints_the_merges_as_text():
    # "e " and " e" twice each: the smaller pair (32, 101) first; then four pairs once each, (10, 10) the smallest
    tok = bpe.train("e e e\n\n", 259, pattern=None, special_tokens=["<|e|>"])
    assert tok.describe().splitlines() == ["[ ][e] -> [ e] 256", "[\\u000a][\\u000a] -> [\\u000a\\u000a] 257",
                                           "special '<|e|>' 258"]


@pytest.mark.parametrize("content, message", [
    ("", r"is not a jnnex BPE tokenizer file \(its first line should be 'jnnex-bpe 1', found ''\)"),
    ('{"merges": []}\n', r"is not a jnnex BPE tokenizer file"),
    ('jnnex-bpe 1\npattern null\nspecial 0\nmerges 2\n97 98\n', r"line 6: the file ends after 1 of its 2 merges"),
    ('jnnex-bpe 1\npattern null\nspecial 0\nmerges 1\n97 x\n', r"line 5: expected a merge, two ids, found '97 x'"),
    ('jnnex-bpe 1\npattern null\nspecial 0\nmerges 1\n97 300\n', r"merge 0 \(97, 300\) refers to an id not yet made"),
    ('jnnex-bpe 1\npattern nul\nspecial 0\nmerges 0\n', r"line 2: the pattern is not a JSON string"),
    ('jnnex-bpe 1\npattern "("\nspecial 0\nmerges 0\n', r"its split pattern does not compile"),
    ('jnnex-bpe 1\npattern null\nspecial x\nmerges 0\n', r"line 3: expected a count after 'special '"),
    ('jnnex-bpe 1\npattern null\nspecial 1\n"<|e|>" 9\nmerges 0\n', r"special token '<\|e\|>' has id 9"),
    ('jnnex-bpe 1\npattern null\nspecial 0\nmerges 0\nmore\n', r"line 5: unexpected text after the 0 merges"),
])
def test_a_corrupt_or_foreign_file_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "tok.bpe"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        bpe.load(path)
    assert str(path) in str(e.value)


def test_other_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer file .*nothing.bpe' does not exist"):
        bpe.load(tmp_path / "nothing.bpe")
    (tmp_path / "bin.bpe").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        bpe.load(tmp_path / "bin.bpe")
    for size in (255, 256.0, "512"):
        with pytest.raises(ValueError, match="vocab_size must be an integer of at least 256"):
            bpe.train("abc", size)
    with pytest.raises(ValueError, match=r"at least 256 \(the bytes\) \+ 1 \(the special tokens\)"):
        bpe.train("abc", 256, special_tokens=["<|e|>"])
    tok = bpe.train("abc", 258, pattern=None)
    with pytest.raises(ValueError, match=r"token id 258 is outside this tokenizer's vocabulary \(0 .. 257\)"):
        tok.decode([97, 258])
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tok.encode(b"abc")


def test_training_stops_when_no_pair_is_left():
    tok = bpe.train("ab", 1000, pattern=None)
    assert tok.merges == ((97, 98),) and tok.vocab_size == 257


def test_the_split_patterns_are_gpt2s_and_gpt4s():
    text = "Hello world's  123456 HOW'S\n\nx"
    assert regex.findall(bpe.GPT2_SPLIT_PATTERN, text) == ["Hello", " world", "'s", " ", " 123456", " HOW", "'", "S",
                                                           "\n", "\n", "x"]  # (GPT-2 leaves "\n" to the word)
    assert regex.findall(bpe.GPT4_SPLIT_PATTERN, text) == ["Hello", " world", "'s", " ", " ", "123", "456", " HOW",
                                                           "'S", "\n\n", "x"]


@pytest.mark.slow
def test_tiny_shakespeare_at_512(shakespeare_txt):
    """The benchmark's case, checked: 256 merges on the whole file, the file encoded and decoded back."""
    text = shakespeare_txt.read_text(encoding="utf-8")
    tok = bpe.train(text, 512)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(tok.merges) == 256
    assert 1.9 < len(text.encode()) / len(ids) < 2.2  # bytes per token: (measured 2.04)


def test_merges_are_applied_by_rank_not_leftmost_first():
    """"abc" with merges (b, c) then (a, b): rank 0 comes first, so b c merges and a stays alone — an encoder that
    merges the leftmost mergeable pair would give (a b) c."""
    tok = bpe.Tokenizer(merges=((98, 99), (97, 98)), pattern=None)
    assert tok.encode("abc") == [97, 256]
    assert tok.encode("ababc") == [257, 97, 256]  # the first "ab" has no "c" after it: rank 1 merges it


def test_a_texts_bpe_is_trained_on_its_train_part_only(tmp_path):
    """The merges never see the validation text: here its last 10 % is one long run of "q", whose pair would be the
    most frequent in the whole file (99 times; no pair of the train part occurs more than a few times)."""
    import random

    from jnnex import text

    rng = random.Random(0)
    train = "".join(rng.choice("abcdefghijklmnop ") for _ in range(900))
    path = tmp_path / "t.txt"
    path.write_text(train + "q" * 100)
    assert bpe.train(train + "q" * 100, 257).merges == ((113, 113),)  # (the leak this test would see)
    tok = text.make_tokenizer(path, "bpe", 300, val_fraction=0.1)
    leaked = [tok.vocab[i] for i in range(256, tok.vocab_size) if b"q" in tok.vocab[i]]
    assert not leaked, f"merged tokens hold 'q', which only the validation part has: {leaked[:5]}"
    assert tok.merges == bpe.train(train, 300).merges


def test_a_vocabulary_the_text_cannot_fill_is_refused_naming_the_largest(tmp_path):
    """A BPE of 20,000 tokens asked of a text whose training part runs out of pairs long before: an error naming
    the largest it supports (it was silently smaller), and that size is accepted."""
    from jnnex import text

    path = tmp_path / "t.txt"
    path.write_text("the cat sat on the mat, and the dog sat on the log.\n" * 30)
    with pytest.raises(ValueError, match=r"--vocab-size 20,000: .* no pair of tokens left to merge after (\d+) merges, "
                                         r"so its vocabulary stops at (\d+); give --vocab-size \2 or less") as e:
        text.make_tokenizer(path, "bpe", 20_000)
    largest = int(str(e.value).split("give --vocab-size ")[1].split()[0])
    assert text.make_tokenizer(path, "bpe", largest).vocab_size == largest
