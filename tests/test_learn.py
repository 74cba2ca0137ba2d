"""The lessons' helpers (:mod:`jnnex.learn`): the size switch, pictures (titled and labelled, or a named error; saved
as PNG from a script), the RESULT line and its reader, the exercise answers, the data found or stood in for, the
graph picture of a scalar computation."""

from pathlib import Path

import pytest

from jnnex import learn
from jnnex.micrograd.engine import Value


def test_the_size_switch(monkeypatch):
    monkeypatch.delenv(learn.SIZE_ENV, raising=False)
    assert not learn.tiny() and learn.pick(100, 3) == 100
    monkeypatch.setenv(learn.SIZE_ENV, "tiny")
    assert learn.tiny() and learn.pick(100, 3) == 3
    monkeypatch.setenv(learn.SIZE_ENV, "huge")
    with pytest.raises(ValueError, match="JNNEX_LESSON_SIZE must be 'tiny' or 'full', got 'huge'"):
        learn.tiny()


def test_a_picture_is_saved_and_an_unlabelled_one_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(learn.OUT_ENV, str(tmp_path))
    plt = learn.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ax.set(title="t", xlabel="x", ylabel="y")
    path = learn.show(fig, "ok")
    assert path == tmp_path / "ok.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert f"[picture] {path}" in capsys.readouterr().out
    fig, ax = plt.subplots()
    ax.set(title="no axis labels")
    with pytest.raises(ValueError, match="picture 'bare': every axis needs a title .* and labelled axes"):
        learn.show(fig, "bare")


def test_the_result_line_round_trips(capsys):
    assert learn.result(loss=2.123456789, wrong=["dx"], steps=3) is None  # (a notebook shows the line once)
    out = capsys.readouterr().out
    assert out.count("RESULT") == 1
    assert learn.read_result("noise\n" + out) == {"loss": 2.12346, "wrong": ["dx"], "steps": 3}
    with pytest.raises(ValueError, match="no RESULT line"):
        learn.read_result("nothing here")


def test_exercise_answers(monkeypatch):
    mine = {"dx": "mine"}
    monkeypatch.delenv(learn.ANSWERS_ENV, raising=False)
    assert learn.answers("07_gpt", mine) == mine
    monkeypatch.setenv(learn.ANSWERS_ENV, "solutions")
    solved = learn.answers("07_gpt", mine)
    monkeypatch.setenv(learn.ANSWERS_ENV, "slip")
    slipped = learn.answers("07_gpt", mine)
    assert set(solved) == set(slipped) == {"layernorm_backward"}
    assert solved["layernorm_backward"] is not slipped["layernorm_backward"]
    monkeypatch.setenv(learn.ANSWERS_ENV, "cheat")
    with pytest.raises(ValueError, match="JNNEX_LESSON_ANSWERS must be one of mine, solutions, slip"):
        learn.answers("07_gpt", mine)
    monkeypatch.setenv(learn.ANSWERS_ENV, "solutions")
    with pytest.raises(ValueError, match="no solutions file"):
        learn.answers("99_nothing", mine)


def test_the_data_is_found_or_stood_in_for(monkeypatch, tmp_path):
    monkeypatch.setenv(learn.SIZE_ENV, "tiny")
    words, source = learn.names()
    assert source == "census-first" and len(words) > 1000
    path, what = learn.shakespeare()
    assert "stand-in" in what and Path(path).read_text().count("\n") == len(words)
    assert learn.shakespeare()[0] == path  # one file for every run, not a new one each (lessons leaked them)
    monkeypatch.setenv(learn.SIZE_ENV, "full")
    monkeypatch.setenv(learn.NAMES_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="JNNEX_NAMES=.*missing.txt'.*no such file"):
        learn.names()
    (tmp_path / "n.txt").write_text("emma\nava\n")
    monkeypatch.setenv(learn.NAMES_ENV, str(tmp_path / "n.txt"))
    assert learn.names() == (["emma", "ava"], str(tmp_path / "n.txt"))


def test_the_graph_picture_has_a_box_per_value():
    a, b = Value(2.0), Value(-3.0)
    L = a * b + a
    L.backward()
    fig = learn.draw_graph(L)
    texts = [t.get_text() for t in fig.axes[0].texts if t.get_text()]  # (the arrows are empty annotations)
    assert len(texts) == 4 and any("grad -2" in t for t in texts)  # a, b, a·b, a·b + a; dL/da = b + 1 = -2
    assert fig.axes[0].get_title() and fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()
