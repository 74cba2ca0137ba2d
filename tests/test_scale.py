"""``jnnex scale`` and the sweeps of :mod:`jnnex.scale`: what is typed is what runs, a sweep resumes where it stopped
(a stopped run leaves no row and runs again), a sweep started in a directory made with other settings is refused, the
law's prediction is made before its run."""

import dataclasses
import json

import pytest

from jnnex import scale
from jnnex.cli import main

TINY = ["--n-layer", "1", "--steps", "4", "--batch-size", "8"]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_transfer_sweep_writes_every_run_resumes_and_grows(tmp_path, capsys, monkeypatch):
    out = tmp_path / "tr"
    argv = ["scale", "transfer", "--widths", "16,32", "--lrs", "2^-8", "--base-width", "16", "--out", str(out), *TINY]
    assert main(argv) == 0
    first = rows(out / "transfer.jsonl")
    assert len(first) == 2 * 2 and {(r["param"], r["width"]) for r in first} == {
        (p, w) for p in ("standard", "mup") for w in (16, 32)}
    result = json.loads((out / "transfer.json").read_text())
    assert {r["param"] for r in result["rows"]} == {"standard", "mup"} and "| param" in capsys.readouterr().out
    recorded = json.loads((out / "scale.json").read_text())
    assert recorded["base_width"] == 16 and recorded["run"]["train_config"]["steps"] == 4  # what was typed

    def no_training(*a, **k):
        raise AssertionError("a finished run was made again")

    monkeypatch.setattr(scale, "_fit", no_training)
    assert main(argv) == 0 and rows(out / "transfer.jsonl") == first  # read back, nothing run
    monkeypatch.undo()
    grown = argv[:3] + ["16,32,48"] + argv[4:]
    assert main(grown) == 0  # one width more: only its runs are made
    after = rows(out / "transfer.jsonl")
    assert after[:4] == first and {r["width"] for r in after[4:]} == {48} and len(after) == 6


def test_a_sweep_stopped_in_a_run_keeps_the_finished_ones_and_reruns_that_one(tmp_path, capsys, monkeypatch):
    import jnnex.train

    out = tmp_path / "tr"
    argv = ["scale", "transfer", "--widths", "16,32", "--lrs", "2^-8", "--params", "mup", "--out", str(out), *TINY]
    real, calls = jnnex.train.fit, []

    def stopped_second(*a, **k):  # the second run stops as Ctrl-C or SIGTERM stop fit: interrupted, no evaluation
        calls.append(1)
        result = real(*a, **k)
        return dataclasses.replace(result, interrupted=True, evals=[]) if len(calls) == 2 else result

    monkeypatch.setattr(jnnex.train, "fit", stopped_second)
    assert main(argv) == 130
    assert "the same command continues the sweep" in capsys.readouterr().err
    assert [r["width"] for r in rows(out / "transfer.jsonl")] == [16]  # no row for the stopped run
    monkeypatch.undo()
    assert main(argv) == 0
    assert [r["width"] for r in rows(out / "transfer.jsonl")] == [16, 32]


def test_a_sweep_in_a_directory_of_another_sweep_is_refused_naming_what_differs(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["scale", "coord", "--widths", "16,32", "--out", str(out), "--n-layer", "1", "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["scale", "coord", "--widths", "16,32", "--out", str(out), "--n-layer", "2", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds a sweep made with other settings" in err and "run.model_config.n_layer 1 there, 2 here" in err


def test_the_coordinate_check_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["scale", "coord", "--widths", "16,32,64", "--base-width", "16", "--out", str(out), "--n-layer", "1",
                 "--steps", "2", "--lr", "3e-3"]) == 0
    result = json.loads((out / "coord.json").read_text())["result"]
    assert set(result) == {"standard", "mup"} and result["mup"]["steps"] == 2 and result["mup"]["lr"] == 3e-3
    assert result["standard"]["slopes"]["block 0"] > 0.3 > abs(result["mup"]["slopes"]["block 0"])


@pytest.mark.slow
def test_the_law_is_predicted_before_its_run_is_made(tmp_path, capsys):
    out = tmp_path / "law"
    assert main(["scale", "law", "--widths", "16,24,32", "--step-counts", "4", "--budgets", "1e9", "--predict", "48:8",
                 "--param", "mup",
                 "--base-width", "16", "--out", str(out), "--n-layer", "1", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed.index("predicted before the run") < printed.index("{'width': 48, 'steps': 8}")
    result = json.loads((out / "law.json").read_text())["result"]
    held = result["held_out"]
    assert len(result["rows"]) == 6 and len(rows(out / "law.jsonl")) == 6 and len(rows(out / "held_out.jsonl")) == 1
    iso = [r for r in result["rows"] if r["steps"] != 4]  # the IsoFLOP profile: each width spends 1e9
    assert sorted(r["width"] for r in iso) == [16, 24, 32] and result["isoflop"][0]["C"] == 1e9
    assert all(abs(r["flops_6ND"] - 1e9) <= 6 * r["N"] * r["D"] / r["steps"] / 2 for r in iso)  # to half a step
    assert held["error"] == pytest.approx(held["predicted"] / held["measured"] - 1)
    assert held["N"] > max(r["N"] for r in result["rows"])
    per_step = [r["D"] / r["steps"] for r in result["rows"]] + [held["D"] / held["steps"]]
    assert per_step == pytest.approx([per_step[0]] * 7, rel=1e-12) and per_step[0] > 0  # D: steps × a step's tokens


def test_the_law_fitted_to_losses_it_made_gives_back_its_five_numbers():
    """Noise-free losses of Chinchilla's published law (Hoffmann et al. 2022: E 1.69, A 406.4, B 410.7, α 0.34,
    β 0.28) on a 3 × 3 grid of sizes and token counts: the fit finds the law again, and its residual is nil."""
    import numpy as np

    N, D = (a.ravel() for a in np.meshgrid([1e4, 3e4, 1e5], [2e5, 1e6, 5e6]))
    want = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    fit = scale.fit_law(N, D, scale.law(want, N, D))
    assert fit["residual"] < 1e-9
    for k, v in want.items():
        assert fit[k] == pytest.approx(v, rel=1e-6), (k, fit)
