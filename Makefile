# Two commands on a fresh machine with Python 3.11:
#   make demo   - create .venv, install, run the main job
#   make test   - create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CKPT ?= ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt

.PHONY: install demo test test-all lint bench clean

$(BIN)/tdmpc-opt: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,export,video]"
	touch $@

install: $(BIN)/tdmpc-opt

demo: install
	$(BIN)/python -m tdmpc_opt.demo --checkpoint $(CKPT)

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
