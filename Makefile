# The two commands of the README: `make demo` and `make test`. Both start from a clean clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test install dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files keep repeated `make` calls fast; they are rebuilt when the dependencies change.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

demo: install
	$(BIN)/reslab demo

# Two pytest workers on the two cores, one torch thread each: more threads than cores make
# every worker wait on the other (measured 2-3x slower).
test: dev
	KERAS_BACKEND=torch OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
