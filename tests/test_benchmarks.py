import json

from benchmarks.__main__ import main


def test_quick_benchmarks_run_and_write_json(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| engine" in text
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files and all(f.endswith("-quick.json") for f in files)
    for f in tmp_path.glob("*.json"):
        data = json.loads(f.read_text())
        assert data["quick"] is True and data["rows"] and "jax" in data["machine"]
        for row in data["rows"]:
            assert all(v == v for v in row.values() if isinstance(v, float))  # no NaN figures
