"""`medray evaluate`: the base model and the tuned adapter(s) of a run, scored on the same questions, one table.

Benchmarks (each a key of the run's `summary.json` `evaluation` section):
- `validation`: the run's own held-out split, rebuilt from its config (the split is seeded): loss and perplexity;
- `medqa_loglik`: MedQA-USMLE 4-option by option log-likelihood (lm-evaluation-harness `medqa_4options`);
- `medqa_generation`: the same questions asked with the run's template, the letter read after `</think>`.
Accuracy comes with a 95 % Wilson interval and the share of answers that named no option.

The work runs as Ray Data `map_batches` over an actor pool: each actor holds one model replica (one GPU, or
`cpus_per_replica` CPUs) with every adapter loaded, and scores each batch with the base model (adapters off) and
with each adapter. Per-question records go to `evaluation_records.parquet` beside `summary.json`; the job log shows
questions done / total and the ETA. Everything that can fail on bad input (run folder, adapters, MedQA rows) is
checked on the driver before Ray starts an actor.

    outcome = evaluate_run("~/medray_results/medray-demo", EvalArgs(medqa="medqa.jsonl", limit=50))
    outcome.evaluation["medqa_loglik"]["models"]["tuned"]["accuracy"]
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medray.config import EvalArgs, MedrayConfig
from medray.inference import RunArtifacts, resolve_run
from medray.medqa import MedqaQuestion, read_medqa
from medray.scoring import Record, accuracy_summary

logger = logging.getLogger(__name__)

BASE = "base"
TUNED = "tuned"
RECORDS_FILE = "evaluation_records.parquet"
PROGRESS_EVERY_S = 5.0


class EvaluationError(ValueError):
    """A run or benchmark that cannot be evaluated; the message says which and what to do. (A missing adapter or base
    model is `medray.inference.InferenceError`.)"""


@dataclass
class EvaluationOutcome:
    run_dir: str
    summary_path: str
    records_path: str | None
    evaluation: dict[str, Any]
    """Benchmark name -> results (what `summary.json` holds under `evaluation`)."""


# --- inputs, checked on the driver -------------------------------------------------------------------------------


def read_run(run_dir: str | Path) -> tuple[RunArtifacts, MedrayConfig]:
    """The run (its adapter and base model checked, nothing loaded) and its config; errors on bad input."""
    run = resolve_run(run_dir)
    if run.run_dir is None:
        raise EvaluationError(
            f"{run_dir} is an adapter outside a run folder; pass the run folder (holding summary.json), where the "
            "results go, and this adapter with --adapter NAME=PATH"
        )
    return run, run.config


def adapter_folders(run: RunArtifacts, extra: list[str] | None = None) -> dict[str, str]:
    """Name -> adapter folder: `tuned` (the run's best checkpoint) and every `--adapter [NAME=]PATH`.

    A PATH may be an adapter folder or another run folder (its best checkpoint); it must share the run's base model.
    """
    adapters = {TUNED: str(run.adapter_dir)}
    for spec in extra or []:
        name, _, path = spec.rpartition("=")
        other = resolve_run(path)
        if other.base_model != run.base_model:
            raise EvaluationError(
                f"--adapter {spec}: trained on {other.base_model}, but the run's base model is {run.base_model}; "
                "adapters are compared on the same base model"
            )
        name = name or (other.run_dir.name if other.run_dir else other.adapter_dir.name)
        if name in adapters or name == BASE:
            raise EvaluationError(f"--adapter {spec}: the name {name!r} is taken; name it with NAME=PATH")
        adapters[name] = str(other.adapter_dir)
    return adapters


# --- the evaluation ------------------------------------------------------------------------------------------------


def evaluate_run(
    run_dir: str | Path, eval_args: EvalArgs | None = None, adapters: list[str] | None = None
) -> EvaluationOutcome:
    """Score the base model and the run's adapter(s); write the records, `summary.json` `evaluation` and the report.

    Args:
        run_dir: A finished run's folder (holding `summary.json`).
        eval_args: What to score and how; default: the run's own `eval` section.
        adapters: Extra adapters, `[NAME=]PATH` (adapter or run folders), scored beside `tuned`.

    Returns:
        Where the results went, and the `evaluation` section.

    Raises:
        EvaluationError, MedqaError: On bad input, before any model is loaded.
    """
    run, cfg = read_run(run_dir)
    folder = run.run_dir
    args = eval_args or cfg.eval
    variants = adapter_folders(run, adapters)
    questions = read_medqa(args.medqa, args.limit) if args.medqa else []
    if not questions and not args.validation:
        raise EvaluationError("nothing to evaluate: pass --medqa FILE.jsonl, or keep the held-out validation split")
    if args.validation and cfg.data.validation_fraction == 0:
        raise EvaluationError(
            f"{folder} was trained with data.validation_fraction=0: it has no held-out split; pass --no-validation"
        )

    import ray

    if not ray.is_initialized():
        ray.init()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # One batch of generations can legitimately outlast Ray Data's no-progress limit (30 min): 16 answers of 256
    # tokens from a 7B model on CPU, or any model on a busy machine. medray's own progress line shows the pace.
    context.execution_no_progress_timeout_s = -1
    replica = ReplicaSpec.from_config(run, args, variants)
    validation = validation_rows(cfg) if args.validation else []
    started = time.time()
    outputs = run_pool(replica, questions, validation)
    wall_s = time.time() - started
    evaluation: dict[str, Any] = {}
    if validation:
        evaluation["validation"] = validation_results(outputs["validation"], replica, len(validation))
    records_path = None
    if questions:
        order = {question.id: index for index, question in enumerate(questions)}
        records = sorted((Record(**row) for row in outputs["medqa"]), key=lambda record: order[record.question_id])
        records_path = write_records(records, folder / RECORDS_FILE)
        evaluation.update(medqa_results(records, replica, args, str(records_path), wall_s))
    summary_path = write_evaluation(folder, evaluation)
    return EvaluationOutcome(str(folder), str(summary_path), str(records_path) if records_path else None, evaluation)


@dataclass
class ReplicaSpec:
    """What every actor needs to load its replica, and the pool's size (crosses to Ray as a plain dict)."""

    run_dir: str
    adapters: dict[str, str]
    """Variant name -> adapter folder (`tuned` is the run's own)."""
    generation: bool
    max_new_tokens: int
    batch_size: int
    replicas: int
    use_gpu: bool
    cpus: float

    @classmethod
    def from_config(cls, run: RunArtifacts, args: EvalArgs, adapters: dict[str, str]) -> ReplicaSpec:
        cfg = run.config
        return cls(
            run_dir=str(run.run_dir),
            adapters=adapters,
            generation=args.generation,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            replicas=args.replicas or cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu if args.use_gpu is None else args.use_gpu,
            cpus=args.cpus_per_replica or cfg.scaling.cpus_per_worker,
        )

    @property
    def variants(self) -> list[str]:
        return [BASE, *self.adapters]

    def outputs_per_item(self, task: str) -> int:
        """Output rows per input row: one per variant, and per method for MedQA."""
        return len(self.variants) * (2 if task == "medqa" and self.generation else 1)


def validation_rows(cfg: MedrayConfig) -> list[dict[str, list[int]]]:
    """`input_ids` and `labels` of the run's held-out split, rebuilt from its config (the split is seeded)."""
    from medray.driver import prepare_data

    validation = prepare_data(cfg).validation
    return [
        {"input_ids": list(map(int, row["input_ids"])), "labels": list(map(int, row["labels"]))}
        for row in validation.iter_rows()
    ]


def run_pool(
    replica: ReplicaSpec, questions: list[MedqaQuestion], validation: list[dict[str, list[int]]]
) -> dict[str, list[dict[str, Any]]]:
    """Score the questions and validation rows with Ray Data `map_batches` over an actor pool of model replicas.

    Rows cross to the actors and back as JSON text in a `payload` column beside their `task`, so questions and
    token rows share one pool and every replica loads its model once. Prints a progress line every few seconds.

    Returns:
        Task (`medqa`, `validation`) -> the actors' output rows.
    """
    import ray

    from medray.evaluate_replica import EvalReplica

    items = [{"task": "validation", "payload": json.dumps(row)} for row in validation]
    items += [{"task": "medqa", "payload": json.dumps(question.to_row())} for question in questions]
    blocks = max(replica.replicas, math.ceil(len(items) / replica.batch_size))
    scored = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        EvalReplica,
        fn_constructor_kwargs={"spec": replica.__dict__},
        batch_size=replica.batch_size,
        batch_format="pandas",
        concurrency=replica.replicas,
        num_cpus=replica.cpus,
        num_gpus=1 if replica.use_gpu else 0,
    )
    totals = {"medqa": len(questions), "validation": len(validation)}
    outputs: dict[str, list[dict[str, Any]]] = {"medqa": [], "validation": []}
    started = last = time.time()
    for batch in scored.iter_batches(batch_size=None, batch_format="pandas"):
        for task, payload in zip(batch["task"], batch["payload"], strict=True):
            outputs[task].append(json.loads(payload))
        done = {task: len(rows) // replica.outputs_per_item(task) for task, rows in outputs.items()}
        now = time.time()
        if now - last >= PROGRESS_EVERY_S or done == totals:
            print(progress_line(done, totals, now - started), file=sys.stderr, flush=True)
            last = now
    return outputs


def progress_line(done: dict[str, int], totals: dict[str, int], elapsed: float) -> str:
    """`[medray] evaluate: 40/300 questions, 20/20 validation rows (19%) | 0.63 items/s | elapsed 0:01:17 | ETA ...`."""
    from medray.metrics import _clock

    finished, total = sum(done.values()), sum(totals.values())
    units = {"medqa": "questions", "validation": "validation rows"}
    counts = ", ".join(f"{done[task]}/{totals[task]} {units[task]}" for task in totals if totals[task])
    rate = finished / elapsed if elapsed > 0 else 0.0
    parts = [f"evaluate: {counts} ({100 * finished / max(1, total):.0f}%)", f"{rate:.2f} items/s"]
    parts.append(f"elapsed {_clock(elapsed)}")
    if 0 < finished < total:
        parts.append(f"ETA {_clock((total - finished) / rate)}")
    return "[medray] " + " | ".join(parts)


# --- results -------------------------------------------------------------------------------------------------------


def validation_results(rows: list[dict[str, Any]], replica: ReplicaSpec, count: int) -> dict[str, Any]:
    """Loss (mean per predicted token, as in training) and perplexity of every variant on the held-out split."""
    models = {}
    for variant in replica.variants:
        mine = [row for row in rows if row["model"] == variant]
        loss = sum(row["nll"] for row in mine) / sum(row["tokens"] for row in mine)
        models[variant] = {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 3)}
    tokens = sum(row["tokens"] for row in rows if row["model"] == BASE)
    return {"rows": count, "tokens": tokens, "models": models}


def medqa_results(
    records: list[Record], replica: ReplicaSpec, args: EvalArgs, records_path: str, wall_s: float
) -> dict[str, Any]:
    """The `medqa_loglik` and `medqa_generation` benchmark entries of the `evaluation` section.

    `questions_per_s` is the whole pass's rate (every variant, both methods, all replicas); `model_seconds` is the
    time the replicas spent on this method."""
    results = {}
    for method in ("loglik", "generation"):
        chosen = [record for record in records if record.method == method]
        if not chosen:
            continue
        models = {}
        for variant in replica.variants:
            mine = [record for record in chosen if record.model == variant]
            models[variant] = accuracy_summary(mine)
            if method == "generation":
                models[variant].update(_generation_figures(mine))
            else:  # the highest-scoring option is always a letter
                del models[variant]["unparsable"], models[variant]["unparsable_share"]
        questions = len({record.question_id for record in chosen})
        results[f"medqa_{method}"] = {
            "source": str(args.medqa),
            "questions": questions,
            "models": models,
            "model_seconds": round(sum(record.seconds for record in chosen), 2),
            "wall_s": round(wall_s, 2),
            "questions_per_s": round(questions / wall_s, 3),
            "replicas": replica.replicas,
            "device": "cuda" if replica.use_gpu else "cpu",
            "records": records_path,
            **({"max_new_tokens": replica.max_new_tokens} if method == "generation" else {}),
        }
    return results


def _generation_figures(records: list[Record]) -> dict[str, float]:
    total = max(1, len(records))
    return {
        "mean_new_tokens": round(sum(record.new_tokens for record in records) / total, 1),
        "think_closed_share": sum(record.think_closed for record in records) / total,
        "stopped_at_eos_share": sum(record.stopped_at_eos for record in records) / total,
    }


def write_records(records: list[Record], path: Path) -> Path:
    """The per-question records as one Parquet file."""
    import pandas as pd

    pd.DataFrame([record.to_row() for record in records]).to_parquet(path, index=False)
    return path


def print_evaluation(evaluation: dict[str, Any]) -> None:
    """The comparison table, and the MedQA pass's rate, on stdout."""
    from medray.report import model_quality_table

    print(model_quality_table(evaluation), flush=True)
    for name in ("medqa_loglik", "medqa_generation"):
        entry = evaluation.get(name)
        if entry:
            print(
                f"{name}: {entry['questions']} questions x {len(entry['models'])} models in {entry['wall_s']:.1f} s "
                f"({entry['questions_per_s']:.2f} questions/s, {entry['replicas']} {entry['device']} replica(s))",
                flush=True,
            )
            break


def write_evaluation(run_dir: Path, evaluation: dict[str, Any]) -> Path:
    """Merge `evaluation` into `summary.json`, keeping the other benchmarks already there; rewrite the report."""
    from medray.contracts import read_summary
    from medray.report import write_report

    summary_path = run_dir / "summary.json"
    summary = read_summary(summary_path)
    summary.evaluation = {**(summary.evaluation or {}), **evaluation}
    summary.to_json(summary_path)
    write_report(run_dir)
    return summary_path
