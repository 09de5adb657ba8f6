# Helpers of tests/gpu/run.sh and tests/gpu/run_real.sh: sourced, not run. Needs START and DEADLINE (seconds) set,
# the bundle's environment sourced, and the repo root as the working directory.
# Everything goes to $OUT (default ./bench_out): one log per run, benchmarks.json (one record per run),
# benchmarks.md, peak.json and the profiled steps' operator tables.
# A CPU rehearsal of a script's plumbing (no GPU; a tiny model):
#   REHEARSAL=1 PYTHON=/work/venv/bin/python MODEL_DIR=/tmp/tiny BENCH_EXTRA="--cpu --steps 3 --warmup 1" ...
REPO=$PWD
O=${OUT:-$PWD/bench_out}
mkdir -p "$O"
MODEL_DIR=${MODEL_DIR:-/tmp/m7b}
# shellcheck disable=SC2206  # a list of flags
EXTRA=(${BENCH_EXTRA:-})
J=("${PYTHON:-python3}" "$REPO/jobs/benchmark.py")
COMMON=(--model-dir "$MODEL_DIR" --json "$O/benchmarks.json" --peak-file "$O/peak.json")

left() { echo $(( DEADLINE - (SECONDS - START) )); }

# bench NAME DEVICES CAP [jobs/benchmark.py arguments...]
# One run in its own working directory (Unsloth writes unsloth_compiled_cache there), on CUDA_VISIBLE_DEVICES=DEVICES,
# under min(CAP, time left - 10) seconds; skipped when less than a minute would be left.
bench() {
  local name=$1 devices=$2 cap=$3
  shift 3
  local limit=$(( $(left) - 10 ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 60 ]; then echo "== $name skipped: $(left) s left"; return 0; fi
  mkdir -p "/tmp/bench_$name"
  local t0=$SECONDS
  (cd "/tmp/bench_$name" && CUDA_VISIBLE_DEVICES=$devices timeout -k 10 "$limit" "${J[@]}" "${COMMON[@]}" "$@" "${EXTRA[@]}") \
    > "$O/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $((SECONDS - t0)) s (limit $limit s), at $((SECONDS - START)) s"
  grep -a "^RESULT" "$O/$name.log" | cut -c1-300
  unsloth_layout_lines "$O/$name.log"
  if [ $rc -ne 0 ]; then
    grep -a -E "Error|Traceback|error:" "$O/$name.log" | grep -v -E "kernels-community|PlacementGroupCleaner" \
      | tail -n 8 | cut -c1-400
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader  # anything left holding a GPU?
  fi
}

# What Unsloth said about the batch layout in a log (a medray run must never show "Turning padding-free ... off").
unsloth_layout_lines() {
  local pattern="Turning padding-free batching off|Padding-free (auto-)?enabled|Padded batches \+ per-block compile"
  grep -a -o -E "$pattern" "$1" | sort | uniq -c | sed "s|^|   unsloth layout: |"
}

# Build /tmp/m7b (random weights, Mistral-7B v0.3 config and tokenizer) once, and measure the bf16 matmul peak once.
prepare() {
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  if [ ! -f "$MODEL_DIR/config.json" ]; then
    CUDA_VISIBLE_DEVICES=0 timeout -k 5 180 "${J[@]}" --build --model-dir "$MODEL_DIR" --tokenizer "$TOK" "${EXTRA[@]}" \
      > "$O/build.log" 2>&1
    echo "build rc=$? at $((SECONDS - START)) s"; grep -a "^BUILT" "$O/build.log" | cut -c1-300
  fi
  if [ ! -f "$O/peak.json" ] && [ -z "${NO_PEAK:-}" ]; then  # NO_PEAK: runs that record no MFU
    CUDA_VISIBLE_DEVICES=0 timeout -k 5 90 "${J[@]}" --measure-peak --peak-file "$O/peak.json" "${EXTRA[@]}" \
      > "$O/peak.log" 2>&1
  fi
  echo "peak: $(cat "$O/peak.json" 2>/dev/null || tail -n 3 "$O/peak.log")"
}

# The compact summary (every record, the floors, the projection) on stdout; benchmarks.md beside the JSON.
summary() {
  echo "==== SUMMARY (total $((SECONDS - START)) s)"
  "${J[@]}" --table --json "$O/benchmarks.json" --md "$O/benchmarks.md" 2>&1 | cut -c1-700
}
