# qvmd — see README.md. Everything runs as root on Debian 12.
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: all deps venv test lint unit demo bench clean

all: venv

deps:
	./scripts/install-deps.sh

# --system-site-packages: python3-nftables and python3-systemd come from Debian.
$(BIN)/qvmd: pyproject.toml | deps
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: deps $(BIN)/qvmd

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

test: lint
	$(BIN)/pytest -q

demo: venv
	$(BIN)/python tools/demo.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
