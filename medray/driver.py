"""Builds and runs the Ray Train `TorchTrainer` for one fine-tuning run, then writes the run's summary and report.

Everything that can fail on bad input (config, tokenizer, data) is checked here on the driver, before any worker
(and any GPU) is reserved. The driver holds no data and no model: the datasets live in Ray's object store and the
workers stream their shards.

    outcome = run_training(load_config("cpu-demo"))
    print(outcome.summary_path)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

from medray import console, preflight, storage, tracking
from medray.config import MedrayConfig
from medray.contracts import RunSummary, WorkerPlan, WorkerResult
from medray.failures import RunFailedError, describe_failure
from medray.report import write_report_or_warn
from medray.runfolder import (
    inspect_run_folder,
    registered_checkpoints,
    remove_unregistered_checkpoints,
    save_run_config,
)
from medray.runlock import RunLock
from medray.scratch import new_run_id, remove_run_scratch, remove_stale_scratch
from medray.worker import train_loop_per_worker

logger = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What a finished run left behind."""

    run_dir: str
    summary_path: str
    summary: RunSummary
    result: Any
    """Ray Train's `Result`; its `return_value` is rank 0's `WorkerResult`."""


def storage_path(cfg: MedrayConfig) -> str:
    """`run.storage_path` as Ray wants it: an absolute local path or a URI."""
    return storage.resolve(cfg.run.storage_path)


def run_uri(cfg: MedrayConfig) -> str:
    """The run folder, `{run.storage_path}/{run.name}`: a local path or a URI."""
    return storage.join(storage_path(cfg), cfg.run.name)


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
    return build_datasets(cfg, tokenizer)


def build_trainer(
    cfg: MedrayConfig,
    data,
    *,
    trial: str | None = None,
    callbacks: list | None = None,
    extensions: list[str] | None = None,
    extension_options: dict[str, Any] | None = None,
    tracked: dict[str, Any] | None = None,
) -> TorchTrainer:
    """The TorchTrainer for `cfg`, fed by `data` (a `medray.data.PreparedData`); `tracked` is the trackers' plan
    (`medray.tracking.worker_plan`), made here when not given.

    `extensions` and `extension_options` go to the workers in the `WorkerPlan` (see `medray.worker.WorkerContext`):
    the benchmark and the tests attach their step timer and fingerprint this way.
    """
    has_validation = data.validation is not None
    plan = WorkerPlan(
        run_id=new_run_id(cfg.run.name, f"{storage_path(cfg).rstrip('/')}/{cfg.run.name}"),
        max_steps=planned_steps(cfg, data.stats["rows_train"]),
        has_validation=has_validation,
        trial=trial,
        tracking=tracked or tracking.worker_plan(cfg, run_uri(cfg), trial=trial),
        extensions=list(extensions or []),
        extension_options=dict(extension_options or {}),
        verbose=console.is_verbose(),
    )
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
        logging_config=console.train_logging_config(),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"medray": cfg.to_dict(), "plan": plan.to_dict()},
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
    )


def run_training(
    cfg: MedrayConfig,
    *,
    trial: str | None = None,
    callbacks: list | None = None,
    extensions: list[str] | None = None,
    extension_options: dict[str, Any] | None = None,
) -> TrainOutcome:
    """Validate inputs, train under Ray Train, write `summary.json`, `history.json` and the report.

    Storage, model and cluster are checked before the data is prepared, the batches after; the run folder is
    locked for the whole run (`medray.runlock`), and `run.resume` is applied to it (`medray.runfolder`). A run
    folder whose run already finished is returned as it is, without training.
    """
    started = time.time()
    started = time.time()
    tracking.check(cfg)
    root = storage_path(cfg)
    preflight.check_storage(root)
    preflight.check_model(cfg.model)
    start_ray()
    preflight.check_cluster(cfg.scaling)
    with RunLock(root, cfg.run.name):
        folder = inspect_run_folder(cfg, root)
        if folder.finished_summary is not None:
            return _finished_outcome(folder)
        remove_stale_scratch(cfg.run.name, folder.run_dir)
        data = prepare_data(cfg)
        preflight.check_batches(cfg, data.stats)
        save_run_config(cfg, folder.run_dir)
        tracked = tracking.worker_plan(cfg, run_uri(cfg), trial=trial)
        tracking.start_mlflow_run(cfg, tracked)
        trainer = build_trainer(
            cfg,
            data,
            trial=trial,
            callbacks=callbacks,
            extensions=extensions,
            extension_options=extension_options,
            tracked=tracked,
        )
        try:
            result = _fit(trainer, cfg, folder.run_dir)
        except BaseException:
            tracking.end_mlflow_run(tracked, "FAILED")
            raise
        outcome = write_outcome(cfg, data.stats, result, wall_time_s=time.time() - started)
        tracking.finish_mlflow_run(tracked, storage.StorageFolder.of(outcome.run_dir), outcome.summary)
        return outcome


def _fit(trainer: TorchTrainer, cfg: MedrayConfig, run_dir: str):
    """`trainer.fit()`; a failure becomes one `RunFailedError` line; the run's local scratch goes either way."""
    try:
        return trainer.fit()
    except (TrainingFailedError, ray.exceptions.RayError) as error:
        fs, folder = pafs.FileSystem.from_uri(run_dir)
        remove_unregistered_checkpoints(fs, folder, registered_checkpoints(fs, folder))
        message = describe_failure(error, run_dir=run_dir, max_failures=cfg.run.max_failures)
        raise RunFailedError(message) from error
    finally:
        remove_run_scratch(trainer.train_loop_config["plan"]["run_id"])


def _finished_outcome(folder) -> TrainOutcome:
    summary = RunSummary.from_dict(folder.finished_summary)
    summary_path = f"{folder.run_dir}/summary.json"
    logger.warning(
        "run %s already finished (step %s); not training it again. Its summary: %s. For a new run pick another "
        "run.name or set run.resume=never; for a longer one raise train.max_steps or train.num_epochs",
        folder.run_dir,
        summary.steps,
        summary_path,
    )
    return TrainOutcome(run_dir=folder.run_dir, summary_path=summary_path, summary=summary, result=None)


def start_ray() -> None:
    """Start a local Ray cluster (or join the one `RAY_ADDRESS` names) unless this process is connected already."""
    if ray.is_initialized():
        return
    context = ray.init(**console.ray_init_options())
    console.say(f"Ray {ray.__version__}: dashboard {context.dashboard_url or 'not running'}")


def write_outcome(cfg: MedrayConfig, data_stats: dict, result, *, wall_time_s: float) -> TrainOutcome:
    """Write `history.json`, `summary.json` and the report into the run folder (local or object storage)."""
    returned: WorkerResult = result.return_value or WorkerResult()
    history = returned.log_history
    folder = storage.StorageFolder.of(run_uri(cfg))
    summary = RunSummary(
        config=cfg.to_dict(),
        data=data_stats,
        metrics={"final": _final_metrics(history), "best": _best_metrics(result)},
        best_checkpoint=_best_checkpoint_path(result, folder),
        latest_checkpoint=folder.uri_of(result.checkpoint.path) if result.checkpoint else None,
        steps=returned.global_step,
        best_step=returned.best_step,
        resumed_from_step=returned.resumed_from_step,
        backend=returned.backend,
        batch_layout=returned.batch_layout,
        world_size=returned.world_size,
        node_ids=returned.node_ids,
        effective=returned.effective,
    )
    with folder.staged() as local:  # the run folder itself, or a local copy uploaded when the block ends
        # A local folder holds the previous part's summary.json; in object storage earlier parts come from the history.
        summary.parts = run_parts(local / "summary.json", history, returned, round(wall_time_s, 2))
        summary.train_runtime_s = _total(part["train_runtime_s"] for part in summary.parts)
        summary.wall_time_s = _total(part["wall_time_s"] for part in summary.parts)
        if len(summary.parts) > 1 and (whole_run := mean_train_loss(history)) is not None:
            # The trainer's `train_loss` averages only the steps since the resume.
            final = summary.metrics["final"]
            final["train_loss_since_resume"], final["train_loss"] = final.get("train_loss"), whole_run
        (local / "history.json").write_text(json.dumps(history, indent=1))
        summary.to_json(local / "summary.json")
        summary.report = storage.report_uri(folder, write_report_or_warn(local, location=folder.uri))
        summary.to_json(local / "summary.json")
    summary_path = storage.join(folder.uri, "summary.json")
    return TrainOutcome(run_dir=folder.uri, summary_path=summary_path, summary=summary, result=result)


def run_parts(previous: Path, history: list[dict], returned: WorkerResult, wall_time_s: float) -> list[dict]:
    """Every part of the run so far, this one last: the earlier parts from the previous summary.json, or, for a
    part interrupted before it wrote one, its training time as logged in the history (its wall time unknown)."""
    resumed = returned.resumed_from_step
    parts: list[dict] = []
    if resumed:
        if previous.is_file():
            earlier = RunSummary.from_json(previous)
            parts = [part for part in earlier.parts if (part.get("to_step") or 0) <= resumed]
            if not earlier.parts and earlier.steps:  # a summary written before parts were recorded
                parts = [_part(0, earlier.steps, earlier.train_runtime_s, earlier.wall_time_s)]
        done = max((part.get("to_step") or 0 for part in parts), default=0)
        if done < resumed:
            logged = [
                e["train_runtime_s"] for e in history if done < e.get("step", 0) <= resumed and "train_runtime_s" in e
            ]
            parts.append(_part(done, resumed, max(logged) if logged else None, None))
    parts.append(_part(resumed or 0, returned.global_step, returned.train_runtime_s, wall_time_s))
    return parts


def _part(from_step, to_step, train_runtime_s, wall_time_s) -> dict:
    return {"from_step": from_step, "to_step": to_step, "train_runtime_s": train_runtime_s, "wall_time_s": wall_time_s}


def _total(values) -> float | None:
    known = [value for value in values if value is not None]
    return round(sum(known), 2) if known else None


def mean_train_loss(history: list[dict]) -> float | None:
    """The training loss over the whole run: each logged loss (a mean over the steps since the previous log)
    weighted by the steps it covers."""
    logged = sorted((entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry)
    total, previous, weighted = 0, 0, 0.0
    for step, loss in logged:
        weighted += loss * (step - previous)
        total, previous = total + (step - previous), step
    return weighted / total if total else None


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


def _best_checkpoint_path(result, folder: storage.StorageFolder) -> str | None:
    best = _best_checkpoint(result)
    return folder.uri_of(f"{best[0].path}/checkpoint") if best else None
