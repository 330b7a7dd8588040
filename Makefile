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

test: $(VENV_STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf .venv
