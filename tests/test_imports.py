"""The package's import graph: printed by ``python tests/test_imports.py`` (exit 1 on a cycle or a broken rule), and
checked by the suite.

Rules: no import cycle among jnnex's modules (function-level imports count too); no private name (``_x``) imported from
another module; the library never imports anything called ``benchmarks``.
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jnnex"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """``(edges, problems)``: every jnnex module -> the jnnex modules it imports; rule breaks found on the way."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    problems = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [(node.module, a.name) for a in node.names]
            else:
                continue
            for target, name in targets:
                if target.split(".")[0] == "benchmarks":
                    problems.append(f"{mod} imports {target}: the library never imports the benchmarks")
                if not target.startswith("jnnex"):
                    continue
                if name and f"{target}.{name}" in mods:  # `from jnnex.models import bigram`: the submodule
                    edges[mod].add(f"{target}.{name}")
                    continue
                if name and name.startswith("_") and not name.startswith("__"):
                    problems.append(f"{mod} imports the private name {name} from {target}")
                if target in mods and target != mod:
                    edges[mod].add(target)
    return edges, problems


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle_and_no_broken_rule():
    edges, problems = graph()
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))
    assert not problems, problems
    assert "jnnex.diagnostics" not in edges["jnnex.lm"] and "jnnex.train" not in edges["jnnex.diagnostics"]


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


if __name__ == "__main__":
    edges, problems = graph()
    for m in sorted(edges):
        print(f"{m} -> {', '.join(sorted(edges[m])) or '(nothing of jnnex)'}")
    cycle = find_cycle(edges)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    print(f"\n{len(edges)} modules, {sum(map(len, edges.values()))} edges; "
          + ("no cycle, no broken rule" if not problems else "\n".join(problems)))
    sys.exit(1 if problems else 0)
