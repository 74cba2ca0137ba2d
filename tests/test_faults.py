"""Fault injection: SIGKILL (which no handler can catch) at any moment leaves a run directory that loads, and resuming
it ends bit-identical to an uninterrupted run. Atomic writes (temporary file, fsync, rename) are what make it so."""

import json
import random
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jnnex import rundir

WRITER = """
import sys, time
import numpy as np
from jnnex import rundir
rundir.save_pytree(sys.argv[1], {"w": np.full((1000,), 1.0, np.float32)})    # the old checkpoint
real_savez = np.savez
def half_then_wait(f, **arrays):                                              # the new one: killed half-way
    import io
    buf = io.BytesIO(); real_savez(buf, **arrays); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    print("half written", flush=True); time.sleep(600)
np.savez = half_then_wait
rundir.save_pytree(sys.argv[1], {"w": np.full((1000,), 2.0, np.float32)})
"""


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_checkpoint_write(tmp_path):
    """Killed with half of the new checkpoint written (synchronised on the writer saying so, not on a timer): the
    checkpoint is still the old one, whole; the half-written temporary is removed when a run starts there."""
    path = tmp_path / "checkpoint.npz"
    with subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "half written"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    np.testing.assert_array_equal(rundir.load_pytree(path, {"w": jnp.zeros((1000,), jnp.float32)})["w"], 1.0)
    leftovers = list(tmp_path.glob(".*.tmp"))
    assert len(leftovers) == 1
    size = leftovers[0].stat().st_size
    assert size > 0 and rundir.remove_temporaries(tmp_path) == size
    assert not list(tmp_path.glob(".*.tmp")) and path.is_file()


STEPS = 12000
TRAIN = ["train", "--model", "mlp", "--steps", str(STEPS), "--eval-every", "1000", "--chunk", "500", "--no-progress",
         "--json"]


def _jnnex(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "jnnex", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """Four training runs killed at seeded random moments (start-up, compilation, chunks, evaluations, checkpoint
    writes: wherever the moment falls); after each, the directory loads and `jnnex train --resume` (or the original
    command, when the kill came before config.json existed) ends with the uninterrupted run's model, bit for bit."""
    reference = tmp_path / "reference"
    start = time.monotonic()
    proc = _jnnex([*TRAIN, "--out", str(reference)])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    span = time.monotonic() - start  # this machine's speed now; the later runs read the programs it compiled from
    # the cache and run shorter: the kills fall in the first 70 % of its span
    want = json.loads(out)
    with np.load(reference / "model.npz") as f:
        want_arrays = {k: f[k] for k in f.files}
    rng = random.Random(0)
    report = []
    for trial in range(4):
        run = tmp_path / f"killed{trial}"
        delay = rng.uniform(0.05, 0.7) * span
        proc = _jnnex([*TRAIN, "--out", str(run)])
        time.sleep(delay)  # only *where* the kill lands depends on time; what is asserted holds wherever it lands
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=600)
        saved = -1
        if (run / "checkpoint.npz").is_file():
            with np.load(run / "checkpoint.npz") as f:  # loads: never half-written
                saved = int(f[".step"])
        temporaries = sum(p.stat().st_size for p in run.glob(".*.tmp")) if run.is_dir() else 0
        again = ["train", "--resume", "--out", str(run), "--no-progress", "--json"] \
            if (run / "config.json").is_file() else [*TRAIN, "--out", str(run)]
        proc = _jnnex(again)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode in (0,), (delay, err)
        got = json.loads(out)
        with np.load(run / "model.npz") as f:
            identical = all(np.array_equal(f[k], want_arrays[k]) for k in want_arrays) and set(f.files) == set(
                want_arrays)
        report.append((trial, round(delay, 2), proc.returncode, saved, temporaries, identical))
        assert identical and got["dev_loss"] == want["dev_loss"] and got["steps"] == STEPS, report[-1]
        assert not list(run.glob(".*.tmp"))  # the resumed run cleaned up after the killed one
    print("\ntrial  kill after (s)  checkpoint step at kill  temporary bytes left  resumed bit-identical")
    for trial, delay, _, saved, temporaries, identical in report:
        print(f"{trial:5d}  {delay:14.2f}  {saved if saved >= 0 else 'none':>23}  {temporaries:20d}  {identical}")
