#!/usr/bin/env bash
# The full-row rows of docs/benchmarks.md, on the 2 x H200 machine, in one call of under 9 minutes:
#   bash tests/gpu/run.sh .gpu/bundle.tar.xz [DEADLINE_S]          (from the repo root; bundle: ../shared/gpu)
# 1. builds /tmp/m7b and measures the bf16 matmul peak (~60 s);
# 2. at once, one process per run: GPU 0 runs (b) bare Unsloth at micro-batch 4, then 16;
#    GPU 1 runs (c) transformers + peft + bitsandbytes at 4, then (a) medray on 1 GPU at 4 (~190 s);
# 3. (a) medray on both GPUs, micro-batch 4 per GPU (~130 s).
# Full 2048-token rows, grad-accum 1, 18 steps of which the last 15 are timed. Logs, benchmarks.json and
# benchmarks.md go to $OUT; the last lines printed are the summary, the floors and (with real rows) the projection.
set -u
BUNDLE=${1:?usage: bash tests/gpu/run.sh BUNDLE [DEADLINE_S]}
DEADLINE=${2:-530}
START=$SECONDS
if [ -z "${REHEARSAL:-}" ]; then source .gpu/device_env.sh "$BUNDLE" pinned || exit 1; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
source tests/gpu/bench_lib.sh
prepare

FULL=(--lengths full --grad-accum 1)
(
  bench bare_full_4 0 200 --variant bare "${FULL[@]}" --batch 4
  bench bare_full_16 0 220 --variant bare "${FULL[@]}" --batch 16
) &
(
  bench peft_full_4 1 200 --variant peft "${FULL[@]}" --batch 4
  bench medray1_full_4 1 260 --variant medray --gpus 1 "${FULL[@]}" --batch 4
) &
wait
bench medray2_full_4 0,1 280 --variant medray --gpus 2 "${FULL[@]}" --batch 4
summary
