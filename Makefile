# Two commands set everything up on a fresh machine:
#   make demo   - creates .venv if missing, fetches real weights, runs the main job
#   make test   - creates .venv if missing, runs the test suite
PY := .venv/bin/python
VENV_STAMP := .venv/.vistune-installed

.PHONY: demo test venv clean

$(VENV_STAMP): pyproject.toml
	bash scripts/setup_venv.sh
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

demo: $(VENV_STAMP)
	bash scripts/demo.sh

# pytest-xdist workers: one per core, at most 4 (each holds torch and its models); 0 = one process.
# Measured on a 2-core AVX2-only EPYC: 428 s in one process, 276-369 s on 2 workers before the
# 2026-12-04 cuts, then 270-298 s in three runs (RESULTS.md: the suite's time on the AVX2-only CPU).
TEST_JOBS ?= $(shell python3 -c "import os; n = len(os.sched_getaffinity(0)); print(min(4, n) if n > 1 else 0)")

# Bytecode is written for the suite even where PYTHONDONTWRITEBYTECODE is set (it is on the project's
# machines): otherwise every worker re-rewrites the 36 test modules' asserts and every subprocess
# recompiles vistune, ~8 s of each worker's collection alone. __pycache__ is git-ignored.
test: $(VENV_STAMP)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -n $(TEST_JOBS) tests

clean:
	rm -rf .venv
