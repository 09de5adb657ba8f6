#!/usr/bin/env bash
# Run the GPU test tier on the lent GPU machine (see ../shared/gpu/README.md for the bundle):
#   bash tests/gpu/run_tests.sh .gpu/bundle.tar.xz
# The repo itself goes on PYTHONPATH; the bundle carries unsloth, trl, ray, bitsandbytes for the image's Python.
set -uo pipefail
BUNDLE=${1:?usage: run_tests.sh BUNDLE}
source .gpu/device_env.sh "$BUNDLE" pinned || exit 1
export PYTHONPATH="$PWD:$PYTHONPATH" MEDRAY_TOKENIZER_MODEL="$TOK"
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -p no:cacheprovider -x -v tests/test_train_gpu.py tests/test_batching_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" \
  | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|Error" | cut -c1-400
