#!/usr/bin/env bash
# `medray evaluate` on the H200 machine, in one call of about 4 minutes (from the repo root):
#   bash tests/gpu/run_evaluate.sh .gpu/bundle.tar.xz [MEDQA.jsonl]
# 1. builds /tmp/m7b: RANDOM weights in Mistral-7B v0.3's shape (bf16) and its tokenizer (~40 s; speed only: the
#    accuracy of random weights is chance, and no 7B quality figure is claimed anywhere);
# 2. trains a 2-step LoRA adapter on it (transformers + peft, bf16) so there is a run folder with a tuned adapter;
# 3. `jobs/evaluate.py` over one Ray Data actor per GPU: base vs tuned on the held-out split and the 300 MedQA rows,
#    log-likelihood and generation (64 new tokens; random weights never stop early, so every answer runs to the
#    limit: the slowest case). Prints the comparison table and questions/s; logs and summary.json go to $OUT.
set -u
BUNDLE=${1:?usage: bash tests/gpu/run_evaluate.sh BUNDLE [MEDQA.jsonl]}
MEDQA=${2:-}
for candidate in "$MEDQA" ../shared/data/medqa-usmle-4opt/medqa_usmle_4options_test_first300.jsonl \
    shared/data/medqa-usmle-4opt/medqa_usmle_4options_test_first300.jsonl; do
  if [ -n "$candidate" ] && [ -f "$candidate" ]; then MEDQA=$candidate; break; fi
done
[ -f "$MEDQA" ] || { echo "no MedQA file: pass its path as the second argument"; exit 1; }
START=$SECONDS
source .gpu/device_env.sh "$BUNDLE" pinned || exit 1
export PYTHONPATH="$PWD:$PYTHONPATH"
O=${OUT:-/tmp/evaluate_out}; mkdir -p "$O"
GPUS=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
[ -f /tmp/m7b/config.json ] || python3 jobs/benchmark.py --build --model-dir /tmp/m7b --tokenizer "$TOK" > "$O/build.log" 2>&1
echo "built /tmp/m7b at $((SECONDS - START)) s"
python3 jobs/train.py --config mistral7b-medical-o1 model.name=/tmp/m7b model.backend=hf model.load_in_4bit=false \
  data.path=pkg:sample_data/medical_o1_sample.jsonl data.max_length=512 train.max_steps=2 train.eval_steps=1 \
  train.per_device_batch_size=2 train.gradient_accumulation_steps=1 train.optim=adamw_torch \
  run.storage_path=/tmp/evaluate_runs run.name=eval-7b-random > "$O/train.log" 2>&1 || { tail -n 30 "$O/train.log"; exit 1; }
echo "trained the 2-step adapter at $((SECONDS - START)) s"
python3 jobs/evaluate.py /tmp/evaluate_runs/eval-7b-random --medqa "$MEDQA" --use-gpu --replicas "$GPUS" \
  --batch-size 16 --max-new-tokens 64 2>&1 | tee "$O/evaluate.log" | grep -v "^\s*(" | grep -E "^\||questions|evaluate:|summary|error"
cp /tmp/evaluate_runs/eval-7b-random/summary.json /tmp/evaluate_runs/eval-7b-random/report.md "$O/" 2>/dev/null
echo "done in $((SECONDS - START)) s"
