# The two commands of the README:
#   make demo   -- set up .venv and run the SFT -> reward model -> PPO pipeline on the default task
#   make test   -- set up .venv (with the test extra) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=
# setuptools prints an informational box on every editable install ("Editable installation ... folders in
# your working directory with the same name as your package ..."); only that notice is filtered.
EDITABLE := PYTHONWARNINGS="ignore:Editable installation" $(PIP) install -q -c constraints.txt -e

.PHONY: venv venv-test demo test bench clean

$(VENV)/.runtime: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(EDITABLE) .
	touch $@

# torch goes in first and pinned: 2.13.0 is the CPU wheel on disk; anything looser pulls a CUDA build.
$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -q torch==2.13.0
	$(EDITABLE) ".[test]"
	touch $@

venv: $(VENV)/.runtime
venv-test: $(VENV)/.test

demo: venv
	$(VENV)/bin/rlhf-jax pipeline --out $(DEMO_OUT) --overwrite

test: venv-test
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

bench: venv-test
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache
