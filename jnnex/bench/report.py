"""``jnnex bench.report [DIR]``: the README's tables, rendered from the JSON results of the last full run.

Markdown, condensed: manual/``jax.grad``/``jax.vjp`` ratios per case and batch size, the accuracy table, and training
throughput as a fraction of the measured matmul peak and against PyTorch eager. Every figure comes from the JSON files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jnnex.bench.harness import RESULTS


def _md(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def backward(data: dict) -> str:
    by = {(r["case"], r["batch"], r["backward"]): r for r in data["rows"]}
    cases = list(dict.fromkeys(r["case"] for r in data["rows"]))
    batches = data["settings"]["batches"]
    rows = []
    for case in cases:
        cells = [case]
        for b in batches:
            m, g, v = (by[(case, b, k)] for k in ("manual", "jax.grad", "jax.vjp"))
            cells.append(f"{g['us_per_grad']:.0f} µs · **{m['vs_jax_grad']:.2f}** / {v['vs_jax_grad']:.2f}")
        g = by[(case, batches[-1], "jax.grad")]
        m = by[(case, batches[-1], "manual")]
        cells.append(f"{m['temp_bytes'] / 2**20:.1f} / {g['temp_bytes'] / 2**20:.1f} MiB, "
                     f"{m['buffers']} / {g['buffers']}")
        cells.append(f"{m['compile_s']:.2f} / {g['compile_s']:.2f} s")
        rows.append(cells)
    header = ["case", *(f"B={b}: jax.grad · manual / vjp" for b in batches),
              f"temp memory, buffers at B={batches[-1]} (manual / jax.grad)", "compile (manual / jax.grad)"]
    acc = [[r["case"], f"{r['f64 max abs']:.1e}", f"{r['f64 max rel']:.1e}", f"{r['f32 max abs']:.1e}",
            f"{r['f32 max rel']:.1e}", f"{r['f32 jax.grad vs f64']:.1e}"] for r in data["accuracy"]]
    acc_header = ["case", "f64 max abs", "f64 max rel", "f32 max abs", "f32 max rel", "f32 jax.grad vs f64 (rel)"]
    return _md(rows, header) + "\n\n" + _md(acc, acc_header)


def training(data: dict) -> str:
    rows = [[r["model"], r["batch"], r["step"], f"{r['us_per_step']:.0f}", f"{r['steps_per_s']:.0f}",
             f"{r['vs_jax_grad']:.2f}", f"{r['gflops']:.1f}", f"{100 * r['of_peak']:.0f} % of {r['peak_gflops']:.0f}",
             "" if r.get("torch_over_this") is None else f"{r['torch_over_this']:.2f}×"] for r in data["rows"]]
    header = ["model", "batch", "step", "µs/step", "steps/s", "vs jax.grad", "GFLOP/s", "of peak (XLA matmul in its rounds)",
              "faster than torch"]
    peak = data["matmul"]
    return ("float32 matmul rates at the start of the run (GFLOP/s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in peak["gflops"].items()) + f"; torch {data['torch']}. "
            + "\"Of peak\" divides by XLA's `jnp.dot` rate timed in the same rounds as the steps.\n\n"
            + _md(rows, header))


def wavenet(data: dict) -> str:
    rows = [[r["form"], r["gradients"], r["batch"], r["predicted_chars"], r["positions"], f"{r['us_per_step']:.0f}",
             f"{r['chars_per_s'] / 1e3:.0f}k", "" if r["conv_speedup"] is None else f"{r['conv_speedup']:.2f}×"]
            for r in data["rows"]]
    header = ["form", "gradients", "batch", "predicted chars", "positions computed", "µs/step", "chars/s",
              "conv speed-up"]
    st = data["settings"]
    return (f"{st['data']}: {st['chars_per_word']:.2f} predicted characters per word, padded to "
            f"{st['padded_length']} positions.\n\n" + _md(rows, header))


def gpt(data: dict) -> str:
    steps = [[r["batch"], r["step"], f"{r['us_per_step']:.0f}", f"{r['gflops']:.1f}",
              f"{100 * r['of_peak']:.0f} % of {r['peak_gflops']:.0f}",
              "" if r.get("torch_over_this") is None else f"{r['torch_over_this']:.2f}×"] for r in data["steps"]]
    header = ["batch", "step", "µs/step", "GFLOP/s", "of peak (XLA matmul in its rounds)", "faster than torch"]
    return (backward(data) + f"\n\nTraining step (AdamW, makemore's settings) on {data['device']}; "
            f"{data['torch']}.\n\n" + _md(steps, header))


def _short(column: str) -> str:
    """``"one H100 (…), NVLink (~400 GB/s)"`` -> ``"H100 / NVLink"``: device and link, for a table header."""
    device, link = column.split("), ", 1) if "), " in column else (column, "")
    device = "H100" if "H100" in device else "CPU"
    return f"all-reduce ÷ compute, {device} / {link.split(' (')[0]}"


def devices(data: dict) -> str:
    rows = [[r["model"], r["batch"], r["devices"], f"{r['us_per_step']:.0f}", f"{r['vs_cpu_x1']:.2f}×"]
            for r in data["rows"]]
    text = _md(rows, ["model", "batch", "devices", "µs/step", "time vs 1 CPU device"])
    if data.get("paper"):
        keys = [k for k in data["paper"][0] if k.startswith("allreduce/compute")]
        paper = [[r["model"], r["width"], f"{r['params']:,}", f"{r['grad_MB']:.3g}", f"{r['GFLOP_per_step']:.3g}",
                  f"{r['flop_per_byte']:.0f}", *(f"{r[k]:.3g}" for k in keys)] for r in data["paper"]]
        text += "\n\n" + _md(paper, ["model", "width", "params", "gradient MB", "GFLOP/step (batch 32)",
                                      "FLOP per all-reduced byte", *(_short(k.split(": ", 1)[1]) for k in keys)])
    return text


def main(argv=None) -> int:
    out_dir = Path((argv or sys.argv[1:] or [str(RESULTS)])[0])
    for name, render in (("backward", backward), ("training", training), ("wavenet", wavenet), ("gpt", gpt),
                         ("devices", devices)):
        path = out_dir / f"{name}.json"
        if path.is_file():
            print(f"### {name}\n\n{render(json.loads(path.read_text()))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
