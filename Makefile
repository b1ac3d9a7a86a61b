# guardd — the whole set-up on a fresh Debian 12 machine is `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy
# A uv installed by this Makefile lives here when none is on PATH.
UV_HOME := $(HOME)/.cache/guardd-uv
UV := $(shell command -v uv 2>/dev/null || echo $(UV_HOME)/bin/uv)
# Passed down by absolute path: the uv installed into UV_HOME is never on PATH, so tests,
# benchmarks and packaging scripts must take it from here (tests/harness/wheelhouse.py).
export UV
PYTEST_ARGS ?=
# Three workers on 2 cores: most of the suite waits on real daemons, nginx and etcd rather
# than on a core. Measured on a 2-core machine, the whole suite from a fresh clone: 1345 s
# with two workers, 993 s with three (the same tree, both beside other work); with the
# longest modules first, two at a time (below), 840 s for a suite that had taken 1125 s.
PYTEST_WORKERS ?= 3
# Tests go out two at a time, in collection order (the longest modules first:
# tests/conftest.py): pytest-xdist's default first hands each worker a quarter of its share
# as one block, which put every long module on the same worker.
PYTEST_SCHED := --maxschedchunk 2

.PHONY: help
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

.PHONY: bootstrap
bootstrap: .venv/.synced

$(UV):
	@./packaging/bootstrap.sh uv "$(UV_HOME)"

# Bytecode compiled at install, and the project's own before the suite: an environment
# may forbid Python to write it (PYTHONDONTWRITEBYTECODE, a read-only tree), and then every
# daemon, guardctl and replay the suite starts compiled all it imports from source again
# (a daemon's start to READY measured at 1.9 s that way, 0.9 s from bytecode).
.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode
	@touch $@

.PHONY: bytecode
bytecode: bootstrap
	$(UV) run --frozen python -m compileall -q -j 0 guardd tests bench

.PHONY: system-deps
system-deps:  ## install nginx, systemd-container, debootstrap, zstd, prometheus, tmux when missing
	@./packaging/bootstrap.sh system

.PHONY: test
test: bootstrap system-deps bytecode  ## the full suite (installs what it needs)
	$(UV) run --frozen pytest -n $(PYTEST_WORKERS) $(PYTEST_SCHED) $(PYTEST_ARGS)

.PHONY: lint
lint: bootstrap  ## ruff, mypy --strict on guardd/ tests/ bench/, bandit
	$(UV) run --frozen ruff check guardd tests bench
	$(UV) run --frozen ruff format --check guardd tests bench
	# mypy checks guardd, tests and bench: [tool.mypy] packages in pyproject.toml.
	$(UV) run --frozen mypy
	# B101 asserts only narrow types; B404/B603: every subprocess is an argv list, never a shell.
	$(UV) run --frozen bandit -r guardd -q -s B101,B404,B603

.PHONY: audit
audit: bootstrap  ## known vulnerabilities in the locked dependencies (needs PyPI's JSON API)
	mkdir -p build && $(UV) export --frozen --format requirements-txt --no-hashes --no-emit-project -o build/audit-requirements.txt
	$(UV) tool run pip-audit --strict --no-deps --disable-pip -r build/audit-requirements.txt

.PHONY: soak
soak: bootstrap system-deps  ## 10 minutes (SOAK_MINUTES=60 for the hour) at interval=50ms under scripted failures; soak-report/summary.md
	$(UV) run --frozen python -m tests.soak.soak --minutes $(or $(SOAK_MINUTES),10) --out soak-report

.PHONY: demo
demo: bootstrap  ## a real rollback on this machine, in under a minute
	@./packaging/bootstrap.sh demo
	$(UV) run --frozen guardd demo

.PHONY: deb
deb: bootstrap  ## build dist/guardd_<version>_<arch>.deb (Debian 12; installs dpkg-dev, help2man)
	UV=$(UV) ./packaging/deb/build.sh dist

BENCH_ARGS ?=

.PHONY: bench
bench: bootstrap  ## guardd beside the shell guard, monit and blackbox_exporter, and a 3-node fleet (~20 min; writes bench/results/)
	$(UV) run --frozen python -m bench.run $(BENCH_ARGS)

.PHONY: clean
clean:  ## remove the venv and caches (not the nspawn image cache)
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache dist build
