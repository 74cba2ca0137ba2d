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
         "text_and_modern_block", "many_devices", "pipelines_experts_rings", "toy_to_large"], start=1)]
    for name in names:
        text = (LESSONS / f"{name}.py").read_text()
        assert "formats: py:percent" in text and "# %% [markdown]" in text, name
        assert "**What you will learn**" in text and "**Full size**" in text and "## What to try next" in text, name
        assert "learn.result(" in text, name


@pytest.mark.lessons
def test_lesson_1_micrograd(tmp_path):
    r, _ = run_lesson("01_micrograd", tmp_path)
    assert abs(r["scalar_loss"] - r["tensor_loss"]) < 1e-4  # the scalar engine and the tensor backward agree
    # the page's own Value: the lecture's neuron equal to jnnex's engine and to jax.grad; a value used twice adds up
    assert r["engine_gap"] == 0.0 and r["jax_gap"] < 1e-6 and r["used_twice"] == 2.0
    assert abs(r["neuron_o"] - 0.7071067811865476) < 1e-6
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
    # the page's model is jnnex's (loss and every gradient, float32), and the page's loop learns
    assert r["mlp_gap"] < 1e-5 and r["page_last"] < 0.5 * r["page_first"]


@pytest.mark.lessons
def test_lesson_4_activations_batchnorm(tmp_path):
    r, _ = run_lesson("04_activations_batchnorm", tmp_path)
    assert r["original_first_loss"] > 10 and abs(r["kaiming_first_loss"] - math.log(27)) < 0.5
    assert -6 < r["final_update_ratio_mean"] < 0
    # the page's BatchNorm (train, running statistics, eval) is jnnex's; saturation grows with the gain, as the
    # histograms say; the ratios fall by about log10(10) where the learning rate drops ten times
    assert r["bn_gap"] < 1e-5 and abs(r["lr_drop"] - 1.0) < 0.2
    sat = r["saturation"]
    assert max(sat["1"]) < min(sat["3"]) and sum(sat["1.67"]) < sum(sat["3"])
    assert set(r["grad_data"]) >= {".C", ".dense[0].W"} and all(v > 0 for v in r["grad_data"].values())


def solutions(lesson: str) -> dict:
    import runpy
    return runpy.run_path(str(LESSONS / "solutions" / f"{lesson}.py"))


@pytest.mark.lessons
def test_lesson_5_backprop_ninja_names_every_planted_slip(tmp_path):
    """The lesson run with the solutions and four planted slips — a wrong value (dbnvar without its -1/2), a wrong
    shape (dbnvar_inv without keepdims), Bessel's n - 1 in dbndiff2 and in exercise 3: the grader names each of them,
    each graded from the right upstream gradients (so the other 23 of exercise 1 stay right), the shape as its row;
    exercise 4 waits for exercise 1. The page's forward is jnnex's, and the n vs n - 1 factor is computed."""
    r, out = run_lesson("05_backprop_ninja", tmp_path, "slip")
    v = r["verdicts"]
    assert (v["dbnvar"], v["dbnvar_inv"], v["dbndiff2"]) == ("wrong", "wrong shape", "wrong")
    assert sorted(r["wrong"]) == ["dbndiff2", "dbnvar", "dbnvar_inv"] and len(v) == 26
    assert r["ex2"] in ("exact", "close") and r["ex3"] == "wrong"
    assert "got shape (64,), want (1, 64)" in out and "Traceback" not in out
    assert r["train_gap"] is None and r["ex4"] == "to do" and r["forward_gap"] == 0.0
    assert abs(r["bessel_ratio"] - 32 / 31) < 1e-5
    assert set(r["yours"]) == set(solutions("05_backprop_ninja")["SOLUTIONS"])


def test_lesson_5_solutions_pass_the_lessons_grader():
    """The lesson's grader (``atomic.grade``) on the solutions: every answer of exercises 1–3 right; the lesson's
    placeholder (``None``) reads "to do"; an answer that raises is a row naming the error."""
    import jax
    import jax.numpy as jnp

    from jnnex import atomic
    with jax.enable_x64(True):
        problem = atomic.example_problem(dtype=jnp.float64)
        sol = solutions("05_backprop_ninja")["SOLUTIONS"]
        ex1 = {k: v for k, v in sol.items() if not k.startswith("ex")}
        assert len(ex1) == len(atomic.GRADIENTS) == 26
        assert [r.name for r in atomic.grade(problem, ex1) if not r.right] == []
        assert atomic.grade(problem, {"dlogits": sol["ex2_dlogits"]}, given=())[0].right
        assert atomic.grade(problem, {"dhprebn": sol["ex3_dhprebn"]}, given=("dhpreact",))[0].right
        rows = atomic.grade(problem, {"dprobs": lambda f, g: None, "dh": lambda f, g: g.dC})
        assert [(r.verdict, r.note[:30]) for r in rows] == [("to do", "not written yet"),
                                                            ("error", "AttributeError: 'types.SimpleN")]


@pytest.mark.lessons
def test_lesson_5_trains_on_the_solutions_backward(tmp_path):
    """With every answer right, exercise 4 trains on the learner's own chained backward and ends where jax.grad's
    run does (float64, 200 steps)."""
    r, _ = run_lesson("05_backprop_ninja", tmp_path, "solutions")
    assert r["wrong"] == [] and r["ex2"] in ("exact", "close") and r["ex3"] in ("exact", "close")
    assert r["train_gap"] is not None and r["train_gap"] < 1e-10 and r["ex4"] in ("exact", "close")


@pytest.mark.lessons
def test_lesson_6_wavenet(tmp_path):
    r, _ = run_lesson("06_wavenet", tmp_path)
    assert r["tree_vs_conv"] < 1e-5 and r["test_loss"] < math.log(27)
    # the page's tree (the pairing reshape, BatchNorm over (0, 1)) is jnnex's; the lecture's shapes; three stages
    assert r["tree_gap"] < 1e-5 and r["shapes"][:3] == [[32, 8, 24], [32, 4, 48], [32, 4, 128]]
    assert r["shapes"][-1] == [32, 27] and len(r["progression"]) == 3
    assert all(math.isfinite(v) and v < math.log(27) for v in r["progression"].values())


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
    # the page's cells are jnnex's, and so is its backprop through time
    assert r["cell_gap"]["rnn"] < 1e-5 and r["cell_gap"]["gru"] < 1e-5 and r["bptt_gap"] < 1e-5


@pytest.mark.lessons
def test_lesson_9_text_and_modern_block_names_the_planted_bpe_slips(tmp_path):
    """The lesson run with the BPE solutions and two planted slips (encoding leftmost-first instead of by rank;
    regex training counting pairs across the chunks): the grader names exactly those two steps, the other four are
    exact; the round trip holds; the GPT trains and the modern block's pairs agree with jax.vjp."""
    r, out = run_lesson("09_text_and_modern_block", tmp_path, "slip")
    assert r["bpe_wrong"] == ["1 encode (basic)", "2 train (regex)"], r["bpe_steps"]
    assert all(v == "exact" for k, v in r["bpe_steps"].items() if k not in r["bpe_wrong"]), r["bpe_steps"]
    assert "first difference at" in out and r["round_trip"] is True
    assert r["modern_block_worst"] < 1e-12 and r["bytes_per_token"] > 1.0 and r["merges"] > 0
    assert r["modern_block_page"] < 1e-12  # the page's RMSNorm, RoPE and SwiGLU are jnnex's (float64)


def test_lesson_9_bpe_solutions_equal_jnnex_bpe():
    """The two solutions the slip replaces, graded as the lesson grades them: equal to jnnex.bpe."""
    from jnnex import bpe

    sol = solutions("09_text_and_modern_block")["SOLUTIONS"]
    page = {}
    exec(compile("\n".join(_page_helpers()), "lesson 9", "exec"), page)
    text = "The cat sat on the mat; the dog sat on the log. Ünïcödé 👋 too!\n" * 20
    basic, gpt4 = bpe.train(text, 300, pattern=None), bpe.train(text, 300)
    assert sol["encode_basic"](text, list(basic.merges), page["get_stats"], page["merge"]) == basic.encode(text)
    assert sol["train_regex"](text, 300, bpe.GPT4_SPLIT_PATTERN, page["get_stats"], page["merge"]) == \
        list(gpt4.merges)


def _page_helpers() -> list[str]:
    """Lesson 9's get_stats and merge, as its page writes them."""
    lines = (LESSONS / "09_text_and_modern_block.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def get_stats"))
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("ids = list("))
    return lines[start:end]


@pytest.mark.lessons
def test_lesson_10_many_devices(tmp_path):
    r, _ = run_lesson("10_many_devices", tmp_path)
    assert r["dp_gap"] < 1e-12 and abs(r["pitfall_ratio"] - 4) < 1e-9 and r["explicit_gap"] < 1e-12
    assert r["right_gap"] < 1e-12  # the page's own right step under shard_map is one device's gradient
    assert r["fsdp_fraction"] < 0.26 and abs(r["tp_dev_loss"] - r["one_dev_loss"]) < 1e-4


@pytest.mark.lessons
def test_lesson_11_pipelines_experts_rings(tmp_path):
    """The page's schedules are jnnex's, with the formula's bubble and 1F1B holding P where GPipe holds M (the
    alternating one 2P - 1, and the formula's bubble in lockstep, where 1F1B's is larger, but not with its backward
    in two ticks); the page's micro-batched gradients, jnnex's pipeline, the page's router and ring, and jnnex's ring
    equal their references; the balancing loss evens the trained router's load (the busiest expert's share over the
    mean, seed 0)."""
    r, _ = run_lesson("11_pipelines_experts_rings", tmp_path)
    assert r["same_tables"] is True and r["bubble_gpipe"] == r["bubble_1f1b"] == r["bubble_formula"]
    assert (r["held_gpipe"], r["held_1f1b"], r["held_alternating"]) == (8, 4, 7) and r["same_alternating"] is True
    excess = r["excess"]  # the bubble over the formula, a backward twice a forward: in lockstep, 1F1B's alone
    assert r["lockstep_gap"] < 1e-12 and all(abs(e["own programs"]) < 1e-12 for e in excess.values())
    assert excess["1f1b"]["lockstep"] > 0.05 and abs(excess["gpipe"]["lockstep"]) < 1e-12
    assert abs(excess["alternating"]["lockstep"]) < 1e-12
    # the backward in two ticks: jnnex's table, the formula's bubble in lockstep too, and 1F1B's memory
    assert r["same_halves"] is True and r["held_halves"] == 4
    assert all(abs(e) < 1e-12 for e in r["halves_excess"].values())
    assert max(r["page_pipeline_gap"], r["jnnex_pipeline_gap"], r["page_loss_gap"]) < 1e-12
    assert r["aux_gap"] < 1e-12 and abs(r["load_sum"] - 1) < 1e-12
    assert max(r["page_ring_gap"], r["jnnex_ring_gap"]) < 1e-12
    assert r["balance"]["striped"] < r["balance"]["contiguous"]
    assert r["spread"]["aux_weight 0.5"] < r["spread"]["no balancing loss"]


@pytest.mark.lessons
def test_lesson_12_toy_to_large(tmp_path):
    """One Adam step moves a hidden layer's output in proportion to the width, and not at 1/width the rate; μP at its
    base width is the standard model; the coordinate check is flat under μP and grows under the standard
    parametrisation; the page's scaling-law fit is as good as jnnex's (jnnex's, from many starts, no worse), and the
    held-out run is predicted and measured."""
    r, _ = run_lesson("12_toy_to_large", tmp_path)
    assert abs(r["page_slopes"]["lr fixed"] - 1) < 0.1 and abs(r["page_slopes"]["lr / width (μP)"]) < 0.1
    assert r["base_equal"] is True
    assert all(abs(s) <= 0.1 for s in r["slopes"]["mup"].values()), r["slopes"]
    assert r["slopes"]["standard"]["block 0"] > 0.5
    assert r["jnnex_rms"] <= r["page_rms"] + 1e-9 and r["runs"] >= 5
    assert r["predicted"] > 0 and r["measured"] > 0
