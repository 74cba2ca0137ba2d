"""Pictures of a run (:mod:`jnnex.plot`): the loss curve and the embedding table as PNG files; a table of the wrong
size is a clear error."""

import json

import numpy as np
import pytest

from jnnex.data import Vocab


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from jnnex import plot

    rows = [{"step": s, "loss": 3.0 - s / 100, "train_loss": 2.9 - s / 100, "dev_loss": 3.0 - s / 120}
            for s in (10, 20, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot.plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    v = Vocab.from_words(["abc"])
    png = plot.plot_embeddings(np.random.default_rng(0).normal(size=(4, 2)), v, tmp_path / "emb.png")
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="embedding table"):
        plot.plot_embeddings(np.zeros((3, 2)), v, tmp_path / "bad.png")


def test_a_text_runs_tokens_are_labelled(tmp_path):
    """A text's tokenizer (characters, or BPE) labels the embedding picture with what each id decodes to."""
    pytest.importorskip("matplotlib")
    from jnnex import bpe, plot
    from jnnex.text import Chars

    for tok in (Chars.from_text("to be or not"), bpe.train("to be or not to be", 260, pattern=None)):
        V = tok.vocab_size
        png = plot.plot_embeddings(np.random.default_rng(0).normal(size=(V, 2)), tok, tmp_path / f"emb{V}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with pytest.raises(ValueError, match=f"expected an embedding table \\(V={V}"):
            plot.plot_embeddings(np.zeros((V + 1, 2)), tok, tmp_path / "bad.png")
