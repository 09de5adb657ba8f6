"""Builds and runs the Ray Train `TorchTrainer` for one fine-tuning run, then writes the run's summary and report.

Everything that can fail on bad input (config, tokenizer, data) is checked here on the driver, before any worker
(and any GPU) is reserved. The driver holds no data and no model: the datasets live in Ray's object store and the
workers stream their shards.

    outcome = run_training(load_config("jobs/configs/cpu-demo.yaml"))
    print(outcome.summary_path)
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from medray.config import MedrayConfig
from medray.worker import train_loop_per_worker

logger = logging.getLogger(__name__)

# The trained model's answer to this prompt is recorded; the saved adapter must reproduce it (see summary "probe").
PROBE_TEXT = "### Question:\nA 58-year-old man has crushing chest pain and ST elevation in II, III and aVF."


@dataclass
class TrainOutcome:
    """What a finished run left behind."""

    run_dir: str
    summary_path: str
    summary: dict[str, Any]
    result: Any


def storage_path(cfg: MedrayConfig) -> str:
    """`run.storage_path` as Ray wants it: an absolute local path or a URI."""
    if "://" in cfg.run.storage_path:
        return cfg.run.storage_path
    return str(Path(cfg.run.storage_path).expanduser().resolve())


def planned_steps(cfg: MedrayConfig, train_rows: int) -> int:
    """Optimizer steps of the run: `train.max_steps`, or whole optimizer steps in `num_epochs` over the split.

    Every worker gets `train_rows // num_workers` rows and drops its last partial micro-batch, so one epoch is
    `rows_per_worker // batch // grad_accum` steps: 17,733 rows at 4 x 4 on one worker give 1,108 steps.
    """
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    rows_per_worker = train_rows // cfg.scaling.num_workers
    micro_batches = int(rows_per_worker * cfg.train.num_epochs) // cfg.train.per_device_batch_size
    steps = micro_batches // cfg.train.gradient_accumulation_steps
    if steps < 1:
        raise ValueError(
            f"{train_rows} training rows give no full optimizer step with {cfg.scaling.num_workers} worker(s) x "
            f"batch {cfg.train.per_device_batch_size} x grad-accum {cfg.train.gradient_accumulation_steps}; "
            "use more data, fewer workers, or a smaller batch"
        )
    return steps


def prepare_data(cfg: MedrayConfig):
    """Load the tokenizer and build the tokenized Ray datasets (fails fast on bad data)."""
    from medray.data import build_datasets
    from medray.model import load_tokenizer

    # Job logs are read by people: keep Ray Data's per-operator progress logging out of them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg, tokenizer)
    data.probe_input_ids = tokenizer(PROBE_TEXT)["input_ids"]
    return data


def build_trainer(cfg: MedrayConfig, data, *, trial: str | None = None, callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer for `cfg`, fed by `data` (a `medray.data.PreparedData`)."""
    run_dir = Path(storage_path(cfg)) / cfg.run.name
    has_validation = data.validation is not None
    plan = {
        "max_steps": planned_steps(cfg, data.stats["rows_train"]),
        "has_validation": has_validation,
        "run_id": f"{cfg.run.name}-{uuid.uuid4().hex[:8]}",
        "trial": trial,
        "tensorboard_dir": None if "://" in str(run_dir) else str(run_dir / "tensorboard"),
        "probe_input_ids": getattr(data, "probe_input_ids", None),
    }
    datasets = {"train": data.train}
    if has_validation:
        datasets["validation"] = data.validation
    scaling = ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        placement_strategy=cfg.scaling.placement_strategy,
    )
    checkpoints = CheckpointConfig(
        num_to_keep=cfg.run.checkpoints_to_keep,
        checkpoint_score_attribute="eval_loss" if has_validation else None,
        checkpoint_score_order="min",
    )
    run_config = RunConfig(
        name=cfg.run.name,
        storage_path=storage_path(cfg),
        checkpoint_config=checkpoints,
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        callbacks=callbacks,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"medray": cfg.to_dict(), "plan": plan},
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
    )


def run_training(cfg: MedrayConfig, *, trial: str | None = None, callbacks: list | None = None) -> TrainOutcome:
    """Validate inputs, train under Ray Train, write `summary.json`, `history.json` and the report."""
    started = time.time()
    if not ray.is_initialized():
        ray.init()
    data = prepare_data(cfg)
    trainer = build_trainer(cfg, data, trial=trial, callbacks=callbacks)
    result = trainer.fit()
    outcome = write_outcome(cfg, data.stats, result, wall_time_s=time.time() - started)
    return outcome


def write_outcome(cfg: MedrayConfig, data_stats: dict, result, *, wall_time_s: float) -> TrainOutcome:
    """Write `history.json`, `summary.json` and the report into the run folder."""
    returned = result.return_value or {}
    history = returned.get("log_history", [])
    run_dir = Path(result.path)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    summary = {
        "config": cfg.to_dict(),
        "data": data_stats,
        "metrics": {"final": _final_metrics(history), "best": _best_metrics(result)},
        "best_checkpoint": _best_checkpoint_path(result),
        "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "steps": returned.get("global_step"),
        "best_step": returned.get("best_step"),
        "resumed_from_step": returned.get("resumed_from_step"),
        "backend": returned.get("backend"),
        "world_size": returned.get("world_size"),
        "node_ids": returned.get("node_ids"),
        "train_runtime_s": returned.get("train_runtime_s"),
        "train_data_passes": returned.get("train_data_passes"),
        "probe": returned.get("probe"),
        "wall_time_s": round(wall_time_s, 2),
    }
    summary_path = run_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    summary["report"] = _write_report(run_dir)
    summary_path.write_text(json.dumps(summary, indent=2))
    return TrainOutcome(run_dir=str(run_dir), summary_path=str(summary_path), summary=summary, result=result)


def _final_metrics(history: list[dict]) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for entry in history:
        final.update(entry)
    return final


def _best_metrics(result) -> dict[str, Any]:
    best = _best_checkpoint(result)
    return dict(best[1]) if best else {}


def _best_checkpoint(result):
    scored = [(ckpt, metrics) for ckpt, metrics in (result.best_checkpoints or []) if "eval_loss" in metrics]
    if scored:
        return min(scored, key=lambda item: item[1]["eval_loss"])
    return (result.checkpoint, {}) if result.checkpoint else None


def _best_checkpoint_path(result) -> str | None:
    best = _best_checkpoint(result)
    return f"{best[0].path}/checkpoint" if best else None


def _write_report(run_dir: Path) -> str | None:
    from medray.report import write_report

    try:
        return str(write_report(run_dir))
    except Exception as error:  # the summary is already on disk; a broken plot must not lose it
        logger.warning("could not write the report for %s: %s", run_dir, error)
        return None
