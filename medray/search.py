"""Ray Tune over the training job: sample LoRA and optimizer settings, stop weak trials early with ASHA, rank them.

Ray Train V2's pattern: each Tune trial runs `run_trial`, a driver function that builds and fits one `TorchTrainer`
(the trainer's workers take the GPUs; the trial itself reserves next to nothing) and forwards every Ray Train report
(one per evaluation, with `eval_loss` and `step`) to Tune. ASHA compares trials by `tune.metric` at rungs counted
in optimizer steps. The data is read and tokenized once, on the search driver, and every trial streams the same
Ray datasets. The space and its checks are in `medray.search_space`, the leaderboard in `medray.leaderboard`, and a
workaround for placement groups that Ray leaves behind in `medray._ray_placement`.

    outcome = run_search(load_config("tune-cpu-demo"))
    print(outcome.summary.best_trial, outcome.summary.best_config)

The search folder `{run.storage_path}/{run.name}/` holds Tune's state, one `tune-{trial}/` folder per trial (its
reported results), `trials/{run.name}-trial-{trial}/` (each trial's Ray Train run: checkpoints, and for trials that
ran to the end `summary.json` and a report), and at the end `leaderboard.csv`, `leaderboard.md`, `best_config.yaml`
(a preset for `medray train --config`) and `summary.json`. Running the same command again resumes an interrupted
search: finished trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from medray import preflight, tracking
from medray._ray_placement import (
    FreeTrialPlacementGroups,
    RecordPlacementGroup,
    free_placement_groups,
    ledger_name,
    start_ledger,
)
from medray.config import ConfigError, MedrayConfig
from medray.driver import build_trainer, planned_steps, prepare_data, start_ray, storage_path, write_outcome
from medray.leaderboard import SearchOutcome, write_search_outcome
from medray.search_space import (
    WORST_METRIC,
    check_search,
    finite_metric,
    max_concurrent_trials,
    number_of_trials,
    param_space,
    raise_if_problems,
    search_dir,
    set_dotted,
    step_problems,
    trial_resources,
)
from medray.sources import is_uri
from medray.tune_config import TuneArgs

logger = logging.getLogger(__name__)

SEARCH_CONFIG_FILE = "medray_search.json"
"""The config a search started with, in its folder: a resumed search must use the same."""


# -- the search, top to bottom --------------------------------------------------------------------------------------


def run_search(cfg: MedrayConfig) -> SearchOutcome:
    """Check the search, prepare the data once, run (or resume) the Tune experiment, write the leaderboard."""
    started = time.time()
    check_search(cfg)
    tracking.check(cfg)
    resuming = tune.Tuner.can_restore(search_dir(cfg))
    if resuming:
        _check_same_search(cfg, search_dir(cfg))
    preflight.check_storage(storage_path(cfg))
    preflight.check_model(cfg.model)
    start_ray()
    preflight.check_cluster(cfg.scaling)
    data = prepare_data(cfg)
    preflight.check_batches(cfg, data.stats)
    max_steps = cfg.tune.max_steps or planned_steps(cfg, data.stats["rows_train"])
    raise_if_problems(step_problems(cfg, max_steps))
    concurrency = max_concurrent_trials(cfg, ray.cluster_resources())
    logger.info(
        "search %s: %d trials of %d steps, %d at a time",
        cfg.run.name,
        number_of_trials(cfg.tune),
        max_steps,
        concurrency,
    )
    ledger = start_ledger(search_dir(cfg))
    try:
        tuner = build_tuner(cfg, data, max_steps=max_steps, concurrency=concurrency, resume=resuming)
        results = tuner.fit()
    finally:
        free_placement_groups(ledger, None)
        ray.kill(ledger)
    return write_search_outcome(
        cfg, data.stats, results, max_steps=max_steps, concurrency=concurrency, wall_time_s=time.time() - started
    )


def build_tuner(cfg: MedrayConfig, data, *, max_steps: int, concurrency: int, resume: bool) -> tune.Tuner:
    """A new Tuner, or (`resume`) the search restored from its folder: finished trials kept, the others continued."""
    path = search_dir(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=cfg.to_dict(), data=data, max_steps=max_steps, search_path=path, ledger=ledger_name(path)
        ),
        trial_resources(cfg.tune),
    )
    if resume:
        logger.info("resuming the search in %s: finished trials are kept", path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=param_space(cfg.tune))
    _write_search_config(cfg, path)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg.tune),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            scheduler=build_scheduler(cfg.tune, max_steps, cfg.train.eval_steps),
            # The concurrency limit lives in the generator: Tune ignores max_concurrent_trials next to a search_alg.
            search_alg=BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=concurrency),
            num_samples=cfg.tune.num_samples,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path(cfg),
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            # One MLflow / W&B run per trial, under one experiment named after the search (run.trackers).
            callbacks=[FreeTrialPlacementGroups(ledger_name(path)), *tracking.search_callbacks(cfg, cfg.run.name)],
        ),
    )


def run_trial(
    params: dict[str, Any], *, base: dict[str, Any], data, max_steps: int, search_path: str, ledger: str
) -> None:
    """One Tune trial: the TorchTrainer of the base config with this trial's `params` (dotted keys), fitted here."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, trial_id=trial_id, max_steps=max_steps, search_path=search_path)
    callbacks = [FiniteMetricReport(cfg.tune.metric, cfg.tune.mode), RecordPlacementGroup(ledger, trial_id)]
    started = time.time()
    result = build_trainer(cfg, data, trial=trial_id, callbacks=callbacks).fit()
    write_outcome(cfg, data.stats, result, wall_time_s=time.time() - started)


def trial_config(
    base: dict[str, Any], params: dict[str, Any], *, trial_id: str, max_steps: int, search_path: str
) -> MedrayConfig:
    """The search's config with the trial's parameters set, its own run name, under `{search_path}/trials/`."""
    values = json.loads(json.dumps(base))
    for key, value in params.items():
        set_dotted(values, key, value)
    values["run"]["name"] = f"{base['run']['name']}-trial-{trial_id}"
    values["run"]["storage_path"] = f"{search_path}/trials"
    values["train"]["max_steps"] = max_steps
    return MedrayConfig.from_dict(values)


def build_scheduler(tune_args: TuneArgs, max_steps: int, eval_steps: int):
    """ASHA with optimizer steps as its clock (`step` of every report), or FIFO (every trial runs to the end)."""
    if tune_args.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        max_t=max_steps,
        grace_period=tune_args.grace_period or eval_steps,
        reduction_factor=tune_args.reduction_factor,
        # A trial at max_t ends by itself: stopping it there would kill it before it writes its summary.
        stop_last_trials=False,
    )


def _write_search_config(cfg: MedrayConfig, path: str) -> None:
    if is_uri(path):
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / SEARCH_CONFIG_FILE).write_text(json.dumps(_comparable(cfg), indent=1))


def _check_same_search(cfg: MedrayConfig, path: str) -> None:
    """A search resumes only with the config it started with: Tune keeps the old space and scheduler anyway."""
    saved_file = Path(path) / SEARCH_CONFIG_FILE
    if is_uri(path) or not saved_file.is_file():
        return
    saved, current = _flatten(json.loads(saved_file.read_text())), _flatten(_comparable(cfg))
    changed = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    if changed:
        listing = ", ".join(f"{key} (was {saved.get(key)}, now {current.get(key)})" for key in changed[:8])
        raise ConfigError(
            [
                f"the search in {path} was started with another config: {listing}. Run it again with the config it "
                "started with to resume it, or pick a new run.name for a new search"
            ]
        )


def _comparable(cfg: MedrayConfig) -> dict[str, Any]:
    values = cfg.to_dict()
    values["run"].pop("storage_path")
    return values


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "space":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
    return flat


def _trial_dirname(trial) -> str:
    return f"tune-{trial.trial_id}"


class FiniteMetricReport(TuneReportCallback):
    """`TuneReportCallback` (every Ray Train report becomes a Tune result) that turns a NaN or infinite metric into
    the worst value: ASHA's cutoffs ignore NaN, so a diverged trial would otherwise never be stopped."""

    def __init__(self, metric: str, mode: str):
        super().__init__()
        self.metric, self.worst = metric, WORST_METRIC if mode == "min" else -WORST_METRIC

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        cleaned = [finite_metric(worker_metrics, self.metric, self.worst) for worker_metrics in metrics]
        super().after_report(run_context, cleaned, checkpoint)
