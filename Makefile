# secure_fed: two commands for a newcomer.
#   make demo   creates .venv, installs, runs a federation on 127.0.0.1 (DP + HE + TLS)
#   make test   creates .venv, installs with the test extras, runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch must be installed before anything that depends on torch; a plain
# `pip install torch` (or opacus first) would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install lint typecheck bench clean docs chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml examples/secure-fed-examples/pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e examples/secure-fed-examples
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/secure-fed demo --out demo-run

# Two workers (pytest-xdist), one per core of the CI machine; the 25 slowest tests are listed
# at the end, so that a slow new test shows.
test: $(STAMP) chromium
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --durations=25

# tests/test_audit_report.py renders the HTML audit report in headless Chromium (Debian's
# package chromium, about 125 MB to download). Installed here when missing, as root with
# apt-get; without root or apt that one test skips and says why.
chromium:
	@if command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "warning: chromium is missing and cannot be installed here (needs root and" \
	    "apt-get): the headless-browser test of the HTML report will be skipped" >&2; \
	else \
	  echo "installing Debian's chromium for the HTML report test (once)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium >/dev/null; } || \
	  echo "warning: apt-get could not install chromium: the headless-browser test of" \
	    "the HTML report will be skipped" >&2; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check secure_fed tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy secure_fed

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-enable --benchmark-only

# API reference of the public Python API (see docs/api.md), HTML from the docstrings into
# docs/api/ (generated, git-ignored); pdoc needs no network to build or to view it.
API_MODULES := secure_fed.master secure_fed.slave secure_fed.privacy secure_fed.he \
	secure_fed.identity secure_fed.audit secure_fed.config secure_fed.models secure_fed.data \
	secure_fed.errors
docs: $(STAMP)
	rm -rf docs/api
	$(BIN)/python -m pdoc --docformat google --output-directory docs/api $(API_MODULES)

clean:
	rm -rf demo-run .pytest_cache .benchmarks docs/api
