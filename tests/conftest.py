"""Strict JAX for the whole suite (equinox-style): accidental broadcasting and dtype promotion fail loudly.

float64 is enabled so hand-written backwards can be compared with autodiff to 1e-10; jnnex itself states every dtype
it creates, so its float32 defaults are unaffected. Hypothesis profiles: ``ci`` (default; small, derandomised: 10
examples a property; fewer where a test says each example compiles a new program),
``fast`` (``make test-fast``: 2 examples a property) and ``thorough`` (local, deeper):
``JNNEX_HYPOTHESIS_PROFILE=thorough pytest``.
"""

import os
import shutil
import signal
import tempfile
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings

# One compilation cache for the session, shared by the test processes: many tests compile the same programs (a model's
# training step, its evaluation) as new Python functions, which JAX's in-memory cache cannot match but its persistent
# cache does (by the program). A fresh directory per run, made by the first process (its children inherit the
# variable) and removed at the end: no state survives the session.
if "JNNEX_TEST_XLA_CACHE" not in os.environ:
    os.environ["JNNEX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="jnnex-test-xla-")
    _OWN_CACHE = True
else:
    _OWN_CACHE = False
jax.config.update("jax_compilation_cache_dir", os.environ["JNNEX_TEST_XLA_CACHE"])
# The CLI turns on JAX's persistent compilation cache in $JNNEX_CACHE_DIR (default ~/.cache): here it is the session's
# cache, so the CLI run in-process writes nothing outside it, and the subprocess tests (kills and resumes start
# `jnnex train` up to nine times on the same model) compile each program once. test_cli checks the cache itself in
# directories of its own.
os.environ["JNNEX_CACHE_DIR"] = os.environ["JNNEX_TEST_XLA_CACHE"]
# Most of this suite's time is XLA compiling small programs once each; in-process tests skip XLA's costlier
# optimisation passes (a fifth less time, measured on the GPT and RNN files). What they check is values, which the
# passes must not change; the subprocess tests (the CLI, kills and resumes, two processes) and the benchmarks run the
# fully optimised programs a user gets.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

# Four CPU devices in every test process (before JAX starts), so the data-parallel paths run on any machine. Work is
# placed on the first unless a test asks for a mesh.
jax.config.update("jax_num_cpu_devices", int(os.environ.get("JNNEX_TEST_CPU_DEVICES", 4)))
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# XLA's CPU fusion emitters off for the programs the test processes compile: they halve the compile time of the
# suite's many small programs (the Llama's attention pair and model check: 19 s of compiling -> 9 s), where the run
# time is a few milliseconds. And each program's machine code generated as one piece, not split into 32 for a thread
# pool that two busy cores cannot use (test_models + test_tensor_parallel on 2 processes, alternated: 61, 57 s against
# 76, 67 s split). The flags are read when the backend starts, which it does here; then XLA_FLAGS is put back,
# so the subprocess tests and the benchmarks' children compile with XLA's defaults, as a user's run does.
# A subprocess that must compile exactly as the tests do (to compare bits with an in-process run) is given
# XLA_FLAGS=$JNNEX_TEST_XLA_FLAGS and JAX_DISABLE_MOST_OPTIMIZATIONS=1.
os.environ["JNNEX_TEST_XLA_FLAGS"] = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
_XLA_FLAGS = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS or ''} {os.environ['JNNEX_TEST_XLA_FLAGS']}".strip()
jax.devices()
if _XLA_FLAGS is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _XLA_FLAGS

settings.register_profile(
    "ci", max_examples=10, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(  # make test-fast: every property still runs, on fewer examples
    "fast", max_examples=2, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("JNNEX_HYPOTHESIS_PROFILE", "ci"))


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def names_txt() -> Path:
    """makemore's names.txt: $JNNEX_NAMES_TXT, else ../shared/data/names.txt beside the repository."""
    path = Path(os.environ.get("JNNEX_NAMES_TXT", REPO.parent / "shared" / "data" / "names.txt"))
    if not path.is_file():
        pytest.skip(f"names.txt not found at {path} (set JNNEX_NAMES_TXT; get it from karpathy/makemore)")
    return path


@pytest.fixture
def optimized():
    """XLA's optimisation passes on for one test (off for the others, above): for the few whose programs run long on
    large arrays, where unfused they cost more to run than the passes cost to compile (the neural bigram's 500
    full-batch steps: 28 s -> 9 s)."""
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def shakespeare_txt() -> Path:
    """char-rnn's tiny Shakespeare: $JNNEX_SHAKESPEARE_TXT, else ../shared/data/tinyshakespeare.txt."""
    path = Path(os.environ.get("JNNEX_SHAKESPEARE_TXT", REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    if not path.is_file():
        pytest.skip(f"tinyshakespeare.txt not found at {path} (set JNNEX_SHAKESPEARE_TXT; get it from "
                    "karpathy/char-rnn)")
    return path


@pytest.fixture
def sigint_default():
    """SIGINT handled the Python way for the test, whatever the runner set (a background job of a non-interactive
    shell starts with SIGINT ignored — found when the suite ran that way)."""
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, original)


def pytest_terminal_summary(terminalreporter):
    """Tables a test recorded with ``record_property("table", text)`` (the GPT's per-tensor gradient errors), printed
    after the run; they travel with the reports, so they show under ``-n 2`` as well."""
    for report in terminalreporter.stats.get("passed", []):
        for name, text in getattr(report, "user_properties", []):
            if name == "table":
                terminalreporter.write_sep("-", report.nodeid.split("::")[-1])
                terminalreporter.write_line(text)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JNNEX_TEST_XLA_CACHE"], ignore_errors=True)
