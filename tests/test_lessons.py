"""The lessons (``lessons/*.py``), each run as a script at the tiny size (``JNNEX_LESSON_SIZE=tiny``) in a child
process, as a learner runs it: it ends with its ``RESULT`` line, every picture it names is a PNG on disk, and its
figures say what the lesson says they show. The exercises are graded both ways: with the solutions every gradient
passes; with the planted slip (``JNNEX_LESSON_ANSWERS=slip``) the check names exactly the slipped tensor first.

The runs are marked ``lessons`` (ten child processes, about 100 s of the suite's processes' time on 2 cores):
``make test`` runs them with the rest, ``make test-lessons`` alone, ``make test-fast`` leaves them out."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jnnex.learn import read_result
from runfiles import suite_compile_env

LESSONS = Path(__file__).resolve().parents[1] / "lessons"


def run_lesson(name: str, tmp_path, answers: str = "mine", timeout: int = 300) -> tuple[dict, str]:
    env = {**os.environ, "JNNEX_LESSON_SIZE": "tiny", "JNNEX_LESSON_OUT": str(tmp_path),
           "JNNEX_LESSON_ANSWERS": answers, "PYTHONUNBUFFERED": "1"}
    for var in ("JAX_NUM_CPU_DEVICES", "JAX_ENABLE_X64"):
        env.pop(var, None)
    env.update(suite_compile_env())  # the suite's faster compile settings (the lessons' checks are of values)
    if os.environ.get("JNNEX_TEST_XLA_CACHE"):  # and its compilation cache: a program one lesson compiled, the next
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ["JNNEX_TEST_XLA_CACHE"]  # reads back
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    proc = subprocess.run([sys.executable, str(LESSONS / f"{name}.py")], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pictures = re.findall(r"^\[picture\] (.+)$", proc.stdout, flags=re.M)
    assert pictures, "the lesson drew no picture"
    for p in pictures:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    return read_result(proc.stdout), proc.stdout


def test_every_lesson_is_a_jupytext_percent_script_with_a_header_and_a_next_step():
    names = sorted(p.stem for p in LESSONS.glob("[0-9][0-9]_*.py"))
    assert names == [f"{i:02d}_{n}" for i, n in enumerate(
        ["micrograd", "bigram", "mlp", "activations_batchnorm", "backprop_ninja", "wavenet", "gpt", "rnn",
         "text_and_modern_block", "many_devices"], start=1)]
    for name in names:
        text = (LESSONS / f"{name}.py").read_text()
        assert "formats: py:percent" in text and "# %% [markdown]" in text, name
        assert "**What you will learn**" in text and "**Full size**" in text and "## What to try next" in text, name
        assert "learn.result(" in text, name


@pytest.mark.lessons
def test_lesson_1_micrograd(tmp_path):
    r, _ = run_lesson("01_micrograd", tmp_path)
    assert abs(r["scalar_loss"] - r["tensor_loss"]) < 1e-4  # the scalar engine and the tensor backward agree
    assert 0.5 <= r["scalar_accuracy"] <= 1.0


@pytest.mark.lessons
def test_lesson_2_bigram(tmp_path):
    r, _ = run_lesson("02_bigram", tmp_path)
    assert r["counts_nll"] < r["neural_nll"] < math.log(27)  # learning, and not yet at the counts' optimum
    # the page's own loops: the counts, the NLL and the neural bigram's descent, each equal to jnnex's
    assert r["counts_equal"] and abs(r["nll_loop"] - r["counts_nll"]) < 1e-5
    assert abs(r["page_nll"] - r["neural_nll"]) < 1e-5 and r["neural_gap"] < 1e-3


@pytest.mark.lessons
def test_lesson_3_mlp(tmp_path):
    r, _ = run_lesson("03_mlp", tmp_path)
    assert r["dev_loss"] < 10  # down from N(0, 1) init's ~27 (at the tiny size, not yet below ln 27)
    assert r["overfit_train"] < r["overfit_dev"] - 0.5  # 30 names memorised


@pytest.mark.lessons
def test_lesson_4_activations_batchnorm(tmp_path):
    r, _ = run_lesson("04_activations_batchnorm", tmp_path)
    assert r["original_first_loss"] > 10 and abs(r["kaiming_first_loss"] - math.log(27)) < 0.5
    assert -6 < r["final_update_ratio_mean"] < 0


def solutions(lesson: str) -> dict:
    import runpy
    return runpy.run_path(str(LESSONS / "solutions" / f"{lesson}.py"))


@pytest.mark.lessons
def test_lesson_5_backprop_ninja_names_the_planted_slip(tmp_path):
    """The lesson run with the solutions and one planted slip (dbnvar without its -1/2): the check names dbnvar
    first; what the backward computes before it stays right."""
    r, _ = run_lesson("05_backprop_ninja", tmp_path, "slip")
    assert r["first_wrong"] == "dbnvar" and "dbnvar_inv" not in r["wrong"] and "dh" not in r["wrong"]
    assert set(r["yours"]) == set(solutions("05_backprop_ninja")["SOLUTIONS"])


def test_lesson_5_solutions_pass_the_lessons_check():
    """The same check the lesson runs (``atomic.compare``), on the solutions: every gradient right; and on the
    lesson's placeholders: each one wrong."""
    import jax
    import jax.numpy as jnp

    from jnnex import atomic
    with jax.enable_x64(True):
        problem = atomic.example_problem(dtype=jnp.float64)
        rows = atomic.compare(*problem, overrides=solutions("05_backprop_ninja")["SOLUTIONS"])
        assert [r.name for r in rows if not r.approx] == []
        placeholder = {"dprobs": lambda f, g: jnp.zeros_like(f.probs)}
        assert "dprobs" in [r.name for r in atomic.compare(*problem, overrides=placeholder) if not r.approx]


@pytest.mark.lessons
def test_lesson_6_wavenet(tmp_path):
    r, _ = run_lesson("06_wavenet", tmp_path)
    assert r["tree_vs_conv"] < 1e-5 and r["test_loss"] < math.log(27)


@pytest.mark.lessons
def test_lesson_7_gpt_names_the_planted_layernorm_slip(tmp_path):
    """The lesson run with the LayerNorm backward's slip (the variance's path left out of dx): the check names dx
    alone; the GPT trains; the page's own arc (section 1) computes what it claims."""
    r, _ = run_lesson("07_gpt", tmp_path, "slip")
    assert r["ln_wrong"] == ["dx"] and r["val_loss"] < math.log(27)
    # the lecture's arc on the page: the causal average three ways, the scaled scores' softmax less peaked, the
    # ladder trained rung by rung, and the page's block equal to jnnex's block_forward
    assert r["average_gap"] < 1e-6 and r["peak_scaled"] < r["peak_raw"] and r["block_gap"] < 1e-5
    ladder = list(r["ladder"].values())
    assert len(ladder) == 7 and all(math.isfinite(v) for v in ladder) and ladder[-1] < ladder[0]


def test_lesson_7_solution_passes_the_lessons_check():
    """The lesson's check (``jnnex.check.compare`` of LayerNorm's forward against a backward) on the solution: every
    gradient right, with and without the shift."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jnnex.check import compare
    from jnnex.models.gpt import layernorm_forward
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x, w, b = (jnp.asarray(rng.normal(size=s)) for s in ((2, 5, 8), (8,), (8,)))
        solution = solutions("07_gpt")["SOLUTIONS"]["layernorm_backward"]
        assert all(row.approx for row in compare(layernorm_forward, solution, x, 1 + w, b))
        assert all(row.approx for row in compare(lambda x, w: layernorm_forward(x, w),
                                                 lambda dy, c: solution(dy, c)[:2], x, 1 + w))


@pytest.mark.lessons
def test_lesson_8_rnn(tmp_path):
    r, _ = run_lesson("08_rnn", tmp_path)
    assert r["reach_rnn_init"] < r["reach_gru_init"]  # the plain RNN's gradient vanishes faster going back


@pytest.mark.lessons
def test_lesson_9_text_and_modern_block(tmp_path):
    r, _ = run_lesson("09_text_and_modern_block", tmp_path)
    assert r["modern_block_worst"] < 1e-12 and r["bytes_per_token"] > 1.0 and r["merges"] > 0


@pytest.mark.lessons
def test_lesson_10_many_devices(tmp_path):
    r, _ = run_lesson("10_many_devices", tmp_path)
    assert r["dp_gap"] < 1e-12 and abs(r["pitfall_ratio"] - 4) < 1e-9 and r["explicit_gap"] < 1e-12
    assert r["fsdp_fraction"] < 0.26 and abs(r["tp_dev_loss"] - r["one_dev_loss"]) < 1e-4
