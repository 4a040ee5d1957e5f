# Every target that needs Python creates its own virtualenv first (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
#: pytest-xdist workers for `make test`; more than the cores, since the tests mostly wait.
TEST_WORKERS ?= 4
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: all demo test lint typecheck unit proto proto-check test-gpu bench deb rpm test-system test-prometheus clean

all: test

$(VENV)/.done: requirements-dev.lock requirements.lock pyproject.toml scripts/bootstrap
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/bootstrap
	touch $@

## demo: run the agent on simulated GPUs against a built-in kubelet stand-in
demo: $(VENV)/.done
	$(VENV)/bin/vgpu-agent demo

## test: lint, type-check, check the import rules and the generated code, run every test
## that needs no GPU with branch coverage, and hold the coverage floors
test: $(VENV)/.done
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --python-version 3.9 vgpu_agent tests bench
	$(VENV)/bin/vermin --no-tips --violations -t=3.9- --eval-annotations --backport dataclasses vgpu_agent bench tests
	$(VENV)/bin/lint-imports --no-cache --no-logo
	scripts/gen-proto --check
	# --timeout: a test that hangs fails after 5 minutes instead of holding CI to its limit.
	# -n: the tests mostly wait on processes and sockets, so TEST_WORKERS run at once;
	# loadgroup keeps the tests that share one expensive fixture (xdist_group) in one worker.
	# Bytecode is cached under $(VENV) (not beside the sources): the tests start the CLI as a
	# process some 200 times, and compiling the package each time was a fifth of its CPU.
	PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX="$(CURDIR)/$(VENV)/pycache" \
	$(PY) -m pytest -m "not gpu and not system" -q --timeout=300 \
		-n $(TEST_WORKERS) --dist loadgroup --cov --cov-report=
	scripts/coverage-floors $(PY)

## proto: regenerate vgpu_agent/frontends/_proto from protos/ with the pinned generator
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

## test-system: install the deb into a Debian 12 container booted with systemd-nspawn,
## then test-prometheus
test-system: deb $(VENV)/.done
	scripts/test-system
	scripts/test-prometheus $(PY)

## test-prometheus: a real Prometheus (Debian's package, installed when missing) scraping a
## simulated agent: promtool check metrics, the PromQL of docs/observability.md, the alert rules
test-prometheus: $(VENV)/.done
	scripts/test-prometheus $(PY)

clean:
	rm -rf $(VENV) .venv-protogen build dist .mypy_cache .ruff_cache .pytest_cache .coverage .coverage.*
