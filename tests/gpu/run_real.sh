#!/usr/bin/env bash
# The real-length rows of docs/benchmarks.md (and the search for the real-length gap), on the 2 x H200 machine, in
# one call of under 9 minutes:
#   bash tests/gpu/run_real.sh .gpu/bundle.tar.xz [runs|knobs] [DEADLINE_S]      (from the repo root)
# Real-length rows: Normal(892, 177) clipped to [300, 1423], at the reference effective batch of 16; 30 steps, the
# last 25 timed.
#
# runs (default):
#   at once: GPU 0 bare Unsloth 16 x 1 (plus a timed evaluation of 64 rows, and one profiled step);
#            GPU 1 bare Unsloth 4 x 4;
#   at once: GPU 0 medray 1 GPU 16 x 1; GPU 1 medray 1 GPU 4 x 4;
#   then medray on both GPUs, 8 x 1 per GPU (effective 16, the same 1,108 optimizer steps an epoch).
#   The medray runs take $KNOBS, e.g. KNOBS="--padding padded --sort-lengths --pad-multiple 64" (the best of `knobs`).
# knobs: bare Unsloth 4 x 4 under six settings, two at a time (bare honours the knobs without any medray change):
#   default (Unsloth picks padding-free) | padded + length-sorted micro-batches    (both with one profiled step)
#   padded + sorted + pad to 64          | padded + sorted + pad to 128 + per-block CUDA graphs (<= 12 shapes)
#   padding-free padded to 128           | padded + sorted with the per-block compile off
#   A profiled step's kernel time far below its wall time means the GPU waited for the host (launch-bound).
set -u
BUNDLE=${1:?usage: bash tests/gpu/run_real.sh BUNDLE [runs|knobs] [DEADLINE_S]}
MODE=${2:-runs}
DEADLINE=${3:-530}
KNOBS=${KNOBS:-}
START=$SECONDS
if [ -z "${REHEARSAL:-}" ]; then source .gpu/device_env.sh "$BUNDLE" pinned || exit 1; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
source tests/gpu/bench_lib.sh
prepare

REAL=(--lengths real --steps 30 --warmup 5)  # lengths vary step to step: time more steps than on full rows
if [ "$MODE" = knobs ]; then
  SORTED=(--padding padded --sort-lengths)
  K=(--variant bare --lengths real --steps 15 --batch 4 --grad-accum 4)
  bench knob_default 0 160 "${K[@]}" --profile &
  bench knob_padded 1 160 "${K[@]}" "${SORTED[@]}" --profile &
  wait
  bench knob_padded_64 0 160 "${K[@]}" "${SORTED[@]}" --pad-multiple 64 &
  bench knob_padded_graphs 1 160 "${K[@]}" "${SORTED[@]}" --pad-multiple 128 --env UNSLOTH_BLOCK_CUDAGRAPHS=1 \
    --env UNSLOTH_BLOCK_CUDAGRAPHS_MAX_SHAPES=12 &
  wait
  bench knob_free_128 0 160 "${K[@]}" --pad-multiple 128 &
  bench knob_padded_eager 1 160 "${K[@]}" "${SORTED[@]}" --env UNSLOTH_BLOCK_COMPILE=0 &
  wait
else
  # shellcheck disable=SC2206  # KNOBS is a list of flags
  MEDRAY_KNOBS=($KNOBS)
  bench bare_real_16 0 200 --variant bare "${REAL[@]}" --batch 16 --grad-accum 1 --eval-rows 64 --profile &
  bench bare_real_4x4 1 200 --variant bare "${REAL[@]}" --batch 4 --grad-accum 4 &
  wait
  bench medray1_real_16 0 240 --variant medray --gpus 1 "${REAL[@]}" --batch 16 --grad-accum 1 "${MEDRAY_KNOBS[@]}" &
  bench medray1_real_4x4 1 240 --variant medray --gpus 1 "${REAL[@]}" --batch 4 --grad-accum 4 "${MEDRAY_KNOBS[@]}" &
  wait
  bench medray2_real_8 0,1 260 --variant medray --gpus 2 "${REAL[@]}" --batch 8 --grad-accum 1 "${MEDRAY_KNOBS[@]}"
fi
summary
