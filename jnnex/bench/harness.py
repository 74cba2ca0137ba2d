"""Measuring side by side: interleaved repetitions in one process, medians and spreads, JSON + a readable table.

This machine is shared and noisy, so a figure only means something next to its competitor measured in the same run:
every benchmark times its contenders round-robin (A B C A B C …) and reports medians and ratios.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jnnex.rundir import write_json
from jnnex.text import Stream

RESULTS = Path(".")  # the current directory, unless --out says otherwise


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Call each contender once per round, ``repeats`` rounds; ``{name: {median, min, max, spread}}`` in seconds.

    Each callable must block until its work is done (``jax.block_until_ready``). Call them once first to compile.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: summary(ts) for name, ts in times.items()}


def summary(ts: list[float]) -> dict[str, float]:
    med = statistics.median(ts)
    return {"median": med, "min": min(ts), "max": max(ts), "spread": (max(ts) - min(ts)) / med if med else 0.0,
            "n": len(ts)}


def machine() -> dict:
    import optax

    return {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "device": str(jax.devices()[0]),
            "cpu_count": __import__("os").cpu_count()}


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    write_json(path, {"machine": machine(), **payload})
    return path


def progress(line: str) -> None:
    """A sweep's progress line, printed at once (a suite's output is often a file or a pipe: buffered otherwise)."""
    print(line, flush=True)


def quick_splits(splits, val_tokens: int = 8192):
    """A quick run's text (:class:`jnnex.text.TextSplits`): the validation stream cut to its first ``val_tokens``
    tokens, so that evaluating every window of it takes a fraction of a second (a full run evaluates all of it)."""
    return dataclasses.replace(splits, parts=(splits.train, Stream(splits.parts[1].tokens[:val_tokens])))
