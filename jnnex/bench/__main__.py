"""``jnnex bench [--quick] [--only NAME ...] [--out DIR] [--png]`` (also ``python -m jnnex.bench``): run the
benchmarks, print tables, write JSON into ``--out`` (default: the current directory) and, with ``--png``,
time-vs-batch pictures (needs matplotlib)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time

from jnnex.bench.harness import RESULTS, write

SUITES = ["moons", "backward", "training", "wavenet", "gpt", "llama", "recompute", "pipeline", "moe", "mup", "scaling",
          "names_goal", "devices", "text", "sharding", "gpt2"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jnnex bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition (under a minute)")
    ap.add_argument("--only", nargs="+", choices=SUITES, help="run only these suites")
    ap.add_argument("--out", default=str(RESULTS), help="directory for the JSON results (default: the current directory)")
    ap.add_argument("--png", action="store_true", help="also draw <suite>.png where a suite has a picture")
    args = ap.parse_args(argv)
    for name in args.only or SUITES:
        t0 = time.perf_counter()
        module = importlib.import_module(f"jnnex.bench.{name}")
        takes_out = "out" in inspect.signature(module.run).parameters  # (a suite that keeps its runs beside the JSON)
        try:
            result = module.run(quick=args.quick, **({"out": args.out} if takes_out else {}))
        except KeyboardInterrupt as e:  # (Ctrl-C; a sweep's own stop says what continues it)
            print(f"jnnex bench: {name} stopped{f': {e}' if str(e) else ''}", file=sys.stderr)
            return 130
        path = write(name + ("-quick" if args.quick else ""), {**result, "quick": args.quick}, args.out)
        print(f"\n## {name} ({time.perf_counter() - t0:.1f} s) -> {path}\n\n{result['table']}")
        if args.png and hasattr(module, "plot"):
            print(f"picture -> {module.plot(result, path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
