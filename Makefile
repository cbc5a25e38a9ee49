# One entry point for set-up, tests and the demo. Every target creates .venv on first use.
PY := .venv/bin/python
# The CPU build of torch on machines without an NVIDIA driver, the CUDA build elsewhere (PyPI default).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: setup test lint demo clean
setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	# deepspeed ships only a source archive whose setup imports torch: build it against the torch above.
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PY) -m pytest -m "not benchmark" tests

# The whole pipeline on a generated toy dataset, CPU only, a few minutes (demo.py prints each command).
demo: setup
	$(PY) demo.py --out demo-out

clean:
	rm -rf .venv demo-out .pytest_cache .ruff_cache
