"""The reference run measured through `medray train` itself, then the full run projected from the measured parts.

On one GPU with the 7B-shape random model (`jobs/benchmark.py --build`): rows shaped like medical-o1 `en` (token
lengths Normal(892, 177) clipped to [300, 1423] under the v0.3 tokenizer and medray's template), the reference
recipe (batch 4 x grad-accum 4, max length 2048, the preset `mistral7b-medical-o1`), and exactly one of each part:
start-up, `--steps` optimizer steps of 16 rows, one evaluation of 1,971 rows, one checkpoint. All in one timed
`python -m medray.cli train` process; the timings are read from the run's own `history.json` and `summary.json`.

    python benchmarks/reference_run.py --model-dir /tmp/m7b --json docs/benchmarks.json          # on the GPU
    python benchmarks/reference_run.py --cpu --model-dir /tmp/tiny --steps 4 --json /tmp/b.json   # CPU dry run

The projection (`projected_minutes`) is the full reference run: start-up + 1,108 steps at the measured steady step
time (+ the measured warm-up excess) + 5 evaluations + 6 checkpoints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.records import append_record, versions  # noqa: E402
from benchmarks.workload import REAL_LENGTHS, length_stats, load_tokenizer_source  # noqa: E402
from medray.config import DEFAULT_TEMPLATE  # noqa: E402
from medray.prompts import format_sample  # noqa: E402

REFERENCE_RUN = "reference_run"
"""The records' `variant`."""
FLOOR_MINUTES, GOAL_MINUTES = 30, 25
FULL_RUN = {"steps": 1108, "evaluations": 5, "checkpoints": 6}
"""One epoch of medical-o1 `en` (17,733 train rows) at 16 rows a step, evaluated and checkpointed every 200 steps
(steps 200..1000), plus the final checkpoint."""
VALIDATION_ROWS = 1971
"""The reference run's validation split: 10 % of medical-o1 `en`'s 19,704 rows."""
PADDING_FREE_OFF = "Turning padding-free batching off"
PROGRESS = re.compile(r"\[medray\] step (\d+)/\d+ .*?\| (loss|eval_loss) [\d.]+ .*?elapsed (\d+):(\d\d):(\d\d)")
"""A progress line of the run's console log: step, training or evaluation loss, elapsed H:MM:SS of the loop."""
WORDS = (
    "patient presents with acute chest pain fever cough dyspnea history of hypertension diabetes mellitus "
    "examination reveals tachycardia murmur edema laboratory findings show elevated troponin creatinine leukocytosis "
    "the most likely diagnosis is myocardial infarction pneumonia sepsis therefore treatment should include aspirin "
    "antibiotics fluids and monitoring considering differential diagnoses such as pulmonary embolism aortic "
    "dissection pericarditis we evaluate electrocardiogram imaging and response to therapy"
).split()


# ---------------------------------------------------------------------------------------------------- rows


def make_rows(tokenizer, count: int, seed: int, scale: float = 1.0) -> list[dict[str, str]]:
    """medical-o1-shaped rows whose templated, tokenized length follows the real data (times `scale`).

    Each word's token count is measured once; the reasoning gets words until the row reaches its drawn length.
    """
    rng = np.random.default_rng(seed)
    cost = {word: len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) for word in set(WORDS)}
    overhead = len(tokenizer(_text({"Question": "", "Complex_CoT": "", "Response": ""}, tokenizer))["input_ids"])
    drawn = rng.normal(REAL_LENGTHS["mean"] * scale, REAL_LENGTHS["sd"] * scale, size=count)
    lengths = np.clip(np.rint(drawn), round(REAL_LENGTHS["low"] * scale), round(REAL_LENGTHS["high"] * scale))
    rows = []
    for target in lengths.astype(int):
        question, response = _words(rng, 24, cost), _words(rng, 32, cost)
        budget = target - overhead - _tokens(question, cost) - _tokens(response, cost)
        cot = []
        while budget > 0 or len(cot) < 4:
            word = WORDS[rng.integers(len(WORDS))]
            cot.append(word)
            budget -= cost[word]
        rows.append({"Question": " ".join(question), "Complex_CoT": " ".join(cot), "Response": " ".join(response)})
    return rows


def _words(rng: np.random.Generator, count: int, cost: dict[str, int]) -> list[str]:
    return [WORDS[i] for i in rng.integers(len(WORDS), size=count)]


def _tokens(words: list[str], cost: dict[str, int]) -> int:
    return sum(cost[word] for word in words)


# ---------------------------------------------------------------------------------------------------- the run


def train_command(args: argparse.Namespace, data_path: Path, rows: int) -> list[str]:
    """`medray train` of the reference preset on the random model: `--steps` steps, then one evaluation and one
    checkpoint (eval_steps = steps), `--validation-rows` rows held out."""
    overrides = [
        f"model.name={args.model_dir}",
        f"data.path={data_path}",
        f"data.validation_fraction={args.validation_rows / rows!r}",
        f"train.max_steps={args.steps}",
        f"train.eval_steps={args.steps}",
        "train.logging_steps=10" if not args.cpu else "train.logging_steps=1",
        f"run.name=reference-{datetime.datetime.now():%H%M%S}",
        f"run.storage_path={args.storage}",
        *args.override,
    ]
    if args.cpu:
        overrides += ["model.backend=hf", "scaling.use_gpu=false", "train.optim=adamw_torch", "data.max_length=512"]
    return [sys.executable, "-m", "medray.cli", "train", "--config", "mistral7b-medical-o1", *overrides]


def measure(summary: dict[str, Any], history: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """The parts of one run, from its history: training steps, the evaluation, the checkpoint, the start-up."""
    train_logs = [entry for entry in history if "loss" in entry and "train_runtime_s" in entry]
    evals = [entry for entry in history if "eval_runtime" in entry]
    if not train_logs or not evals:
        raise RuntimeError(f"the run logged {len(train_logs)} training entries and {len(evals)} evaluations")
    at = {entry["step"]: entry["train_runtime_s"] for entry in train_logs}
    return _parts(at, float(summary["train_runtime_s"]), float(evals[0]["eval_runtime"]), wall_s)


def measure_log(output: str, wall_s: float) -> dict[str, Any]:
    """The parts of one run read from its console log (rank 0's progress lines, every `logging_steps`), for a run
    whose folder is gone (it stayed on a lent machine). Whole seconds: the evaluation's part also holds the
    checkpoint save that follows it within the same second, so `checkpoint_seconds` is 0."""
    at, evaluated = {}, None
    for step, kind, hours, minutes, seconds in PROGRESS.findall(output):
        elapsed = int(hours) * 3600 + int(minutes) * 60 + int(seconds)
        if kind == "loss":
            at[int(step)] = float(elapsed)
        elif evaluated is None:
            evaluated = float(elapsed)
    if len(at) < 2 or evaluated is None:
        raise RuntimeError(f"the log has {len(at)} training progress lines and no evaluation: not a finished run")
    return _parts(at, loop_s=evaluated, eval_s=evaluated - at[max(at)], wall_s=wall_s)


def _parts(at: dict[int, float], loop_s: float, eval_s: float, wall_s: float) -> dict[str, Any]:
    """The measured parts from the training loop's seconds at each logged step, the loop's and the evaluation's
    seconds, and the process wall time."""
    last = max(at)
    first = min(step for step in at if step >= min(20, last // 2)) if last > 1 else last
    step_s = (at[last] - at[first]) / (last - first) if last > first else at[last] / last
    checkpoint_s = max(0.0, loop_s - at[last] - eval_s)  # the save after the evaluation, and the best-model reload
    return {
        "measured_steps": last,
        "measured_seconds": round(at[last], 1),
        "step_seconds": round(step_s, 4),
        "warmup_extra_seconds": round(at[first] - first * step_s, 1),
        "eval_seconds": round(eval_s, 1),
        "checkpoint_seconds": round(checkpoint_s, 1),
        "loop_seconds": round(loop_s, 1),
        "wall_seconds": round(wall_s, 1),
        "startup_seconds": round(wall_s - loop_s, 1),
    }


def project(parts: dict[str, Any]) -> dict[str, Any]:
    """The full reference run from the measured parts, in minutes."""
    seconds = (
        parts["startup_seconds"]
        + parts["warmup_extra_seconds"]
        + FULL_RUN["steps"] * parts["step_seconds"]
        + FULL_RUN["evaluations"] * parts["eval_seconds"]
        + FULL_RUN["checkpoints"] * parts["checkpoint_seconds"]
    )
    return {"projected_minutes": round(seconds / 60, 1), "projection": dict(FULL_RUN)}


# ---------------------------------------------------------------------------------------------------- report


def reference_section(records: list[dict[str, Any]]) -> str | None:
    """docs/benchmarks.md's section for the newest reference-run record, or None when there is none."""
    found = [record for record in records if record["variant"] == REFERENCE_RUN]
    if not found:
        return None
    from medray.report import markdown_table

    record = found[-1]
    rows = [
        ["start-up and wrap-up (process wall time - training loop)", f"{record['startup_seconds']:,.0f} s", "1 x"],
        [
            f"training: {record['measured_steps']} steps of 16 rows",
            f"{record['measured_seconds']:,.0f} s ({record['step_seconds']:.3f} s/step steady, "
            f"+{record['warmup_extra_seconds']:.0f} s warm-up)",
            f"{FULL_RUN['steps']:,} steps",
        ],
        [
            f"evaluation of {record['eval_rows']:,} rows",
            f"{record['eval_seconds']:,.0f} s",
            f"{FULL_RUN['evaluations']} x",
        ],
        [
            "checkpoint (save + best-model reload)",
            f"{record['checkpoint_seconds']:,.1f} s",
            f"{FULL_RUN['checkpoints']} x",
        ],
        [
            "**full run, projected**",
            f"**{record['projected_minutes']} min**",
            f"floor {FLOOR_MINUTES}, goal {GOAL_MINUTES}",
        ],
    ]
    verdict = "pass" if record["projected_minutes"] <= FLOOR_MINUTES else "**FAIL**"
    lengths = record["row_lengths"]
    return "\n".join(
        [
            "## Reference run measured through `medray train` (1 GPU)",
            "",
            markdown_table(["part", "measured", "in the full run"], rows),
            "",
            f"- Floor (<= {FLOOR_MINUTES} min on one GPU): {verdict}. {record['gpu']}, {record['date']}, "
            f"batch {record['batch']} x {record['grad_accum']}, batch layout {record.get('batch_layout') or 'n/a'}; "
            f"rows: mean {lengths['mean']} tokens, p90 {lengths['p90']}, max {lengths['max']}.",
            f"- Unsloth printed 'Turning padding-free batching off': {record['padding_free_off_printed']}.",
            *([f"- Measured from {record['measured_from']}."] if record.get("measured_from") else []),
            f"- Command: `{record['command']}`",
        ]
    )


def reference_line(record: dict[str, Any]) -> str:
    """The stdout summary line of a reference-run record."""
    return (
        f"REFERENCE RUN projected {record['projected_minutes']} min (floor {FLOOR_MINUTES}): start-up "
        f"{record['startup_seconds']:.0f} s, {record['measured_steps']} steps {record['measured_seconds']:.0f} s "
        f"({record['step_seconds']:.3f} s/step), eval {record['eval_seconds']:.0f} s, checkpoint "
        f"{record['checkpoint_seconds']:.1f} s, layout {record.get('batch_layout')}, "
        f"padding-free-off line {record['padding_free_off_printed']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_log and args.wall_seconds is None:
        parser.error("--from-log needs --wall-seconds: the wall time of that `medray train` process")
    tokenizer = load_tokenizer_source(args.model_dir)
    rows_needed = args.steps * 16 + 16 + args.validation_rows  # one spare step of training rows
    rows = make_rows(tokenizer, rows_needed, args.seed, scale=512 / 2048 if args.cpu else 1.0)
    if args.from_log:
        output = Path(args.from_log).read_text()
        parts = measure_log(output, args.wall_seconds)
        run = {**_log_facts(output), "versions": _versions_of(args.versions_from)}
        run["measured_from"] = (
            f"its console log (`{args.from_log}`: rank 0's progress lines, whole seconds; the checkpoint save falls in "
            f"the evaluation's second) and the process wall time measured by the call, {args.wall_seconds:.0f} s"
        )
    else:
        output, wall_s, summary_path = _train(args, tokenizer, rows)
        if summary_path is None:
            return 1
        summary = json.loads(summary_path.read_text())
        parts = measure(summary, json.loads((summary_path.parent / "history.json").read_text()), wall_s)
        run = {
            "batch_layout": summary.get("batch_layout"),
            "rows_train": summary["data"]["rows_train"],
            "eval_rows": summary["data"]["rows_validation"],
            "gpu": _gpu_name(),
            "versions": versions(),
        }
    record = {
        "name": "reference run through `medray train`, projected",
        "variant": REFERENCE_RUN,
        "gpus": 1,
        "batch": 4,
        "grad_accum": 4,
        **parts,
        **project(parts),
        **run,
        "row_lengths": length_stats(len(tokenizer(_text(row, tokenizer))["input_ids"]) for row in rows[:500]),
        "padding_free_off_printed": PADDING_FREE_OFF in output,
        "date": args.date or datetime.date.today().isoformat(),
        "command": "python benchmarks/reference_run.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    print("RESULT", json.dumps(record), flush=True)
    if args.json:
        append_record(args.json, record)
    return 0


def _train(args: argparse.Namespace, tokenizer, rows: list[dict[str, str]]) -> tuple[str, float, Path | None]:
    """Write the rows, run `medray train` with its output streamed into `--log`; the output, the process wall time
    and the run's summary.json (None when the run failed)."""
    data_path = Path(args.storage) / "reference_rows.jsonl"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    command = train_command(args, data_path, len(rows))
    print("RUN", shlex.join(command), flush=True)
    started = time.perf_counter()
    # The output streams into the log as it comes: a run stopped by a time limit still shows how far it got.
    with open(args.log, "w") as log:
        done = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    wall_s = time.perf_counter() - started
    output = Path(args.log).read_text()
    if done.returncode != 0:
        print(f"medray train failed (exit {done.returncode}); its output is in {args.log}", file=sys.stderr)
        return output, wall_s, None
    summary_line = [line for line in output.splitlines() if line.startswith("summary:")][-1]
    return output, wall_s, Path(summary_line.split()[-1])


def _log_facts(output: str) -> dict[str, Any]:
    """What the run's closing lines say: its rows and the GPU ("Rows: N training, M validation", "Ran with: ... on
    GPU, ...")."""
    rows = re.search(r"^Rows: (\d+) training, (\d+) validation", output, re.MULTILINE)
    ran = re.search(r"^Ran with: \S+ on ([^,]+),", output, re.MULTILINE)
    if rows is None or ran is None:
        raise RuntimeError("the log has no 'Rows:' or 'Ran with:' line: the run did not finish")
    return {"batch_layout": None, "rows_train": int(rows[1]), "eval_rows": int(rows[2]), "gpu": ran[1]}


def _versions_of(records_file: str | None) -> dict[str, Any] | None:
    """The library versions of the newest record in a benchmarks JSON written on the same machine and image."""
    if not records_file:
        return None
    return json.loads(Path(records_file).read_text())[-1]["versions"]


def _text(row: dict[str, str], tokenizer) -> str:
    """The training text medray makes of a row (the default template, EOS appended)."""
    return format_sample(row["Question"], row["Complex_CoT"], row["Response"], DEFAULT_TEMPLATE, tokenizer.eos_token)


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/reference_run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", default="/tmp/m7b", help="the 7B-shape random model (jobs/benchmark.py --build)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of 16 rows before the evaluation")
    parser.add_argument("--json", default=None, help="append the record to this JSON list")
    parser.add_argument("--log", default="/tmp/reference_run.log", help="the medray train output")
    parser.add_argument("--storage", default="/tmp/medray_reference", help="run.storage_path and the rows file")
    parser.add_argument("--validation-rows", type=int, default=VALIDATION_ROWS, help="rows of the one evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="CPU dry run of the plumbing: a tiny model, hf backend")
    parser.add_argument("--from-log", help="measure from the console log of an earlier run (its folder is gone)")
    parser.add_argument("--wall-seconds", type=float, help="with --from-log: that process's wall time")
    parser.add_argument("--versions-from", help="with --from-log: a benchmarks JSON from the same image (versions)")
    parser.add_argument("--date", help="with --from-log: the day of that run (default today)")
    parser.add_argument("override", nargs="*", help="more medray key=value overrides")
    return parser


if __name__ == "__main__":
    sys.exit(main())
