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
	$(BIN)/python -m pip install -q -e ".[dev,export,video,ray]"
	touch $@

install: $(BIN)/tdmpc-opt

# Until the end-to-end pipeline lands, the main job evaluates a checkpoint (CKPT=...) on
# two MT30 tasks with full MPPI planning and writes runs/demo/{result.json,returns.png}.
demo: install
	@if [ ! -f "$(CKPT)" ]; then \
	  echo "error: no checkpoint at $(CKPT); pass one: make demo CKPT=path/to/model.pt" >&2; \
	  exit 2; fi
	$(BIN)/tdmpc-opt eval --checkpoint $(CKPT) --tasks cartpole-balance,walker-stand \
	  --episodes 1 --seed 1 --json runs/demo/result.json
	$(BIN)/tdmpc-opt plot runs/demo/result.json --out runs/demo/returns.png
	@echo "report: runs/demo/result.json and runs/demo/returns.png"

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
