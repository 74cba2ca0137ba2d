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


def test_the_sweeps_pictures_draw_from_their_results(tmp_path):
    """``jnnex scale``'s pictures from kept results: the law with its IsoFLOP profiles (two panels), the coordinate
    check and the learning-rate sweep (the μP bench's), and the names goal's."""
    pytest.importorskip("matplotlib")
    from pathlib import Path

    from jnnex import plot

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    law = json.loads((results / "isoflop" / "law.json").read_text())["result"]
    assert sum(r["N_opt"] is not None for r in law["isoflop"]) == 4  # each budget's minimum inside the runs' sizes
    two = plot.plot_sweep("law", law, tmp_path / "law.png")
    mup = json.loads((results / "mup.json").read_text())
    one = plot.plot_sweep("law", {**law, "isoflop": []}, tmp_path / "law1.png")
    import matplotlib.image
    assert matplotlib.image.imread(two).shape[1] > 1.8 * matplotlib.image.imread(one).shape[1]  # the profiles' panel
    for kind, result in [("coord", mup["coord_runs"]), ("transfer", mup["transfer"])]:
        assert plot.plot_sweep(kind, result, tmp_path / f"{kind}.png").stat().st_size > 1000
    from jnnex.bench import names_goal
    assert names_goal.plot(json.loads((results / "names_goal.json").read_text()), tmp_path / "ng.png").stat().st_size \
        > 1000
