# The two commands of the README: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	# img2dataset pulls the Python 3.6 `dataclasses` backport, which breaks Prefect's
	# server on 3.11 (STACK_NOTES); the standard library has the real module.
	$(BIN)/pip uninstall --quiet --yes dataclasses
	touch $(STAMP)

demo: setup
	$(BIN)/mmpipe demo

# The browser test of the UIs drives Debian's Chromium: browser builds cannot be downloaded here.
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BROWSER):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver

test: setup $(BROWSER)
	$(BIN)/python -m pytest -q --durations=15

bench: setup
	$(BIN)/python bench/ingest_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache

# open_clip beside our trainer (bench/vs_openclip.py). open-clip-torch needs torchvision, which only works
# with torch 2.14.1, a CUDA build of several GB: it gets a venv of its own (STACK_NOTES).
OPENCLIP_VENV := .venv-openclip
OPENCLIP_STAMP := $(OPENCLIP_VENV)/.installed

$(OPENCLIP_STAMP): bench/openclip-requirements.txt
	$(PYTHON) -m venv $(OPENCLIP_VENV)
	$(OPENCLIP_VENV)/bin/pip install --quiet -r bench/openclip-requirements.txt
	touch $(OPENCLIP_STAMP)

.PHONY: bench-openclip
bench-openclip: setup $(OPENCLIP_STAMP)
	$(BIN)/python bench/vs_openclip.py
