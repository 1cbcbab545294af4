# Two commands on a fresh machine with Python 3.11:
#   make demo   - create .venv, install, run the main job (tdmpc-opt pipeline)
#   make test   - create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all lint bench clean

$(BIN)/tdmpc-opt: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,export,video,ray]"
	touch $@

install: $(BIN)/tdmpc-opt

# The main job: teacher -> data -> students with and without distillation -> FP16/INT8 ->
# evaluation -> runs/pipeline/report.md. About 14 minutes on a 2-core CPU, install included;
# started again after an interruption it continues where it stopped. Settings: make demo ARGS="steps=8000".
demo: install
	$(BIN)/tdmpc-opt pipeline --run-dir runs/pipeline $(ARGS)

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
