"""``python -m benchmarks [--quick] [--only NAME ...] [--out DIR] [--png]`` (or ``jnnex bench …``): run the
benchmarks, print tables, write JSON (and, with ``--png``, time-vs-batch pictures; needs matplotlib)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks.harness import RESULTS, write

SUITES = ["moons", "backward", "training"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition (under a minute)")
    ap.add_argument("--only", nargs="+", choices=SUITES, help="run only these suites")
    ap.add_argument("--out", default=str(RESULTS), help=f"directory for the JSON results (default {RESULTS})")
    ap.add_argument("--png", action="store_true", help="also draw <suite>.png where a suite has a picture")
    args = ap.parse_args(argv)
    for name in args.only or SUITES:
        t0 = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        result = module.run(quick=args.quick)
        path = write(name + ("-quick" if args.quick else ""), {**result, "quick": args.quick}, args.out)
        print(f"\n## {name} ({time.perf_counter() - t0:.1f} s) -> {path}\n\n{result['table']}")
        if args.png and hasattr(module, "plot"):
            print(f"picture -> {module.plot(result, path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
