# Set-up and entry points. `make repro` and `make test` each create the environment first (once per requirements.txt).
VENV := .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup repro test test-fast bench
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

repro: setup          ## run the whole pipeline on the embedded default
	dvc repro

test: setup           ## lint, then every test, the end-to-end pipeline test included (what CI runs)
	ruff check .
	python -m pytest

test-fast: setup      ## lint and unit tests only, for quick iterations
	ruff check .
	python -m pytest -m "not e2e"

bench: setup          ## time each stage of a full run and of the no-op rerun
	python bench/pipeline.py
