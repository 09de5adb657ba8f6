"""Ray Tune over the training job: sample LoRA and optimizer settings, stop weak trials early with ASHA, rank them.

Ray Train V2's pattern: each Tune trial runs `run_trial`, a driver function that builds and fits one `TorchTrainer`
(the trainer's workers take the GPUs; the trial itself reserves next to nothing) and forwards every Ray Train report
(one per evaluation, with `eval_loss` and `step`) to Tune. ASHA compares trials by `tune.metric` at rungs counted
in optimizer steps. The data is read and tokenized once, on the search driver, and every trial streams the same
Ray datasets.

    outcome = run_search(load_config("jobs/configs/tune-cpu-demo.yaml"))
    print(outcome.summary["best_trial"], outcome.summary["best_config"])

The search folder `{run.storage_path}/{run.name}/` holds Tune's state, one `tune-{trial}/` folder per trial (its
reported results), `trials/{run.name}-trial-{trial}/` (each trial's Ray Train run: checkpoints, and for trials that
ran to the end `summary.json` and a report), and at the end `leaderboard.csv`, `leaderboard.md`, `best_config.yaml`
(a preset for `medray train --config`) and `summary.json`. Running the same command again resumes an interrupted
search: finished trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.placement_group import placement_group_table, remove_placement_group

from medray.config import ConfigError, MedrayConfig, TuneArgs
from medray.driver import build_trainer, planned_steps, prepare_data, storage_path, write_outcome

logger = logging.getLogger(__name__)

SAMPLER_FUNCTIONS = {
    "uniform": tune.uniform,
    "quniform": tune.quniform,
    "loguniform": tune.loguniform,
    "qloguniform": tune.qloguniform,
    "randint": tune.randint,
    "qrandint": tune.qrandint,
    "lograndint": tune.lograndint,
    "choice": tune.choice,
    "grid": tune.grid_search,
}
WORST_METRIC = 1e30
"""Stands in for a NaN or infinite metric (a diverged trial): ASHA ignores NaN, so it would never stop such a trial."""
TRIAL_MEMORY_BYTES = 64 * 1024**2
"""What a trial's driver function reserves when `tune.trial_cpus` is 0 (Tune needs a non-empty reservation)."""
SEARCH_CONFIG_FILE = "medray_search.json"
SWEEP_INTERVAL_S = 5.0


@dataclass
class SearchOutcome:
    """What a finished search left behind."""

    search_dir: str
    summary_path: str
    summary: dict[str, Any]
    results: Any


# -- the search, top to bottom --------------------------------------------------------------------------------------


def run_search(cfg: MedrayConfig) -> SearchOutcome:
    """Check the search, prepare the data once, run (or resume) the Tune experiment, write the leaderboard."""
    started = time.time()
    check_search(cfg)
    resuming = tune.Tuner.can_restore(search_dir(cfg))
    if resuming:
        _check_same_search(cfg, search_dir(cfg))
    if not ray.is_initialized():
        ray.init()
    data = prepare_data(cfg)
    max_steps = cfg.tune.max_steps or planned_steps(cfg, data.stats["rows_train"])
    _raise_if_problems(step_problems(cfg, max_steps))
    concurrency = max_concurrent_trials(cfg, ray.cluster_resources())
    logger.info(
        "search %s: %d trials of %d steps, %d at a time",
        cfg.run.name,
        number_of_trials(cfg.tune),
        max_steps,
        concurrency,
    )
    ledger = _start_ledger(search_dir(cfg))
    try:
        tuner = build_tuner(cfg, data, max_steps=max_steps, concurrency=concurrency, resume=resuming)
        results = tuner.fit()
    finally:
        _free_placement_groups(ledger, None)
        ray.kill(ledger)
    return write_search_outcome(
        cfg, data.stats, results, max_steps=max_steps, concurrency=concurrency, wall_time_s=time.time() - started
    )


def search_dir(cfg: MedrayConfig) -> str:
    """The search folder, `{run.storage_path}/{run.name}` (a local path or a URI)."""
    return f"{storage_path(cfg).rstrip('/')}/{cfg.run.name}"


def build_tuner(cfg: MedrayConfig, data, *, max_steps: int, concurrency: int, resume: bool) -> tune.Tuner:
    """A new Tuner, or (`resume`) the search restored from its folder: finished trials kept, the others continued."""
    path = search_dir(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=cfg.to_dict(), data=data, max_steps=max_steps, search_path=path, ledger=_ledger_name(path)
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
            callbacks=[FreeTrialPlacementGroups(_ledger_name(path))],
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


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """`set_dotted(d, "lora.r", 16)` sets `d["lora"]["r"] = 16`."""
    *sections, name = key.split(".")
    for section in sections:
        values = values.setdefault(section, {})
    values[name] = value


# -- config -> Ray Tune ---------------------------------------------------------------------------------------------


def param_space(tune_args: TuneArgs) -> dict[str, Any]:
    """`tune.space` as Ray Tune's param_space: `{"lora.r": tune.choice([8, 16])}`, flat dotted keys."""
    return {key: sampler(spec) for key, spec in tune_args.space.items()}


def sampler(spec: dict[str, list[Any]]):
    """`{"loguniform": [1e-5, 1e-3]}` -> `tune.loguniform(1e-5, 1e-3)`; choice and grid take the list itself."""
    ((name, arguments),) = spec.items()
    if TuneArgs.SAMPLERS[name] is None:
        return SAMPLER_FUNCTIONS[name](list(arguments))
    return SAMPLER_FUNCTIONS[name](*arguments)


def number_of_trials(tune_args: TuneArgs) -> int:
    """Trials the search runs: num_samples times the size of the grid."""
    grid = math.prod(len(spec["grid"]) for spec in tune_args.space.values() if "grid" in spec)
    return tune_args.num_samples * grid


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


def trial_resources(tune_args: TuneArgs) -> dict[str, float]:
    """What Tune reserves for a trial's driver function (its trainer's workers reserve their own)."""
    if tune_args.trial_cpus > 0:
        return {"CPU": tune_args.trial_cpus}
    return {"CPU": 0, "memory": TRIAL_MEMORY_BYTES}


def resources_per_trial(cfg: MedrayConfig) -> dict[str, float]:
    """Everything one trial holds while it runs: its workers plus its driver function."""
    workers = cfg.scaling.num_workers
    return {
        "CPU": workers * cfg.scaling.cpus_per_worker + cfg.tune.trial_cpus,
        "GPU": float(workers) if cfg.scaling.use_gpu else 0.0,
    }


def max_concurrent_trials(cfg: MedrayConfig, cluster: dict[str, float]) -> int:
    """`tune.max_concurrent_trials`, or as many trials as the cluster's GPUs and CPUs hold at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    need = {name: amount for name, amount in resources_per_trial(cfg).items() if amount > 0}
    fits = min(int(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in need.items())
    if fits < 1:
        have = {name: cluster.get(name, 0.0) for name in need}
        raise ConfigError(
            [
                f"one trial needs {need} (scaling.num_workers={cfg.scaling.num_workers} workers) but the cluster "
                f"has {have}; use fewer or smaller workers, or set tune.max_concurrent_trials on an autoscaling "
                "cluster"
            ]
        )
    return fits


# -- checks before anything starts ----------------------------------------------------------------------------------


def check_search(cfg: MedrayConfig) -> None:
    """Raise one ConfigError naming every problem of the search, before Ray starts anything."""
    problems = []
    if cfg.tune.metric.startswith("eval_") and cfg.data.validation_fraction == 0:
        problems.append(f"tune.metric={cfg.tune.metric} needs a validation split: set data.validation_fraction > 0")
    if not cfg.tune.space:
        problems.append("tune.space is empty: add e.g. tune.space.train.learning_rate={loguniform: [1.0e-5, 1.0e-3]}")
    steps = cfg.tune.max_steps or (cfg.train.max_steps if cfg.train.max_steps > 0 else None)
    if steps:
        problems += step_problems(cfg, steps)
    problems += space_value_problems(cfg)
    _raise_if_problems(problems)


def step_problems(cfg: MedrayConfig, max_steps: int) -> list[str]:
    """Trials must evaluate before they end, and ASHA's first rung must come before the end."""
    problems = []
    if cfg.train.eval_steps > max_steps:
        problems.append(
            f"train.eval_steps={cfg.train.eval_steps} is more than the {max_steps} steps of a trial: trials would "
            "never report a validation loss; lower train.eval_steps"
        )
    grace = cfg.tune.grace_period or cfg.train.eval_steps
    if cfg.tune.scheduler == "asha" and grace > max_steps:
        problems.append(f"tune.grace_period={grace} is more than the {max_steps} steps of a trial; lower it")
    return problems


def space_value_problems(cfg: MedrayConfig) -> list[str]:
    """Every value a sampler can draw must make a valid config: its list values and its range ends are tried."""
    base = cfg.to_dict()
    problems = []
    for key, spec in cfg.tune.space.items():
        for value in _edge_values(spec):
            values = json.loads(json.dumps(base))
            set_dotted(values, key, value)
            try:
                MedrayConfig.from_dict(values)
            except ConfigError as error:
                problems += [f"tune.space.{key} can draw {value!r}: {problem}" for problem in error.problems]
    return problems


def _edge_values(spec: dict[str, list[Any]]) -> list[Any]:
    ((name, arguments),) = spec.items()
    if TuneArgs.SAMPLERS[name] is None:
        return list(arguments)
    low, high = arguments[0], arguments[1]
    return [low, high - 1] if name == "randint" else [low, high]


def _raise_if_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def _write_search_config(cfg: MedrayConfig, path: str) -> None:
    if "://" in path:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / SEARCH_CONFIG_FILE).write_text(json.dumps(_comparable(cfg), indent=1))


def _check_same_search(cfg: MedrayConfig, path: str) -> None:
    """A search resumes only with the config it started with: Tune keeps the old space and scheduler anyway."""
    saved_file = Path(path) / SEARCH_CONFIG_FILE
    if "://" in path or not saved_file.is_file():
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


# -- callbacks: metrics into Tune, placement groups out of the cluster ----------------------------------------------


class FiniteMetricReport(TuneReportCallback):
    """`TuneReportCallback` (every Ray Train report becomes a Tune result) that turns a NaN or infinite metric into
    the worst value: ASHA's cutoffs ignore NaN, so a diverged trial would otherwise never be stopped."""

    def __init__(self, metric: str, mode: str):
        super().__init__()
        self.metric, self.worst = metric, WORST_METRIC if mode == "min" else -WORST_METRIC

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        cleaned = [finite_metric(worker_metrics, self.metric, self.worst) for worker_metrics in metrics]
        super().after_report(run_context, cleaned, checkpoint)


def finite_metric(metrics: dict[str, Any], metric: str, worst: float) -> dict[str, Any]:
    """A copy of one report with `metric` replaced by `worst` when it is missing, NaN, infinite or beyond `worst`."""
    value = metrics.get(metric)
    if _is_finite_metric(value):
        return dict(metrics)
    return {**metrics, metric: worst}


class RecordPlacementGroup(WorkerGroupCallback):
    """Runs in the trial's Ray Train controller: records the workers' placement group with the search driver.

    When ASHA stops a trial, Tune ends the trial's actor and with it the controller, but the placement group
    outlives them (it belongs to the job): Ray Train's own cleaner needs the dashboard's state API, which a plain
    `ray.init()` may not start. The driver removes the recorded groups of every ended trial.
    """

    def __init__(self, ledger_name: str, trial_id: str):
        self.ledger_name, self.trial_id = ledger_name, trial_id

    def after_worker_group_start(self, worker_group) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        try:
            ray.get(ray.get_actor(self.ledger_name).add.remote(self.trial_id, group))
        except (ValueError, ray.exceptions.RayError) as error:  # never fail training over bookkeeping
            logger.warning("could not record the placement group of trial %s: %s", self.trial_id, error)


class FreeTrialPlacementGroups(tune.Callback):
    """Runs on the search driver: removes the placement groups of trials that ended (stopped, finished, failed)."""

    def __init__(self, ledger_name: str):
        self.ledger_name = ledger_name
        self._last_sweep = 0.0

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._free([trial.trial_id])

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._free([trial.trial_id])

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._free([trial.trial_id])

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        # A stopped trial's controller can start a worker group after on_trial_complete: sweep the ended ones again.
        if time.monotonic() - self._last_sweep < SWEEP_INTERVAL_S:
            return
        self._last_sweep = time.monotonic()
        ended = [trial.trial_id for trial in trials if trial.status in ("TERMINATED", "ERROR")]
        if ended:
            self._free(ended)

    def _free(self, trial_ids: list[str]) -> None:
        try:
            ledger = ray.get_actor(self.ledger_name)
        except ValueError:  # no ledger (a search restored outside run_search): nothing was recorded
            return
        _free_placement_groups(ledger, trial_ids)


class PlacementGroupLedger:
    """A small actor on the search driver's side: trial id -> placement groups its controllers created."""

    def __init__(self):
        self.groups: dict[str, list] = {}

    def add(self, trial_id: str, group) -> None:
        self.groups.setdefault(trial_id, []).append(group)

    def pop(self, trial_ids: list[str] | None) -> list:
        """The groups of these trials (all trials for None), forgotten here."""
        ids = list(self.groups) if trial_ids is None else [i for i in trial_ids if i in self.groups]
        return [group for trial_id in ids for group in self.groups.pop(trial_id)]


def _ledger_name(path: str) -> str:
    return f"medray-placement-groups-{hashlib.sha1(path.encode()).hexdigest()[:12]}"


def _start_ledger(path: str):
    actor = ray.remote(num_cpus=0)(PlacementGroupLedger)
    return actor.options(name=_ledger_name(path), get_if_exists=True).remote()


def _free_placement_groups(ledger, trial_ids: list[str] | None) -> None:
    for group in ray.get(ledger.pop.remote(trial_ids)):
        try:
            if placement_group_table(group).get("state") != "REMOVED":
                remove_placement_group(group)
        except Exception as error:  # already gone, or the cluster is shutting down
            logger.debug("placement group %s: %s", group.id, error)


# -- the leaderboard and summary ------------------------------------------------------------------------------------


def write_search_outcome(
    cfg: MedrayConfig, data_stats: dict, results, *, max_steps: int, concurrency: int, wall_time_s: float
) -> SearchOutcome:
    """Write `leaderboard.csv`, `leaderboard.md`, `best_config.yaml`, `summary.json` and the report."""
    folder = Path(results.experiment_path)
    rows = leaderboard_rows(cfg, results, max_steps)
    best = next((row for row in rows if row["best"] is not None), None)
    write_leaderboard_csv(rows, list(cfg.tune.space), cfg.tune.metric, folder / "leaderboard.csv")
    best_config = write_best_config(cfg, best, max_steps, folder / "best_config.yaml") if best else None
    summary = search_summary(cfg, data_stats, rows, best, max_steps=max_steps, concurrency=concurrency)
    summary.update(
        finished=_all_trials_ended(results),
        best_config=best_config,
        leaderboard={"csv": str(folder / "leaderboard.csv"), "markdown": str(folder / "leaderboard.md")},
        wall_time_s=round(wall_time_s, 2),
    )
    markdown = leaderboard_markdown(cfg, rows, summary)
    (folder / "leaderboard.md").write_text(markdown)
    summary_path = folder / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    summary["report"] = _write_report(folder)
    summary_path.write_text(json.dumps(summary, indent=2))
    if summary["finished"]:
        logger.info("search finished:\n%s", markdown)
    else:
        logger.warning("search interrupted; the same command resumes it. So far:\n%s", markdown)
    return SearchOutcome(search_dir=str(folder), summary_path=str(summary_path), summary=summary, results=results)


def _all_trials_ended(results) -> bool:
    """False when the search was interrupted (Ctrl-C, a stopped job) with trials left to run."""
    try:
        return results.num_terminated + results.num_errors == len(results)
    except AttributeError:  # a plain list of results
        return True


def leaderboard_rows(cfg: MedrayConfig, results, max_steps: int) -> list[dict[str, Any]]:
    """One row per trial, best first; trials with no finite metric (diverged, failed) last."""
    rows = [trial_row(cfg, result, max_steps) for result in results]
    sign = 1 if cfg.tune.mode == "min" else -1
    return sorted(rows, key=lambda row: (row["best"] is None, sign * (row["best"] or 0.0), row["trial"]))


def trial_row(cfg: MedrayConfig, result, max_steps: int) -> dict[str, Any]:
    """A trial's parameters, best metric (with its step and checkpoint), steps run, early stop, wall time."""
    reports = _reports(result)
    metric = cfg.tune.metric
    finite = [report for report in reports if _is_finite_metric(report.get(metric))]
    sign = 1 if cfg.tune.mode == "min" else -1
    best_report = min(finite, key=lambda report: sign * report[metric]) if finite else None
    steps = max((int(report.get("step") or 0) for report in reports), default=0)
    trial_id = result.metrics.get("trial_id") or Path(result.path).name.removeprefix("tune-")
    run_dir = f"{search_dir(cfg)}/trials/{cfg.run.name}-trial-{trial_id}"
    finished_summary = _read_json(Path(run_dir) / "summary.json")
    return {
        "trial": trial_id,
        "params": {key: result.config.get(key) for key in cfg.tune.space},
        "best": best_report[metric] if best_report else None,
        "best_step": int(best_report["step"]) if best_report else None,
        "steps": steps,
        "stopped_early": result.error is None and steps < max_steps,
        "stopped_by": _stopped_by(result, steps, max_steps, finished_summary),
        "wall_time_s": round(float(max((report.get("time_total_s") or 0.0 for report in reports), default=0.0)), 1),
        "error": str(result.error).splitlines()[0] if result.error else None,
        "run_dir": run_dir,
        "best_checkpoint": _best_checkpoint(best_report, finished_summary),
    }


def _reports(result) -> list[dict[str, Any]]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return []
    return frame.to_dict("records")


def _is_finite_metric(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and abs(value) < WORST_METRIC


def _stopped_by(result, steps: int, max_steps: int, finished_summary: dict | None) -> str | None:
    if result.error is not None:
        return "error"
    if steps >= max_steps:
        return None
    # A trial that ended by itself (early-stopping patience) wrote its summary; one that ASHA stopped was ended.
    return "early_stopping_patience" if finished_summary else "scheduler"


def _best_checkpoint(best_report: dict[str, Any] | None, finished_summary: dict | None) -> str | None:
    if finished_summary and finished_summary.get("best_checkpoint"):
        return finished_summary["best_checkpoint"]
    path = (best_report or {}).get("checkpoint_path")
    return f"{path}/checkpoint" if isinstance(path, str) else None


def write_leaderboard_csv(rows: list[dict[str, Any]], keys: list[str], metric: str, path: Path) -> None:
    """`trial,<params...>,best_<metric>,steps,stopped_early,wall_time_s`, one line per trial, best first."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial", *keys, f"best_{metric}", "steps", "stopped_early", "wall_time_s"])
        for row in rows:
            params = [_format_value(row["params"].get(key)) for key in keys]
            best = "nan" if row["best"] is None else f"{row['best']:.6g}"
            writer.writerow([row["trial"], *params, best, row["steps"], row["stopped_early"], row["wall_time_s"]])


def leaderboard_markdown(cfg: MedrayConfig, rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The leaderboard as a Markdown page: the table, then the best trial and how to train with its config."""
    keys = list(cfg.tune.space)
    header = ["rank", "trial", *keys, f"best {cfg.tune.metric}", "steps", "stopped early", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(rows, start=1):
        best = "diverged" if row["best"] is None and not row["error"] else "failed" if row["error"] else ""
        cells = [
            str(rank),
            row["trial"],
            *(_format_value(row["params"].get(key)) for key in keys),
            f"{row['best']:.4f}" if row["best"] is not None else best,
            f"{row['steps']} / {summary['max_steps']}",
            row["stopped_by"] or "no",
            f"{row['wall_time_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    parts = [f"# Search {cfg.run.name}: {len(rows)} trials", "\n".join(lines), _best_paragraph(summary)]
    return "\n\n".join(parts) + "\n"


def _best_paragraph(summary: dict[str, Any]) -> str:
    best = summary["best_trial"]
    if not best:
        return "No trial reported a finite validation metric."
    return (
        f"Best trial `{best['trial']}`: {summary['metric']} {best['best']:.4f} at step {best['best_step']}, "
        f"params {best['params']}.\n\nBest adapter: `{summary['best_checkpoint']}`\n\n"
        f"Train with its config: `medray train --config {summary['best_config']}`\n\n"
        f"Resources held by trials: {summary['resource_seconds']} (resource-seconds)"
    )


def write_best_config(cfg: MedrayConfig, best: dict[str, Any], max_steps: int, path: Path) -> str:
    """The best trial's settings as a preset (overrides of the defaults only) for `medray train --config`."""
    values = cfg.to_dict()
    for key, value in best["params"].items():
        set_dotted(values, key, value)
    values["train"]["max_steps"] = max_steps
    values["run"]["name"] = f"{cfg.run.name}-best"
    values.pop("tune")
    overrides = _changed(values, MedrayConfig().to_dict())
    header = (
        f"# medray train --config {path}\n"
        f"# The best trial ({best['trial']}, {cfg.tune.metric} {best['best']:.4f}) of the search {cfg.run.name}.\n"
    )
    path.write_text(header + yaml.safe_dump(overrides, sort_keys=False))
    return str(path)


def _changed(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    changed = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            inner = _changed(value, default)
            if inner:
                changed[key] = inner
        elif value != default:
            changed[key] = value
    return changed


def search_summary(
    cfg: MedrayConfig,
    data_stats: dict,
    rows: list[dict[str, Any]],
    best: dict | None,
    *,
    max_steps: int,
    concurrency: int,
) -> dict[str, Any]:
    """summary.json of the search: the train job's keys (config, data, metrics, best_checkpoint, steps) + the search."""
    per_trial = resources_per_trial(cfg)
    return {
        "config": cfg.to_dict(),
        "data": data_stats,
        "metric": cfg.tune.metric,
        "mode": cfg.tune.mode,
        "metrics": {"best": {cfg.tune.metric: best["best"], "step": best["best_step"]} if best else {}, "final": {}},
        "best_checkpoint": best["best_checkpoint"] if best else None,
        "best_trial": best,
        "steps": best["steps"] if best else None,
        "max_steps": max_steps,
        "num_trials": len(rows),
        "num_stopped_early": sum(row["stopped_early"] for row in rows),
        "num_errors": sum(row["error"] is not None for row in rows),
        "scheduler": cfg.tune.scheduler,
        "max_concurrent_trials": concurrency,
        "resources_per_trial": per_trial,
        "resource_seconds": {
            name: round(amount * sum(row["wall_time_s"] for row in rows), 1)
            for name, amount in per_trial.items()
            if amount > 0
        },
        "trials": rows,
    }


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_report(folder: Path) -> str | None:
    from medray.report import write_report

    try:
        return str(write_report(folder))
    except Exception as error:  # the leaderboard is already on disk; a broken plot must not lose it
        logger.warning("could not write the report for %s: %s", folder, error)
        return None
