#!/usr/bin/env bash
# `medray evaluate` on the H200 machine, in one call of about 4 minutes (from the repo root):
#   bash tests/gpu/run_evaluate.sh .gpu/bundle.tar.xz [MEDQA.jsonl]
# 1. builds /tmp/m7b: RANDOM weights in Mistral-7B v0.3's shape (bf16) and its tokenizer (~40 s; speed only: the
#    accuracy of random weights is chance, and no 7B quality figure is claimed anywhere);
# 2. trains a 2-step LoRA adapter on it (transformers + peft, bf16) so there is a run folder with a tuned adapter;
# 3. `jobs/evaluate.py` over one Ray Data actor per GPU: base vs tuned on the held-out split and the 300 MedQA rows,
#    log-likelihood and generation (64 new tokens; random weights never stop early, so every answer runs to the
#    limit: the slowest case). Prints the comparison table and questions/s; logs and summary.json go to $OUT.
# A CPU rehearsal of the same three steps (no GPU, no bundle; the tiny random Mistral, the first LIMIT questions):
#   REHEARSAL=1 PYTHON=/work/main/.venv/bin/python LIMIT=20 OUT=/tmp/eval_rehearsal bash tests/gpu/run_evaluate.sh - MEDQA
set -u
BUNDLE=${1:?usage: bash tests/gpu/run_evaluate.sh BUNDLE [MEDQA.jsonl]}
MEDQA=${2:-}
for candidate in "$MEDQA" ../shared/data/medqa-usmle-4opt/medqa_usmle_4options_test_first300.jsonl \
    shared/data/medqa-usmle-4opt/medqa_usmle_4options_test_first300.jsonl; do
  if [ -n "$candidate" ] && [ -f "$candidate" ]; then MEDQA=$candidate; break; fi
done
[ -f "$MEDQA" ] || { echo "no MedQA file: pass its path as the second argument"; exit 1; }
START=$SECONDS
if [ -z "${REHEARSAL:-}" ]; then source .gpu/device_env.sh "$BUNDLE" pinned || exit 1; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
O=${OUT:-/tmp/evaluate_out}; mkdir -p "$O"
TOKENIZER=(); [ -n "${TOK:-}" ] && TOKENIZER=(--tokenizer "$TOK")  # default: mistral-common's v0.3 tokenizer
LIMIT_FLAG=(); [ -n "${LIMIT:-}" ] && LIMIT_FLAG=(--limit "$LIMIT")
if [ -n "${REHEARSAL:-}" ]; then
  MODEL_DIR=${MODEL_DIR:-/tmp/medray_eval_tiny}; RUN=/tmp/evaluate_runs/eval-tiny-random
  BUILD=(--cpu); TRAIN_DEVICE=(scaling.use_gpu=false); EVAL_DEVICE=(--no-use-gpu --replicas 1)
else
  MODEL_DIR=${MODEL_DIR:-/tmp/m7b}; RUN=/tmp/evaluate_runs/eval-7b-random
  GPUS=$(nvidia-smi -L | wc -l)
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
  BUILD=(); TRAIN_DEVICE=(); EVAL_DEVICE=(--use-gpu --replicas "$GPUS")
fi
if [ ! -f "$MODEL_DIR/config.json" ]; then
  "$PY" jobs/benchmark.py --build --model-dir "$MODEL_DIR" "${TOKENIZER[@]}" "${BUILD[@]}" > "$O/build.log" 2>&1 \
    || { tail -n 30 "$O/build.log"; exit 1; }
fi
echo "built $MODEL_DIR at $((SECONDS - START)) s"
"$PY" jobs/train.py --config mistral7b-medical-o1 model.name="$MODEL_DIR" model.backend=hf model.load_in_4bit=false \
  data.path=pkg:sample_data/medical_o1_sample.jsonl data.max_length=512 train.max_steps=2 train.eval_steps=1 \
  train.per_device_batch_size=2 train.gradient_accumulation_steps=1 train.optim=adamw_torch \
  run.storage_path="$(dirname "$RUN")" run.name="$(basename "$RUN")" "${TRAIN_DEVICE[@]}" > "$O/train.log" 2>&1 \
  || { tail -n 30 "$O/train.log"; exit 1; }
echo "trained the 2-step adapter at $((SECONDS - START)) s"
"$PY" jobs/evaluate.py "$RUN" --medqa "$MEDQA" "${EVAL_DEVICE[@]}" "${LIMIT_FLAG[@]}" --generation \
  --batch-size 16 --max-new-tokens 64 > "$O/evaluate.log" 2>&1
RC=$?
grep -a -v "^\s*(" "$O/evaluate.log" | grep -a -E "^\||questions|evaluate:|summary:|[Ee]rror|Traceback" | cut -c1-400
cp "$RUN/summary.json" "$RUN/report.md" "$O/" 2>/dev/null
echo "done in $((SECONDS - START)) s (evaluate rc=$RC)"
exit $RC
