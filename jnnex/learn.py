"""What the lessons (``lessons/``) need of a notebook that is also a script: the size to run at, pictures that show
inline in a notebook and are saved as PNG files from a script, and the one line a lesson ends on — its result, which
the test suite reads.

* :func:`tiny` — ``JNNEX_LESSON_SIZE=tiny``: the whole lesson in seconds (what ``tests/test_lessons.py`` runs);
  unset, the full size, which reproduces the lecture's number.
* :func:`show` — a matplotlib figure: displayed under a Jupyter kernel, else written to ``$JNNEX_LESSON_OUT``
  (default ``lessons/out``) as ``<name>.png``, its path printed.
* :func:`result` — ``RESULT {"name": value, ...}``: one JSON line, the lesson's figures.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

SIZE_ENV, OUT_ENV = "JNNEX_LESSON_SIZE", "JNNEX_LESSON_OUT"


def tiny() -> bool:
    """Whether this run is the tiny one (``JNNEX_LESSON_SIZE=tiny``); anything else but ``full`` or unset is an error
    naming the variable."""
    size = os.environ.get(SIZE_ENV, "full").strip().lower() or "full"
    if size not in ("tiny", "full"):
        raise ValueError(f"{SIZE_ENV} must be 'tiny' or 'full', got {os.environ[SIZE_ENV]!r}")
    return size == "tiny"


def pick(full, tiny_value):
    """``full`` at the full size, ``tiny_value`` at the tiny one: ``steps = pick(200_000, 300)``."""
    return tiny_value if tiny() else full


def in_notebook() -> bool:
    """Whether this code runs under a Jupyter kernel (where a figure displays itself)."""
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def pyplot():
    """matplotlib's ``pyplot``, with a file backend when no notebook displays the figures; a clear error without the
    ``plot`` extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the lessons draw with matplotlib: pip install 'jnnex[plot]' (or make lessons)") from None
    if not in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show(fig, name: str) -> Path | None:
    """Display ``fig`` in a notebook; from a script, save it as ``<out>/<name>.png`` and print where. Every axis of a
    lesson's figure has a title and labels: a figure without them is a ``ValueError`` naming the picture."""
    for ax in fig.axes:
        if not (ax.get_title() or fig._suptitle is not None) or not ax.get_xlabel() or not ax.get_ylabel():
            if ax.get_label() != "<colorbar>":
                raise ValueError(f"picture {name!r}: every axis needs a title (or the figure a suptitle) and labelled "
                                 f"axes; got title {ax.get_title()!r}, x {ax.get_xlabel()!r}, y {ax.get_ylabel()!r}")
    plt = pyplot()
    if in_notebook():
        plt.show()
        return None
    out = Path(os.environ.get(OUT_ENV, "lessons/out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"[picture] {path}")
    return path


def result(**values) -> None:
    """Print the lesson's figures as one line, ``RESULT {...}`` (floats to 6 significant digits). Returns nothing: a
    lesson's last cell calls it, and a notebook would show a returned value a second time."""
    clean = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in values.items()}
    print("RESULT " + json.dumps(clean))


def read_result(text: str) -> dict:
    """The figures of a lesson's output (its last ``RESULT`` line); a ``ValueError`` when there is none."""
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise ValueError("the lesson printed no RESULT line")
    return json.loads(lines[-1][len("RESULT "):])


def _inputs_first(root) -> list:
    """The nodes of a scalar graph (any object with ``_prev``, its inputs), each after its inputs."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in node._prev if id(child) not in seen)
    return order


def draw_graph(root, title: str = "the computation graph"):
    """A picture of a scalar graph — :class:`jnnex.micrograd.engine.Value`'s, or any value with ``data``, ``grad``,
    ``_prev`` and ``_op`` (a lesson's own) — drawn with matplotlib alone: one box per value with its name (a
    ``label`` where the value has one), ``data`` and ``grad``, in columns by depth from the inputs, each result's
    operation written on its box, arrows from inputs to results. Returns the figure."""
    plt = pyplot()
    order = _inputs_first(root)
    depth: dict[int, int] = {}
    for node in order:  # inputs first: a node's depth is one more than its deepest input's
        depth[id(node)] = 1 + max((depth[id(c)] for c in node._prev), default=-1)
    columns: dict[int, list] = {}
    for node in order:
        columns.setdefault(depth[id(node)], []).append(node)
    where = {}
    for d, nodes in columns.items():
        for i, node in enumerate(nodes):
            where[id(node)] = (d, i - (len(nodes) - 1) / 2)
    fig, ax = plt.subplots(figsize=(2.2 * (len(columns) + 1), 1.0 + 0.9 * max(len(c) for c in columns.values())))
    for node in order:
        x, y = where[id(node)]
        for child in node._prev:
            cx, cy = where[id(child)]
            ax.annotate("", xy=(x - 0.32, y), xytext=(cx + 0.32, cy), arrowprops={"arrowstyle": "->", "color": "0.5"})
        name = getattr(node, "label", "")
        label = (f"{name}" + (" = " if name and node._op else "") + (node._op if node._op else "") + "\n"
                 if name or node._op else "") + f"data {node.data:.4g}\ngrad {node.grad:.4g}"
        ax.text(x, y, label, ha="center", va="center", fontsize=8, family="monospace",
                bbox={"boxstyle": "round", "fc": "#eef" if node._op else "#efe", "ec": "0.4"})
    ax.set(xlim=(-0.6, len(columns) - 0.4), ylim=(min(y for _, y in where.values()) - 0.8,
                                                   max(y for _, y in where.values()) + 0.8),
           title=title, xlabel="depth from the inputs (green: inputs and parameters)", ylabel="node")
    ax.set_yticks([])
    ax.set_xticks(range(len(columns)))
    return fig


NAMES_ENV = "JNNEX_NAMES"


def names() -> tuple[list[str], str]:
    """makemore's ``names.txt`` (32,033 names: the lectures' numbers are on it) and where it came from:
    ``$JNNEX_NAMES``, else ``names.txt`` in the current directory or beside the project (``../shared/data``). Where
    it is not found — or at the tiny size — the embedded ``census-first`` names, which the lessons say they used."""
    from jnnex.data import load_words

    if not tiny():
        given = os.environ.get(NAMES_ENV)
        if given:
            if not Path(given).is_file():
                raise ValueError(f"{NAMES_ENV}={given!r}: no such file (makemore's names.txt, one name a line)")
            return load_words(given), given
        here = Path(__file__).resolve().parents[1]
        for candidate in (Path("names.txt"), here / "names.txt", here.parent / "shared" / "data" / "names.txt"):
            if candidate.is_file():
                return load_words(str(candidate)), str(candidate)
        print(f"names.txt not found (set {NAMES_ENV}); using the embedded census-first names: the lecture's numbers "
              "will differ")
    return load_words("census-first"), "census-first"


ANSWERS_ENV = "JNNEX_LESSON_ANSWERS"
ANSWER_MODES = ("mine", "solutions", "slip")


def lessons_dir() -> Path:
    """The project's ``lessons/`` folder (beside the ``jnnex`` package of this checkout), or ``./lessons``."""
    here = Path(__file__).resolve().parents[1] / "lessons"
    return here if here.is_dir() else Path("lessons")


def answers(lesson: str, mine: dict) -> dict:
    """The exercise's expressions to grade: ``mine`` (what the learner wrote in the lesson), unless
    ``JNNEX_LESSON_ANSWERS`` says ``solutions`` (``lessons/solutions/<lesson>.py``'s ``SOLUTIONS``: peek only when
    stuck) or ``slip`` (the solutions with that file's ``SLIP`` planted: one wrong expression, which the check must
    name — what the test suite runs)."""
    mode = os.environ.get(ANSWERS_ENV, "mine").strip().lower() or "mine"
    if mode not in ANSWER_MODES:
        raise ValueError(f"{ANSWERS_ENV} must be one of {', '.join(ANSWER_MODES)}, got {mode!r}")
    if mode == "mine":
        return dict(mine)
    import runpy

    path = lessons_dir() / "solutions" / f"{lesson}.py"
    if not path.is_file():
        raise ValueError(f"{ANSWERS_ENV}={mode}: no solutions file {str(path)!r}")
    module = runpy.run_path(str(path))
    return {**module["SOLUTIONS"], **(module["SLIP"] if mode == "slip" else {})}


SHAKESPEARE_ENV = "JNNEX_SHAKESPEARE"


def shakespeare() -> tuple[str, str]:
    """char-rnn's tiny Shakespeare (the text of nanoGPT's ``shakespeare_char``) as ``(path, what)``:
    ``$JNNEX_SHAKESPEARE``, else ``tinyshakespeare.txt`` in the current directory or beside the project
    (``../shared/data``). At the tiny size — or where it is not found — a small stand-in text (the embedded names,
    one a line, written once to the temporary directory as ``jnnex-standin-<hash of its text>.txt`` and reused, so
    lesson runs leave no file behind each), which the lesson says it used."""
    import hashlib

    if not tiny():
        given = os.environ.get(SHAKESPEARE_ENV)
        if given:
            if not Path(given).is_file():
                raise ValueError(f"{SHAKESPEARE_ENV}={given!r}: no such file (tiny Shakespeare, 1,115,394 characters)")
            return given, "tiny Shakespeare"
        here = Path(__file__).resolve().parents[1]
        for candidate in (Path("tinyshakespeare.txt"), here / "tinyshakespeare.txt",
                          here.parent / "shared" / "data" / "tinyshakespeare.txt"):
            if candidate.is_file():
                return str(candidate), "tiny Shakespeare"
        print(f"tinyshakespeare.txt not found (set {SHAKESPEARE_ENV}); using a stand-in text: the numbers will differ")
    from jnnex.data import load_words
    from jnnex.rundir import write_text

    standin = "\n".join(load_words("census-first")) + "\n"
    path = Path(tempfile.gettempdir()) / f"jnnex-standin-{hashlib.sha256(standin.encode()).hexdigest()[:16]}.txt"
    if not path.is_file() or path.read_text() != standin:
        write_text(path, standin)  # atomically: lessons may run side by side
    return str(path), "a stand-in text (the embedded names)"


def render(lesson: str | Path, out_dir: str | Path, *, timeout: int = 1800) -> Path:
    """Execute one lesson (a jupytext percent file) as a notebook and write it, outputs and pictures inline, to
    ``out_dir/<name>.ipynb`` (the ``lessons`` extra: jupytext, nbclient, ipykernel). ``timeout``: seconds a cell
    may take. Returns the notebook's path."""
    try:
        import jupytext
        import nbclient
        import nbformat
        from jupyter_client import KernelManager
    except ImportError:
        raise ImportError("rendering the lessons needs the lessons extra: pip install 'jnnex[lessons]' (or make "
                          "lessons)") from None
    lesson, out_dir = Path(lesson), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notebook = jupytext.read(lesson)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    with tempfile.TemporaryDirectory(prefix="jnnex-kernel-") as sockets:  # the kernel's sockets: local files, not TCP
        # (ipykernel warns of an unencrypted TCP kernel on every lesson otherwise)
        km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "kernel"))
        try:
            nbclient.NotebookClient(notebook, km=km, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(out_dir)}}).execute()
        finally:
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    path = out_dir / f"{lesson.stem}.ipynb"
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(notebook, str(tmp))
    os.replace(tmp, path)  # atomically: a killed render leaves the previous notebook
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m jnnex.learn OUT [LESSON ...]``: render the lessons (default: every ``lessons/NN_*.py``) into
    ``OUT``, saying where each went."""
    import time

    args = sys.argv[1:] if argv is None else list(argv)
    out = Path(args[0]) if args else Path("lessons/out")
    lessons = [Path(a) for a in args[1:]] or sorted(lessons_dir().glob("[0-9][0-9]_*.py"))
    size = "tiny" if tiny() else "full"
    for lesson in lessons:
        t0 = time.perf_counter()
        path = render(lesson, out)
        print(f"{lesson.name} -> {path}  ({size} size, {time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"open them with: jupyter lab {out}  (or any notebook viewer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
