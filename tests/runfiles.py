"""Run directories in tests: every array of an ``.npz`` by name, two files compared bit for bit, a checkpoint's step,
and a training process signalled once its checkpoint is on disk."""

import os
import subprocess
import time

import numpy as np


def suite_compile_env() -> dict:
    """Environment variables that make a child process compile as the test processes do (conftest: XLA's costlier
    passes and its CPU fusion emitters off): for children whose results are values, which those passes must not
    change, and whose time is mostly compiling — or that must match an in-process run bit for bit."""
    return {"XLA_FLAGS": os.environ["JNNEX_TEST_XLA_FLAGS"], "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def arrays(path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def assert_same_arrays(a, b) -> None:
    """The ``.npz`` files ``a`` and ``b`` hold the same arrays, bit for bit."""
    a, b = arrays(a), arrays(b)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def checkpoint_step(path) -> int:
    """The step of a checkpoint file, or -1 while there is none (files are replaced atomically: never half-read)."""
    if not path.is_file():
        return -1
    with np.load(path) as f:
        return int(f[".step"])


def signal_after_checkpoint(cmd, checkpoint, signum, *, after: int = -1, env=None) -> tuple[int, str]:
    """Start ``cmd`` (a training run), wait for the event of ``checkpoint`` holding a step past ``after`` (not for a
    timer), send ``signum``; ``(exit code, stderr)``. The process is killed if anything fails on the way."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while checkpoint_step(checkpoint) <= after:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    return proc.returncode, stderr


def fit_saved(model, data, tcfg, out, **kwargs):
    """``fit`` keeping the run directory ``out`` (metrics.jsonl and checkpoints: the run driver's writer hook)."""
    from jnnex.run import RunWriter
    from jnnex.train import fit

    out.mkdir(parents=True, exist_ok=True)
    return fit(model, data, tcfg, hooks=[RunWriter(out), *kwargs.pop("hooks", ())], **kwargs)


def fit_resumed(model, data, tcfg, out, **kwargs):
    """``fit`` continuing from ``out``'s checkpoint, and keeping ``out`` (what ``jnnex.run.resume`` does for a run)."""
    from jnnex import rundir
    from jnnex.run import RunWriter, load_checkpoint
    from jnnex.train import fit

    start = load_checkpoint(out, model, tcfg)
    rundir.truncate_metrics(out, int(start.step))
    return fit(model, data, tcfg, resume_from=start, hooks=[RunWriter(out, int(start.step))], **kwargs)
