# Set-up and entry points. `make repro` and `make test` each create the environment first (once per requirements.txt).
VENV := .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup browser repro test test-fast bench fuzz
setup: $(VENV)/.installed

# tests/test_plots.py opens `dvc plots show` in a real headless browser: Debian's Chromium (root for apt-get)
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

repro: setup          ## run the whole pipeline on the embedded default
	dvc repro

test: setup browser   ## lint, then every test, the end-to-end pipeline test included (what CI runs)
	ruff check .
	python -m pytest

test-fast: setup      ## lint and unit tests only, for quick iterations
	ruff check .
	python -m pytest -m "not e2e"

bench: setup          ## time each stage of a full run and of the no-op rerun
	python bench/pipeline.py

fuzz: setup           ## the long fuzzing profile (README: Security); its figures go to bench/results/fuzz.json
	HYPOTHESIS_PROFILE=long FUZZ_STATS=bench/results/fuzz.json python -m pytest tests/test_fuzz.py -q
