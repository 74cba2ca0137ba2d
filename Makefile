# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing, installs jnnex into it (editable) and runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-fast test-lessons imports bench lessons clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# One stamp per target's extras, rebuilt when pyproject.toml changes. Tests include the plot extra so plots are tested.
$(VENV)/.stamp-base: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $@

$(VENV)/.stamp-lessons: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[lessons]"
	touch $@

demo: $(VENV)/.stamp-base
	rm -rf runs/demo
	$(VENV)/bin/jnnex train --model mlp --data census-first --steps 20000 --out runs/demo --seed 0
	$(VENV)/bin/jnnex sample --from runs/demo -n 20 --seed 0

# The whole suite on two processes (pytest-xdist), every lesson run included; it passes on one too:
# `.venv/bin/python -m pytest -q`.
test: $(VENV)/.stamp-test
	$(PY) -m pytest -q -n 2 --dist worksteal

# Only the lesson runs (lessons/, tests/test_lessons.py): every lesson executed at its tiny size, graded exercises
# included. `make test` runs them too.
test-lessons: $(VENV)/.stamp-test
	$(PY) -m pytest -q -n 2 --dist worksteal -m lessons tests/test_lessons.py

# The edit-test loop: everything but the tests marked `slow`, each property on 2 examples, on two processes.
test-fast: $(VENV)/.stamp-test
	JNNEX_HYPOTHESIS_PROFILE=fast $(PY) -m pytest -q -m "not slow and not lessons" -n 2 --dist worksteal

# The package's import graph; fails on a cycle, a private name imported across modules, or the benchmarks imported.
imports: $(VENV)/.stamp-test
	$(PY) tests/test_imports.py

# Every lesson (lessons/*.py, jupytext percent files) executed into lessons/out/*.ipynb with its outputs and pictures.
# SIZE=tiny runs each in seconds; the default, full, reproduces the lectures' numbers (~20 min on 2 cores in all).
SIZE ?= full
lessons: $(VENV)/.stamp-lessons
	JNNEX_LESSON_SIZE=$(SIZE) $(PY) -m jnnex.learn lessons/out

bench: $(VENV)/.stamp-test
	$(VENV)/bin/jnnex bench --quick --out benchmarks/results

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
