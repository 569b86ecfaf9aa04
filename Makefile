# Two entry points for a fresh machine: `make demo` (main job) and `make test` (the suite). Both idempotent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test data reproduce reproduce-quick clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever pyproject.toml changes. torch==2.14.1 / torchvision==0.29.1 are pinned.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Fashion-MNIST from Debian (package dataset-fashion-mnist). As root it is installed here; otherwise run
# `sudo apt-get install dataset-fashion-mnist`, or point data.root at a folder with the four IDX .gz files.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', then re-run make"; exit 1; \
	fi

test: $(VENV)/.installed data
	$(BIN)/ruff check beit tests scripts
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

demo: $(VENV)/.installed data
	$(BIN)/beit demo

# The paper's claim on Fashion-MNIST (docs/results/fashion_mnist.md); resumable: rerun to continue.
reproduce: $(VENV)/.installed data
	$(BIN)/beit reproduce fashion-mnist

reproduce-quick: $(VENV)/.installed data
	$(BIN)/beit reproduce fashion-mnist --quick

clean-venv:
	rm -rf $(VENV)
