# Set-up is part of every target: the first `make train` or `make test` builds .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; a GPU user runs e.g. `make TORCH_SPEC="torch==2.13.0 --index-url <the CUDA index>" install`.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install train test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) -m llmtrain.run $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# The benchmark's peers need Hugging Face Trainer's `accelerate`, which llmtrain itself does not.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m benchmarks.bench $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
