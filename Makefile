# Everything the project needs, from a bare machine: apt packages, a venv, the package with all extras.
# `make setup` is idempotent: it re-runs pip only when setup.cfg, pyproject.toml or constraints.txt change.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_STAMP := $(VENV)/.apt-installed
APT_PACKAGES := ffmpeg espeak-ng opencv-doc slurmctld slurmd slurm-client munge
DEMO_DIR ?= demo_out
# Tests and the demo never reach a hub; offline wandb; no shm JIT op.
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test lint typecheck bench clean

setup: $(STAMP) $(APT_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python setup.cfg pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade "pip>=24" "setuptools>=68" wheel
	$(PY) -m pip install --quiet -c constraints.txt -e ".[features,dev]"
	touch $@

$(APT_STAMP): $(VENV)/bin/python
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	touch $@

lint: setup
	$(VENV)/bin/ruff check giblet_ds launch tools tests bench
	$(VENV)/bin/ruff format --check giblet_ds launch tools tests bench

typecheck: setup
	$(VENV)/bin/mypy giblet_ds

test: setup lint typecheck
	$(VENV)/bin/python -m pytest -q --timeout=600 tests

demo: setup
	bash launch/demo.sh $(DEMO_DIR)

bench: setup
	@echo "see bench/*.py; results go to BENCHMARKS.md"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
