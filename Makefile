# herllm: every command the README names. `make test` and `make demo` do the whole set-up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# glibc returns freed memory to the OS after every step by default; keeping it is +16-55% on CPU.
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 100000000000
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-fast demo lint format bench-step bench-buffer clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: it resolves to the local CPU wheel here and to the normal build elsewhere.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/herllm demo

lint: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: install
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

bench-step: install
	$(BIN)/python benchmarks/bench_step.py --out results/bench_step.json

bench-buffer: install
	$(BIN)/python benchmarks/bench_buffer.py --out results/bench_buffer.json

clean:
	rm -rf $(VENV) build results runs .pytest_cache
