"""Experiment trackers (`run.trackers`: tensorboard, mlflow, wandb) through the integrations transformers and Ray ship.

- A run (`medray train`): rank 0's Trainer reports through transformers' `TensorBoardCallback`, `MLflowCallback` and
  `WandbCallback` (`report_to`). The driver opens the MLflow run before the workers start, hands its id to them
  (`MLFLOW_RUN_ID`, so a restarted worker continues the same run), logs medray's config as `medray.*` params, and
  after training logs `summary.json`, the report and the best adapter as artifacts.
- A search (`medray tune`): Ray Tune's `MLflowLoggerCallback` / `WandbLoggerCallback` log one run per trial (its
  params and every report) under one experiment named after the search; the trials' workers log TensorBoard only.
- Log folders (TensorBoard events, W&B files) go into the run folder. On object storage rank 0 writes them to its
  scratch folder and mirrors them up as it logs (`medray.storage.mirror_callback`).

Endpoints and credentials come from the trackers' own variables, read where they are needed and never written to a
file: `MLFLOW_TRACKING_URI` (required for mlflow), `MLFLOW_EXPERIMENT_NAME` (default: `run.name`), `WANDB_MODE`
(`offline` needs no account), `WANDB_API_KEY`, `WANDB_PROJECT` (default: `run.name`). Secrets (`WANDB_API_KEY`,
`MLFLOW_TRACKING_TOKEN`, ...) must be set on the cluster's nodes; only the non-secret variables travel with the plan.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from medray import storage
from medray.config import ConfigError, MedrayConfig
from medray.contracts import RunSummary

logger = logging.getLogger(__name__)

# Non-secret settings handed from the driver to the workers (secrets stay in the nodes' own environment).
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "WANDB_MODE",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_BASE_URL",
)
OFFLINE_WANDB_MODES = ("offline", "disabled", "dryrun")


def check(cfg: MedrayConfig) -> None:
    """Raise a ConfigError, before anything is reserved, when a chosen tracker has no place to log to."""
    problems = []
    if "mlflow" in cfg.run.trackers and not os.environ.get("MLFLOW_TRACKING_URI"):
        problems.append(
            "run.trackers has mlflow but MLFLOW_TRACKING_URI is not set: set it to your MLflow server "
            "(http://host:5000) or drop mlflow from run.trackers"
        )
    wandb_mode = os.environ.get("WANDB_MODE", "online")
    if "wandb" in cfg.run.trackers and wandb_mode not in OFFLINE_WANDB_MODES and not os.environ.get("WANDB_API_KEY"):
        problems.append(
            "run.trackers has wandb but neither WANDB_API_KEY nor WANDB_MODE=offline is set: log in "
            "(export WANDB_API_KEY=...) or export WANDB_MODE=offline"
        )
    for name in ("mlflow", "wandb"):
        if name in cfg.run.trackers and not _installed(name):
            problems.append(f"run.trackers has {name} but {name} is not installed: pip install 'medray[tracking]'")
    if problems:
        raise ConfigError(problems)


def worker_plan(cfg: MedrayConfig, run_uri: str, *, trial: str | None) -> dict[str, Any]:
    """What the workers need to report: `report_to`, the run folder's log folders, the forwarded variables.

    In a Tune trial only TensorBoard is reported from the worker: Ray Tune's logger callbacks own the MLflow and W&B
    runs of a search (see `search_callbacks`).
    """
    trackers = [name for name in cfg.run.trackers if trial is None or name == "tensorboard"]
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if "mlflow" in trackers:
        env.setdefault("MLFLOW_EXPERIMENT_NAME", cfg.run.name)
    if "wandb" in trackers:
        env.setdefault("WANDB_PROJECT", cfg.run.name)
        # One W&B run per medray run attempt; a restarted worker continues it.
        env.update(WANDB_RUN_ID=f"{cfg.run.name}-{uuid.uuid4().hex[:8]}", WANDB_RESUME="allow")
    return {
        "report_to": trackers,
        "run_name": cfg.run.name if trial is None else f"{cfg.run.name}-{trial}",
        "tensorboard_dir": storage.join(run_uri, "tensorboard") if "tensorboard" in trackers else None,
        "wandb_dir": run_uri if "wandb" in trackers else None,  # W&B writes its own `wandb/` folder inside
        "env": env,
    }


def start_mlflow_run(cfg: MedrayConfig, tracking: dict[str, Any]) -> None:
    """Open the run's MLflow run on the driver (when mlflow is reported): its id goes to the workers."""
    if "mlflow" not in tracking["report_to"]:
        return
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    name = tracking["env"]["MLFLOW_EXPERIMENT_NAME"]
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=tracking["run_name"], tags={"medray.run_name": cfg.run.name})
    for batch in _batches(sorted(_flat_params(cfg.to_dict(), "medray.").items()), 100):
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in batch])
    tracking["env"]["MLFLOW_RUN_ID"] = run.info.run_id


def setup_worker(tracking: dict[str, Any], scratch: Path, rank: int) -> dict[str, Any]:
    """On a worker: set the trackers' variables and log folders; returns `{"report_to", "run_name", "callbacks"}`.

    Log folders in local storage are written directly; those in object storage are written to `scratch` on rank 0
    and mirrored to the run folder by the returned callbacks.
    """
    if not tracking:  # a plan made without trackers (tests, the benchmark): report to nothing
        return {"report_to": [], "run_name": None, "callbacks": []}
    os.environ.update(tracking["env"])
    callbacks = []
    for variable, key, local in (
        ("TENSORBOARD_LOGGING_DIR", "tensorboard_dir", scratch / "tensorboard"),  # transformers 5 reads it
        ("WANDB_DIR", "wandb_dir", scratch / "wandb_root"),
    ):
        target = tracking.get(key)
        if target is None:
            continue
        if not storage.is_uri(target):
            os.environ[variable] = target
            continue
        local.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(local)
        if rank == 0:
            callbacks.append(storage.mirror_callback(local, target))
    return {"report_to": tracking["report_to"], "run_name": tracking["run_name"], "callbacks": callbacks}


def finish_mlflow_run(tracking: dict[str, Any], run_folder: storage.StorageFolder, summary: RunSummary) -> None:
    """Log the run's summary, report, loss plot and best adapter as artifacts of its MLflow run, and close it."""
    run_id = tracking["env"].get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    with tempfile.TemporaryDirectory(prefix="medray_mlflow_") as scratch:
        local = Path(scratch)
        for name in ("summary.json", "history.json", "report.md", "loss.png"):
            if run_folder.exists(name):
                with run_folder.filesystem.open_input_stream(f"{run_folder.path}/{name}") as stream:
                    (local / name).write_bytes(stream.read())
                client.log_artifact(run_id, str(local / name))
        best = summary.best_checkpoint
        if best:
            adapter = storage.StorageFolder.of(best)
            client.log_artifacts(run_id, str(adapter.download("", local / "best_adapter")), "best_adapter")
    end_mlflow_run(tracking, "FINISHED")


def end_mlflow_run(tracking: dict[str, Any], status: str) -> None:
    """Mark the run's MLflow run FINISHED or FAILED (no-op without one)."""
    run_id = tracking["env"].get("MLFLOW_RUN_ID")
    if run_id:
        from mlflow import MlflowClient

        MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).set_terminated(run_id, status)


def search_callbacks(cfg: MedrayConfig, experiment_name: str) -> list:
    """Ray Tune logger callbacks for a search: one MLflow / W&B run per trial under `experiment_name`."""
    callbacks: list = []
    if "mlflow" in cfg.run.trackers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
                experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment_name),
            )
        )
    if "wandb" in cfg.run.trackers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(
            WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", experiment_name), group=experiment_name)
        )
    return callbacks


def _flat_params(values: dict[str, Any], prefix: str) -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:6000]  # MLflow's limit on a param value
    return flat


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _installed(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None
