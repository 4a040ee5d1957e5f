# Every target that needs Python creates its own virtualenv first (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: all demo test lint typecheck unit proto proto-check test-gpu bench deb rpm test-system clean

all: test

$(VENV)/.done: requirements-dev.lock requirements.lock pyproject.toml scripts/bootstrap
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/bootstrap
	touch $@

## demo: run the agent on simulated GPUs against a built-in kubelet stand-in
demo: $(VENV)/.done
	$(VENV)/bin/vgpu-agent demo

## test: lint, type-check, check the generated code, run every test that needs no GPU
test: $(VENV)/.done
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --python-version 3.9 vgpu_agent tests bench
	$(VENV)/bin/vermin --no-tips --violations -t=3.9- --eval-annotations --backport dataclasses vgpu_agent bench tests
	scripts/gen-proto --check
	# --timeout: a test that hangs fails after 5 minutes instead of holding CI to its limit
	$(PY) -m pytest -m "not gpu and not system" -q --timeout=300

## proto: regenerate vgpu_agent/_proto from protos/ with the pinned generator
proto:
	scripts/gen-proto

## test-gpu: the real-GPU tests (run on a machine with an NVIDIA GPU and MPS)
test-gpu:
	scripts/test-gpu

## bench: the control-plane benchmark (simulated GPUs)
bench: $(VENV)/.done
	$(PY) bench/control_plane.py

deb:
	scripts/build-deb

rpm:
	scripts/build-rpm

## test-system: install the deb into a Debian 12 container booted with systemd-nspawn
test-system: deb
	scripts/test-system

clean:
	rm -rf $(VENV) .venv-protogen build dist .mypy_cache .ruff_cache .pytest_cache
