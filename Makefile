# Two commands set everything up: `make demo` and `make test`. Both create .venv if it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
DEV := $(VENV)/.installed-dev

.PHONY: demo test test-slow bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The demo needs the package and LiteRT for its TFLite teachers (a minute less to install on a fresh machine);
# tests, benchmarks and lint add the dev, Hugging Face and S3 extras — in one pip call, which also satisfies
# the demo.
# pip's byte-compiling stays on (~1 min): with --no-compile and PYTHONDONTWRITEBYTECODE set (as on this
# machine) every Ray worker recompiles torch on import, and the demo ran 2 min slower.
$(CORE): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[tflite]'
	touch $(CORE)

$(DEV): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,hf,s3]'
	touch $(CORE) $(DEV)

demo: $(CORE)
	$(BIN)/dad run -c configs/quickstart.toml

test: $(DEV)
	$(BIN)/python -m pytest -q

test-slow: $(DEV)
	$(BIN)/python -m pytest -q -m slow

bench: $(DEV)
	$(BIN)/python -m bench

lint: $(DEV)
	$(BIN)/ruff check pipeline stages student tests bench

clean:
	rm -rf runs/ .pytest_cache
