#!/usr/bin/env bash
# Create the benchmark environment /work/main/.bench-venv (git-ignored) from scratch.
#
# It holds the peers that benchmarks/bench_step.py compares against: SAELens (sae-lens),
# dictionary_learning (dictionary-learning) and sparsify (eai-sparsify). Our own modules need
# only torch and are imported from the repository root.
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
# dictionary-learning pulls torchvision, which fails to import beside the CPU torch; no peer needs it.
"${PIP[@]}" uninstall -y torchvision

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import sae_lens, dictionary_learning, sparsify  # noqa: F401
for name in ("torch", "sae-lens", "dictionary-learning", "eai-sparsify", "transformer-lens"):
    print(f"{name} {md.version(name)}")
PY
