#!/usr/bin/env bash
# Issue 13's GPU figures: real-length rows side by side, the evaluation, and the reference run through `medray
# train`. Two calls of under 9 minutes each (from the repo root; the bundle: ../shared/gpu/make-bundle.sh):
#
#   bash tests/gpu/run_real.sh .gpu/bundle.tar.xz side [DEADLINE_S]        # 2 x H200 (nvidia-h200-x2), ~470 s
#   bash tests/gpu/run_real.sh .gpu/bundle.tar.xz reference 575            # 1 x H200, ~520 s (timeout_s 600)
#   bash tests/gpu/run_real.sh .gpu/bundle.tar.xz side1 575                # 1 x H200, the side-by-side in series
#   bash tests/gpu/run_real.sh .gpu/bundle.tar.xz real1 575                # 1 x H200, the real-length 4 x 4 pair only
#   bash tests/gpu/run_real.sh .gpu/bundle.tar.xz full1 575                # 1 x H200, the full-row 4 x 4 pair only
#
# side: one process per run, GPU 0 | GPU 1 at once, bare Unsloth beside medray (1 GPU) at the same shape:
#   real-length rows 4 x 4 (the bare run also times an evaluation of 1,971 real-length rows at micro-batch 4,
#   the reference shape) | real-length 16 x 1 | full 2048-token rows 4 x 4. Real-length rows: Normal(892, 177)
#   clipped to [300, 1423]; 30 steps, the last 25 timed; full rows 18 steps, the last 15 timed. medray runs take
#   $KNOBS (default none: train.padding=auto, padding-free on Unsloth only with flash-attn or xformers installed,
#   else padded and length-grouped).
# reference: `benchmarks/reference_run.py`: start-up, 200 optimizer steps of 16 real-length rows, one evaluation of
#   1,971 rows, one checkpoint, all in one `medray train` process on the 7B-shape random model; the full run
#   (1,108 steps, 5 evaluations, 6 checkpoints) projected from those parts.
# knobs (the earlier search, bare only): Unsloth's own layout choices at 4 x 4, two at a time.
# Everything goes to $OUT (benchmarks.json, benchmarks.md, one log per run); the last lines are the summary.
set -u
BUNDLE=${1:?usage: bash tests/gpu/run_real.sh BUNDLE [side|reference|knobs] [DEADLINE_S]}
MODE=${2:-side}
DEADLINE=${3:-530}
KNOBS=${KNOBS:-}
START=$SECONDS
if [ -z "${REHEARSAL:-}" ]; then source .gpu/device_env.sh "$BUNDLE" pinned || exit 1; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
source tests/gpu/bench_lib.sh
if [ "$MODE" = reference ]; then NO_PEAK=1; fi  # the reference run records no MFU: save the 15 s
prepare

REAL=(--lengths real --steps 30 --warmup 5)  # lengths vary step to step: time more steps than on full rows
FULL=(--lengths full --steps 18 --warmup 3)
# shellcheck disable=SC2206  # KNOBS is a list of flags
MEDRAY=(--variant medray --gpus 1 $KNOBS)
case "$MODE" in
  side)
    bench bare_real_4x4 0 230 --variant bare "${REAL[@]}" --batch 4 --grad-accum 4 --eval-rows 1971 &
    bench medray1_real_4x4 1 230 "${MEDRAY[@]}" "${REAL[@]}" --batch 4 --grad-accum 4 &
    wait
    bench bare_real_16 0 200 --variant bare "${REAL[@]}" --batch 16 --grad-accum 1 &
    bench medray1_real_16 1 200 "${MEDRAY[@]}" "${REAL[@]}" --batch 16 --grad-accum 1 &
    wait
    bench bare_full_4x4 0 200 --variant bare "${FULL[@]}" --batch 4 --grad-accum 4 &
    bench medray1_full_4x4 1 200 "${MEDRAY[@]}" "${FULL[@]}" --batch 4 --grad-accum 4 &
    wait
    ;;
  side1|real1|full1)  # one GPU: the floors' pairs one after the other (real 4 x 4, then full 4 x 4), each skipped if
    # time is short; real1 / full1: one pair per call (a pair takes ~330 s / ~250 s with start-up)
    if [ "$MODE" != full1 ]; then
      bench bare_real_4x4 0 150 --variant bare "${REAL[@]}" --batch 4 --grad-accum 4
      bench medray1_real_4x4 0 270 "${MEDRAY[@]}" "${REAL[@]}" --batch 4 --grad-accum 4
    fi
    if [ "$MODE" != real1 ]; then
      bench medray1_full_4x4 0 210 "${MEDRAY[@]}" "${FULL[@]}" --batch 4 --grad-accum 4
      bench bare_full_4x4 0 170 --variant bare "${FULL[@]}" --batch 4 --grad-accum 4
    fi
    ;;
  reference)
    limit=$(( $(left) - 15 ))
    (cd /tmp && CUDA_VISIBLE_DEVICES=0 timeout -k 10 "$limit" "${PYTHON:-python3}" "$REPO/benchmarks/reference_run.py" \
      --model-dir "$MODEL_DIR" --json "$O/benchmarks.json" --log "$O/reference_run.log" ${REFERENCE_EXTRA:-}) \
      > "$O/reference.log" 2>&1
    echo "== reference rc=$? at $((SECONDS - START)) s"
    grep -a -E "^RESULT|failed" "$O/reference.log" | cut -c1-1500
    unsloth_layout_lines "$O/reference_run.log"
    ;;
  knobs)
    SORTED=(--padding padded --sort-lengths)
    K=(--variant bare --lengths real --steps 15 --batch 4 --grad-accum 4)
    bench knob_default 0 160 "${K[@]}" --profile &
    bench knob_padded 1 160 "${K[@]}" "${SORTED[@]}" --profile &
    wait
    bench knob_padded_64 0 160 "${K[@]}" "${SORTED[@]}" --pad-multiple 64 &
    bench knob_free_128 1 160 "${K[@]}" --pad-multiple 128 &
    wait
    ;;
  *) echo "unknown mode $MODE: side, side1, real1, full1, reference or knobs"; exit 2 ;;
esac
summary
