"""The run directory, and checkpoints without pickle: pytrees of arrays as ``.npz``, JSON, every file written
atomically.

A run directory (``jnnex train --out``, :func:`jnnex.run.train`, whose writer is ``fit``'s hook
:class:`jnnex.run.RunWriter`) holds one run:

* ``config.json``    — what the run is: model, its config, the training config, the data and its vocabulary;
  written once, when the run starts;
* ``metrics.jsonl``  — one JSON row per evaluation (step, lr, losses, time);
* ``checkpoint.npz`` — everything needed to resume (parameters, model and optimiser state, step), at each evaluation;
* ``model.npz``      — the final parameters and model state;
* ``metrics.json``   — the final losses;
* ``lock``           — held (``flock``) by the one process training into the directory, for the run's life; the
  kernel lets go of it when that process ends, however it ends, so a lock left by a killed run is no obstacle.

:mod:`jnnex.run` owns the life of a run directory (new, resume, continue, force, load); this module is its format.

A pytree is saved as one array per leaf, keyed by its path (``params.W1``, ``opt_state[0].count``…); loading needs a
template pytree of the same structure (built by the model's ``init``) and checks every key, shape and dtype, so a
checkpoint of another model fails loudly instead of loading garbage. Files are written to a temporary name in the same
directory and renamed into place (``os.replace`` is atomic on POSIX), so a crash never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import zipfile
from pathlib import Path

import jax
import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class WriteError(OSError):
    """A run file could not be written (disk full, read-only, no permission); the message names the file. The file
    it was to replace, if any, is untouched: a checkpoint stays the last complete one."""


def _atomic_write(path: Path, write) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        kept = f"; the previous {path.name} is kept as it was" if path.exists() else ""
        raise WriteError(e.errno, f"cannot write {str(path)!r}: {e.strerror or e}{kept}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8, atomically."""
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike):
    """The JSON document in ``path``; a ``ValueError`` naming the file if it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); was it truncated or edited by hand?") from None


def _flatten(tree) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def save_pytree(path: str | os.PathLike, tree) -> None:
    """Save a pytree of arrays to ``path`` (``.npz``), atomically."""
    arrays = _flatten(tree)
    _atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def _shape_dtype(leaf) -> tuple[tuple[int, ...], np.dtype]:
    """A template leaf's shape and dtype: an array, a scalar, or a ``jax.ShapeDtypeStruct`` (``jax.eval_shape``)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return tuple(leaf.shape), np.dtype(leaf.dtype)
    return np.shape(leaf), np.asarray(leaf).dtype


def _read_leaves(path: Path, f, leaves) -> list:
    """The arrays of ``f`` for the template ``leaves``, each checked against its template."""
    stored = set(f.files)
    out = []
    for key_path, leaf in leaves:
        key = jax.tree_util.keystr(key_path)
        if key not in stored:
            raise ValueError(f"checkpoint {str(path)!r} has no array {key!r}: it was saved from another model")
        try:
            arr = f[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            what = "pickled (object) data, which jnnex never loads" if "pickle" in str(e) else f"unreadable: {e}"
            raise ValueError(f"checkpoint {str(path)!r}: array {key!r} holds {what}") from None
        shape, dtype = _shape_dtype(leaf)
        if arr.shape != shape or arr.dtype != dtype:
            raise ValueError(
                f"checkpoint {str(path)!r}: {key} is {arr.dtype}{list(arr.shape)}, "
                f"expected {dtype}{list(shape)} (saved from another model or config?)"
            )
        out.append(jax.numpy.asarray(arr))
        stored.discard(key)
    if stored:
        raise ValueError(f"checkpoint {str(path)!r} has arrays this model does not: {sorted(stored)}")
    return out


def load_pytree(path: str | os.PathLike, like):
    """Load a pytree saved by :func:`save_pytree` into the structure of ``like`` (``allow_pickle=False``); ``like``'s
    leaves may be arrays or shapes alone (``jax.eval_shape(model.init, key)``: nothing is computed to load).

    Every way the file can be wrong is a ``ValueError`` that names it: missing, truncated or not an ``.npz`` at all,
    holding pickled (object) arrays — never unpickled —, or saved from another model, config or version (a missing,
    extra or differently shaped array).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    with open(path, "rb") as fh:  # ours to close, whatever np.load makes of the bytes
        try:
            f = np.load(fh, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            # numpy reads bytes that are neither a zip nor a .npy header as a pickle, and says so: not our case.
            why = "neither a zip archive nor a .npy array" if "pickle" in str(e) else str(e)
            raise ValueError(f"{str(path)!r} is not a jnnex .npz file (truncated or corrupt?): {why}") from None
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError(f"{str(path)!r} is a single .npy array, not a jnnex .npz file")
        with f:
            out = _read_leaves(path, f, leaves)
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------------------------------
# The run directory

CONFIG, METRICS, CHECKPOINT, MODEL, FINAL_METRICS = "config.json", "metrics.jsonl", "checkpoint.npz", "model.npz", \
    "metrics.json"
LOCK = "lock"
TOKENIZER = "tokenizer.bpe"  # a BPE text run's tokenizer (jnnex.bpe's file); token files (tokens-*) are a cache


RUN_FILES = (CONFIG, METRICS, CHECKPOINT, MODEL, FINAL_METRICS, TOKENIZER)


def check_run_dir(run: str | os.PathLike) -> Path:
    """``run`` as a path, or a ``ValueError`` if it names something that is not a directory."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise ValueError(f"run directory {str(run)!r} is a file; --out names a directory for the run's files")
    return run


def remove_temporaries(run: str | os.PathLike) -> int:
    """Delete the temporary files a killed writer left behind (a kill mid-write never touches the file it was
    replacing); returns the bytes removed."""
    removed = 0
    for tmp in Path(run).glob(".*.tmp") if Path(run).is_dir() else ():
        removed += tmp.stat().st_size
        tmp.unlink(missing_ok=True)
    return removed


def holds_run(run: str | os.PathLike) -> bool:
    """Whether the directory already holds (part of) a run."""
    return any((Path(run) / name).exists() for name in RUN_FILES)


def clear(run: str | os.PathLike) -> None:
    """Remove a run's files (and nothing else) so that the directory can start a new run."""
    for name in RUN_FILES:
        (Path(run) / name).unlink(missing_ok=True)


class LockedError(ValueError):
    """Another process is training into the run directory."""


@contextlib.contextmanager
def lock(run: str | os.PathLike):
    """Hold ``run``'s lock for the ``with`` block: one run per directory at a time. A second holder gets a
    :class:`LockedError` naming the first one's process id. The lock is an ``flock`` on the file ``lock``, which the
    kernel releases when its process ends — by SIGKILL too —, so a stale lock file is simply taken over."""
    run = Path(run)
    path = run / LOCK
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as e:
        raise WriteError(e.errno, f"cannot create the lock {str(path)!r}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(f"run directory {str(run)!r} is in use: process {holder} is training into it (its "
                              f"lock: {str(path)!r}); wait for it to finish, or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def append_metrics(run: str | os.PathLike, row: dict) -> None:
    """Append one row to ``metrics.jsonl``, atomically (the file is rewritten whole: it has a row per evaluation)."""
    path = Path(run) / METRICS
    old = path.read_bytes() if path.is_file() else b""
    _atomic_write(path, lambda f: f.write(old + (json.dumps(row) + "\n").encode()))


def read_metrics(run: str | os.PathLike) -> list[dict]:
    path = Path(run) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def truncate_metrics(run: str | os.PathLike, step: int) -> None:
    """On resume, drop the rows written after the checkpoint's step (they will be written again)."""
    rows = [r for r in read_metrics(run) if r["step"] <= step]
    _atomic_write(Path(run) / METRICS, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
