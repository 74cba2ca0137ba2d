import json
import sys

import pytest

from jnnex.bench.__main__ import SUITES, main


@pytest.mark.slow
def test_quick_benchmarks_run_and_write_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch (never a dependency)
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| engine" in text and "| case" in text and "| model" in text and "matmul GFLOP/s" in text
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(f"{s}-quick.json" for s in SUITES)
    for f in tmp_path.glob("*.json"):
        data = json.loads(f.read_text())
        assert data["quick"] is True and data["rows"] and "jax" in data["machine"]
        for row in data["rows"]:
            assert all(v == v for v in row.values() if isinstance(v, float))  # no NaN figures
    backward = json.loads((tmp_path / "backward-quick.json").read_text())
    assert {r["backward"] for r in backward["rows"]} == {"manual", "jax.grad", "jax.vjp"}
    assert all(r["f64 max rel"] < 1e-12 for r in backward["accuracy"])  # the hand-written gradients are right
    training = json.loads((tmp_path / "training-quick.json").read_text())
    assert all(0 < r["of_peak"] and r["steps_per_s"] > 0 for r in training["rows"])
    assert training["torch"] is None and "torch: not installed" in text


@pytest.mark.slow
def test_results_go_to_the_current_directory_by_default(tmp_path, capsys, monkeypatch):
    """Not into the installed package (what an installed jnnex's `jnnex bench` used to do)."""
    monkeypatch.chdir(tmp_path)
    assert main(["--quick", "--only", "moons"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["moons-quick.json"]
    assert "moons-quick.json" in capsys.readouterr().out
