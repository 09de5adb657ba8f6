"""The typed objects that cross medray's process boundaries, each with one writer.

    WorkerPlan     driver -> every Ray Train worker   (written by `medray.driver.build_trainer`)
    WorkerResult   rank 0 -> driver                   (written by `medray.worker.train_loop_per_worker`)
    RunSummary     a finished run -> summary.json     (written by `medray.driver.write_outcome`)
    SearchSummary  a finished search -> summary.json  (written by `medray.search`)

Plain dicts cross the Ray boundary (`to_dict` / `from_dict`), so workers need nothing but this module to read them.
`summary.json` carries `schema_version` and `kind`; `read_summary(path)` returns the matching class. Readers of
older files get the defaults for fields a file lacks; keys a reader does not know are ignored.

    summary = read_summary(run_dir / "summary.json")
    print(summary.steps, summary.metrics["best"].get("eval_loss"))
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
"""Version of summary.json's layout; raise it when a field changes meaning or is removed."""


class _Record:
    """`to_dict` / `from_dict` for the dataclasses below (unknown keys are ignored, missing ones take defaults)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {item.name for item in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{key: value for key, value in values.items() if key in names})


@dataclass
class WorkerPlan(_Record):
    """What the driver derived for the workers of one `TorchTrainer.fit()`, beside the config itself."""

    run_id: str
    """Unique per fit: names each rank's local output folder."""
    max_steps: int
    """Optimizer steps of the run (`medray.driver.planned_steps`)."""
    has_validation: bool
    """Whether a validation split exists: evaluation, best-checkpoint selection and early stopping need one."""
    trial: str | None = None
    """The Ray Tune trial id, or None outside a search."""
    tracking: dict[str, Any] = field(default_factory=dict)
    """The trackers' plan (`medray.tracking.worker_plan`): `report_to`, `run_name`, log folders (local paths or
    URIs), the non-secret variables the workers set. Empty: report to nothing."""
    extensions: list[str] = field(default_factory=list)
    """Import paths (`package.module:function`) of worker extensions: measurement and test code that attaches
    to the trainer from outside medray (see `medray.worker.WorkerContext`). Empty for users' runs."""
    extension_options: dict[str, Any] = field(default_factory=dict)
    """Settings for the extensions, by whatever keys they document (JSON-able values)."""
    verbose: bool = False
    """`medray ... --verbose`: keep the libraries' progress bars and developer warnings (medray.console)."""


@dataclass
class WorkerResult(_Record):
    """What rank 0 returns from `train_loop_per_worker`: the history and the facts of the run."""

    log_history: list[dict[str, Any]] = field(default_factory=list)
    """The trainer's `state.log_history` (written to history.json)."""
    global_step: int | None = None
    best_metric: float | None = None
    best_step: int | None = None
    train_runtime_s: float | None = None
    backend: str | None = None
    resumed_from_step: int | None = None
    world_size: int | None = None
    node_ids: list[str] = field(default_factory=list)
    """Ray node id of every rank, in rank order."""
    batch_layout: str | None = None
    """The micro-batch layout that ran: `padding_free` or `padded` (medray.batching)."""
    effective: dict[str, Any] = field(default_factory=dict)
    """What the run used where the config leaves a choice (`medray.worker.effective_values`): `backend`, `device`,
    `optimizer`, `precision`, `per_device_batch_size`, `gradient_accumulation_steps`, `world_size`,
    `rows_per_step`, `batch_layout`, `gradient_checkpointing`."""
    extensions: dict[str, list[Any]] = field(default_factory=dict)
    """Extension import path -> what its `result()` returned on every rank, in rank order."""


@dataclass
class _Summary(_Record):
    """Fields every summary.json has: a run's and a search's."""

    config: dict[str, Any] = field(default_factory=dict)
    """`MedrayConfig.to_dict()` of the run."""
    data: dict[str, Any] = field(default_factory=dict)
    """`PreparedData.stats`: rows read, per split, truncated, dropped; `tokens_train`, `loss_tokens_train`; and
    `sources`: per data source its `name`, `row_format`, `weight`, `rows_read`, `rows_train`, `rows_validation`."""
    metrics: dict[str, Any] = field(default_factory=lambda: {"final": {}, "best": {}})
    """`final`: every field's last logged value; `best`: the metrics of the best checkpoint."""
    best_checkpoint: str | None = None
    """Folder of the best adapter (lowest validation loss; the latest without validation)."""
    steps: int | None = None
    wall_time_s: float | None = None
    report: str | None = None
    """Path of report.md, once written."""
    evaluation: dict[str, Any] | None = None
    """Benchmark scores of the trained adapter (`medray.evaluate`), when evaluated."""
    sources: dict[str, Any] | None = None
    """Where the model and data came from (resolved names, revisions), when recorded."""
    schema_version: int = SCHEMA_VERSION
    kind: str = "run"

    def to_json(self, path: str | Path | None = None) -> str:
        """The summary as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        """A summary from JSON text or from the path of a summary.json."""
        text = text_or_path
        if isinstance(text_or_path, Path) or not str(text_or_path).lstrip().startswith("{"):
            text = Path(text_or_path).expanduser().read_text()
        return cls.from_dict(json.loads(text))


@dataclass
class RunSummary(_Summary):
    """summary.json of a training run (`medray train`, and every trial of a search that ran to its end)."""

    latest_checkpoint: str | None = None
    best_step: int | None = None
    resumed_from_step: int | None = None
    backend: str | None = None
    batch_layout: str | None = None
    """The micro-batch layout that trained: `padding_free` or `padded` (`train.padding`, medray.batching)."""
    world_size: int | None = None
    node_ids: list[str] = field(default_factory=list)
    train_runtime_s: float | None = None
    """Training time summed over every part of the run (see `parts`)."""
    effective: dict[str, Any] = field(default_factory=dict)
    """`WorkerResult.effective`: the optimizer, precision, device, backend and batch layout the run used."""
    parts: list[dict[str, Any]] = field(default_factory=list)
    """One entry per `fit()` of this run, oldest first (more than one after a resume): `from_step`, `to_step`,
    `train_runtime_s`, `wall_time_s` (None for a part that was interrupted before it wrote its summary)."""
    kind: str = "run"


@dataclass
class SearchSummary(_Summary):
    """summary.json of a Ray Tune search (`medray tune`): the run fields of its best trial, and the search."""

    metric: str = "eval_loss"
    mode: str = "min"
    best_trial: dict[str, Any] | None = None
    """The leaderboard row of the best trial (`trial`, `params`, `best`, `best_step`, `steps`, ...)."""
    best_config: str | None = None
    """Path of best_config.yaml, a preset for `medray train --config`."""
    max_steps: int | None = None
    num_trials: int = 0
    num_stopped_early: int = 0
    num_errors: int = 0
    scheduler: str = "asha"
    max_concurrent_trials: int | None = None
    resources_per_trial: dict[str, float] = field(default_factory=dict)
    resource_seconds: dict[str, float] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    """Every trial's leaderboard row, best first."""
    finished: bool = True
    """False when the search was interrupted with trials left to run."""
    leaderboard: dict[str, str] = field(default_factory=dict)
    """Paths of leaderboard.csv and leaderboard.md."""
    kind: str = "search"


def read_summary(path: str | Path) -> RunSummary | SearchSummary:
    """The summary.json at `path`, as the class its `kind` names (files without one are runs)."""
    values = json.loads(Path(path).expanduser().read_text())
    is_search = values.get("kind") == "search" or "best_trial" in values
    return (SearchSummary if is_search else RunSummary).from_dict(values)
