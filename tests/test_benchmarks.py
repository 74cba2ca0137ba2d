"""The benchmarks (:mod:`jnnex.bench`) run in quick mode and write their JSON and tables where they say."""

import json
import sys

import pytest

from jnnex.bench.__main__ import SUITES, main


@pytest.mark.slow
@pytest.mark.parametrize("suite", SUITES)
def test_quick_benchmarks_run_and_write_json(suite, tmp_path, capsys, monkeypatch, request):
    """Each suite on its own (so the two test processes share them): it runs, prints its table and writes JSON with
    no NaN figure."""
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch (never a dependency)
    if suite in ("text", "moe", "mup", "scaling"):
        request.getfixturevalue("shakespeare_txt")  # skipped, with the reason, where tiny Shakespeare is absent
    assert main(["--quick", "--only", suite, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert [p.name for p in tmp_path.glob("*.json")] == [f"{suite}-quick.json"]  # (mup's runs: a .jsonl beside)
    data = json.loads((tmp_path / f"{suite}-quick.json").read_text())
    assert data["quick"] is True and data["rows"] and "jax" in data["machine"]
    for row in data["rows"]:
        assert all(v == v for v in row.values() if isinstance(v, float))  # no NaN figures
    if suite == "moons":
        assert "| engine" in text
    if suite in ("backward", "gpt", "llama"):
        assert "| case" in text and {r["backward"] for r in data["rows"]} == {"manual", "jax.grad", "jax.vjp"}
        assert all(r["f64 max rel"] < 1e-12 for r in data["accuracy"])  # the hand-written gradients are right
        assert all(r["flops"] > 0 and r["bytes_accessed"] > 0 for r in data["rows"])  # XLA's count, each program
    if suite == "backward":  # every code path of the quick run: the cases it names, each measured
        from jnnex.bench.backward import QUICK
        assert {r["case"] for r in data["rows"]} == set(QUICK)
    if suite == "training":
        assert "| model" in text and "matmul GFLOP/s" in text
        assert all(0 < r["of_peak"] and r["steps_per_s"] > 0 for r in data["rows"])
        assert data["torch"] is None and "torch: not installed" in text
    if suite == "gpt":
        assert {r["step"] for r in data["steps"]} == {"jax.grad", "manual"} and "torch: not installed" in text
    if suite == "text":
        assert {r["step"] for r in data["steps"]} == {"jax.grad", "manual", "manual, bfloat16"}
        assert "torch: not installed" in text
        sizes = [r["bytes_per_token"] for r in data["compression"]]
        assert data["compression"][0]["vocab_size"] == 256 and sizes[0] == 1.0 and sizes == sorted(sizes)
        assert {r["sampler"] for r in data["kv_cache"]} == {"KV cache", "whole context"}
    if suite == "llama":  # the tiled attention's rows beside the plain one's, equal gradients
        assert {r["attention"] for r in data["attention"]} == {"plain (by hand)", "tiled 16 (by hand)",
                                                               "jax.vjp of plain", "jax.nn.dot_product_attention"}
        assert all(r["dq_rel_diff"] < 1e-5 and r["temp_MiB"] >= 0 for r in data["attention"])
    if suite == "sharding":  # FSDP leaves 1/N on each device; the split step's all-reduces are Megatron's formula
        for r in data["rows"]:  # 1/N, but for the optimiser's step counters (scalars, replicated): a few bytes more
            for key in ("of_1_device (arrays)", "of_1_device (XLA)"):
                assert r["1/N"] <= r[key] < r["1/N"] + 1e-3, (r["devices"], key, r[key])
        split = [r for r in data["collectives"] if r["scheme"] == "tp"]
        assert split and all(r["all-reduce model MB"] == r["Megatron 4·L·B_d·T·C MB"] for r in split)
    if suite == "gpt2":
        assert data["worst_f64_rel"] < 1e-12 and {r["step"] for r in data["rows"]} == {"jax.grad", "manual"}
    if suite == "scaling":  # every run kept for a resume, the law fitted, the held-out run predicted and measured
        assert len(data["rows"]) == 6 and len((tmp_path / "scaling-quick" / "sweep.jsonl").read_text().splitlines()) == 6
        assert data["held_out"]["measured"] > 0 and data["held_out"]["predicted"] > 0
        assert all(0 < r["6ND / XLA"] < 10 for r in data["flops"])
    if suite == "mup":  # every grid point ran and was kept for a resume; the coordinate check's two slopes a layer
        rows = data["transfer"]["rows"]
        assert len(rows) == 2 * 2 and all(r["val_loss"] > 0 for r in rows)  # 2 widths × 1 rate × 2 parametrisations
        assert len((tmp_path / "mup-quick" / "transfer.jsonl").read_text().splitlines()) == 4
        assert {r["layer"] for r in data["coordinates"]} == {"block 0", "block 1", "logits"}
    if suite == "names_goal":  # the narrow sweep, then the wide run at its best rate, each a resumable run directory
        narrow, checked, wide = data["rows"][:2], data["rows"][2:5], data["rows"][5:]
        assert [r["width"] for r in narrow] == [32, 32] and [r["width"] for r in wide] == [64]
        assert wide[0]["lr"] == data["best_lr"] == min(narrow, key=lambda r: r["dev"])["lr"]
        assert [r["lr"] / data["best_lr"] for r in checked] == [0.5, 1, 2] and {r["width"] for r in checked} == {48}
        assert len((tmp_path / "names-goal-quick" / "sweep.jsonl").read_text().splitlines()) == 6
        assert all((d / "metrics.json").is_file() for d in (tmp_path / "names-goal-quick").glob("w*"))
    if suite == "moe":  # equal active MLP parameters (to the rounding of the expert width), all more in total
        dense, *mixtures = data["rows"]
        for r in mixtures:
            assert abs(r["active_mlp_params_per_block"] / dense["active_mlp_params_per_block"] - 1) < 0.05
            assert r["total_params"] > dense["total_params"] and r["steps"] == dense["steps"]
    if suite == "pipeline":  # GPipe's and 1F1B's ticks give the formula's bubble; 1F1B keeps P micro-batches (its
        for r in data["rows"]:  # backward in two ticks too), GPipe M, the alternating schedule 2P - 1 — in the
            P, M = r["P"], r["M"]  # lockstep program's slots and in the host-driven runtime's own arrays; the
            held = {"gpipe": M, "1f1b": min(P, M), "1f1b/2": min(P, M),  # lockstep program never idles less
                    "alternating": min(2 * P - 1, M)}[r["schedule"]]
            assert r["schedule"] == "alternating" or abs(r["tick_bubble"] - r["formula"]) < 1e-12
            assert r["slots"] == held and abs(r["stored_vs_gpipe"] - held / M) < 1e-12
            assert r["temp_MiB"] > 0 and 0 < r["bubble_lockstep"] < 1
            if r["schedule"] != "1f1b/2":  # (the host-driven runtime runs a backward whole)
                assert abs(r["host_held_vs_gpipe"] - held / M) < 1e-12
                assert 0 < r["bubble_host"] <= r["bubble_lockstep"] + 1e-12
    if suite == "devices":  # the suite's processes have 4 CPU devices (conftest): measured here, no child process
        assert {r["devices"] for r in data["rows"]} == {"cpu x1", "cpu x2", "cpu x4"}


@pytest.mark.slow
def test_results_go_to_the_current_directory_by_default(tmp_path, capsys, monkeypatch):
    """Not into the installed package (what an installed jnnex's `jnnex bench` used to do)."""
    monkeypatch.chdir(tmp_path)
    assert main(["--quick", "--only", "moons"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["moons-quick.json"]
    assert "moons-quick.json" in capsys.readouterr().out
