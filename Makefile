# Two commands on a fresh machine with Python 3.10+:
#   make demo   - install, then run the end-to-end demo on milvus-lite (no server)
#   make test   - install everything, then run unit and integration tests
#                 (integration tests start a real Milvus server themselves)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test install install-dev unit integration clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(BIN)/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train]'

install-dev: $(BIN)/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,server,dev]'

demo: install
	$(BIN)/milvus-ltr-router demo

test: install-dev
	$(BIN)/python -m pytest tests integration_tests -v -p no:cacheprovider

unit: install-dev
	$(BIN)/python -m pytest tests -q

integration: install-dev
	$(BIN)/python -m pytest integration_tests -v

clean:
	rm -rf $(VENV) demo_output .pytest_cache *.egg-info
