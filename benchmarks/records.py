"""One benchmark run's JSON record: throughput, MFU, memory and the per-step log, and the JSON list it goes to."""

from __future__ import annotations

import argparse
import datetime
import fcntl
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.steptimer import step_table, summarize
from benchmarks.workload import count_parameters, length_stats, row_lengths

VARIANTS = {
    "medray": "(a) medray: Ray Train worker, unsloth backend",
    "bare": "(b) bare Unsloth + TRL, no Ray",
    "peft": "(c) transformers + peft + bitsandbytes, gradient checkpointing",
}
VERSIONED = ["torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "ray", "bitsandbytes", "datasets"]


def make_record(
    args: argparse.Namespace, per_rank: list[tuple[list, float | None]], peak: dict[str, Any], extra: dict
) -> dict[str, Any]:
    """One JSON record from each rank's step records and peak reserved memory (rank order) and the matmul peak."""
    summaries = [summarize(records, args.warmup) for records, _ in per_rank]
    first = summaries[0]
    rates = [summary["tokens_per_s"] for summary in summaries]
    per_gpu = sum(rates) / len(rates) if None not in rates else None
    peaks = [peak for _, peak in per_rank if peak is not None]
    n_params = count_parameters(json.loads((Path(args.model_dir) / "config.json").read_text()))
    record = {
        "name": record_name(args),
        "variant": args.variant,
        "gpus": args.gpus,
        "batch": args.batch,
        "grad_accum": args.grad_accum,
        "lengths": args.lengths,
        "seq_len": args.seq_len,
        "tokens_per_s_per_gpu": _round(per_gpu, 1),
        "tokens_per_s_total": _round(sum(rates), 1) if per_gpu is not None else None,
        "tokens_per_s_steady": _round(first["tokens_per_s_steady"], 1),
        "peak_reserved_gb": round(max(peaks), 2) if peaks else None,
        "mfu": _round(6 * n_params * per_gpu / (peak["tflops"] * 1e12), 4) if per_gpu and peak["tflops"] else None,
        "s_per_step": round(first["s_per_step_mean"], 4),
        "s_per_step_min": round(first["s_per_step_min"], 4),
        "s_per_step_max": round(first["s_per_step_max"], 4),
        "steps_timed": first["steps_timed"],
        "warmup": args.warmup,
        "tokens_timed": first["tokens_timed"],
        "new_graphs_timed": first["new_graphs"],
        "loop_s": round(first["loop_s"], 2),
        "warmup_extra_s": _round(_warmup_extra_s(per_rank[0][0], args.warmup, first["tokens_per_s"]), 2),
        "knobs": knobs(args),
        "row_lengths": length_stats(make_row_lengths(args)),
        "n_params": n_params,
        "peak_tflops": peak["tflops"],
        "date": datetime.date.today().isoformat(),
        "gpu": peak["gpu"],
        "versions": versions(),
        "command": args.command,
        "per_rank": [
            {"rank": rank, "tokens_per_s": _round(summary["tokens_per_s"], 1), "peak_reserved_gb": _round(gb, 2)}
            for rank, (summary, (_, gb)) in enumerate(zip(summaries, per_rank, strict=True))
        ],
        "steps": step_table(per_rank[0][0]),
    }
    record.update(extra)
    return record


def record_name(args: argparse.Namespace) -> str:
    """`(a) medray: ..., 2 GPUs` and the like."""
    if args.variant != "medray":
        return VARIANTS[args.variant]
    return f"{VARIANTS[args.variant]}, {args.gpus} GPU" + ("s" if args.gpus > 1 else "")


def make_row_lengths(args: argparse.Namespace) -> np.ndarray:
    """The lengths of the rows a run drew (same seed and count as the run)."""
    return row_lengths(rows_needed(args), args.lengths, args.seq_len, np.random.default_rng(args.seed))


def total_steps(args: argparse.Namespace) -> int:
    """Optimizer steps to run: the timed ones, plus one profiled step after them with `--profile`."""
    return args.steps + (1 if args.profile else 0)


def rows_needed(args: argparse.Namespace) -> int:
    """Rows for every step on every GPU, plus two steps' worth so no loader wraps around."""
    return args.batch * args.grad_accum * args.gpus * (total_steps(args) + 2)


def _warmup_extra_s(records: list[dict], warmup: int, rate: float | None) -> float | None:
    """Seconds the warm-up steps took beyond their tokens at the timed rate: first-step compiles and allocations."""
    if not rate or warmup == 0 or any(record.get("tokens") is None for record in records[:warmup]):
        return None
    seconds = records[warmup - 1]["t_end"] - records[0]["t_start"]
    return seconds - sum(record["tokens"] for record in records[:warmup]) / rate


def knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The real-length knobs of a run, as recorded (defaults included, so records compare)."""
    return {
        "padding": args.padding,
        "sort_lengths": args.sort_lengths,
        "pad_multiple": args.pad_multiple,
        "env": dict(args.env),
        "profile": args.profile,
    }


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that set the figures."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append `record` to the JSON list at `path` (created if missing); safe for runs finishing at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else []
        records.append(record)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(records, indent=1) + "\n")
        os.replace(temporary, path)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
