"""The end of a `medray tune` search: leaderboard.csv, leaderboard.md, best_config.yaml, summary.json, report.md.

One row per trial (parameters, best metric with its step and checkpoint, steps run, why it stopped, wall time),
best first; the best trial's settings as a preset for `medray train --config`; a `SearchSummary`. The Markdown
tables use `medray.report.markdown_table`, as every report does.

    outcome = write_search_outcome(cfg, data.stats, tuner.fit(), max_steps=120, concurrency=2, wall_time_s=900.0)
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medray.config import MedrayConfig
from medray.contracts import RunSummary, SearchSummary
from medray.report import markdown_table, write_report_or_warn
from medray.search_space import is_finite_metric, resources_per_trial, search_dir, set_dotted

logger = logging.getLogger(__name__)


@dataclass
class SearchOutcome:
    """What a finished search left behind."""

    search_dir: str
    summary_path: str
    summary: SearchSummary
    results: Any


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
    summary.finished = _all_trials_ended(results)
    summary.best_config = best_config
    summary.leaderboard = {"csv": str(folder / "leaderboard.csv"), "markdown": str(folder / "leaderboard.md")}
    summary.wall_time_s = round(wall_time_s, 2)
    markdown = leaderboard_markdown(cfg, rows, summary)
    (folder / "leaderboard.md").write_text(markdown)
    summary_path = folder / "summary.json"
    summary.to_json(summary_path)
    summary.report = write_report_or_warn(folder)
    summary.to_json(summary_path)
    if summary.finished:
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
    finite = [report for report in reports if is_finite_metric(report.get(metric))]
    sign = 1 if cfg.tune.mode == "min" else -1
    best_report = min(finite, key=lambda report: sign * report[metric]) if finite else None
    steps = max((int(report.get("step") or 0) for report in reports), default=0)
    trial_id = result.metrics.get("trial_id") or Path(result.path).name.removeprefix("tune-")
    run_dir = f"{search_dir(cfg)}/trials/{cfg.run.name}-trial-{trial_id}"
    finished_summary = _read_run_summary(Path(run_dir) / "summary.json")  # written when the trial ran to its end
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


def _stopped_by(result, steps: int, max_steps: int, finished_summary: RunSummary | None) -> str | None:
    if result.error is not None:
        return "error"
    if steps >= max_steps:
        return None
    # A trial that ended by itself (early-stopping patience) wrote its summary; one that ASHA stopped was ended.
    return "early_stopping_patience" if finished_summary else "scheduler"


def _best_checkpoint(best_report: dict[str, Any] | None, finished_summary: RunSummary | None) -> str | None:
    if finished_summary and finished_summary.best_checkpoint:
        return finished_summary.best_checkpoint
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


def leaderboard_markdown(cfg: MedrayConfig, rows: list[dict[str, Any]], summary: SearchSummary) -> str:
    """The leaderboard as a Markdown page: the table, then the best trial and how to train with its config."""
    keys = list(cfg.tune.space)
    header = ["rank", "trial", *keys, f"best {cfg.tune.metric}", "steps", "stopped early", "wall time (s)"]
    table = []
    for rank, row in enumerate(rows, start=1):
        best = "diverged" if row["best"] is None and not row["error"] else "failed" if row["error"] else ""
        cells = [
            str(rank),
            row["trial"],
            *(_format_value(row["params"].get(key)) for key in keys),
            f"{row['best']:.4f}" if row["best"] is not None else best,
            f"{row['steps']} / {summary.max_steps}",
            row["stopped_by"] or "no",
            f"{row['wall_time_s']:.0f}",
        ]
        table.append(cells)
    parts = [f"# Search {cfg.run.name}: {len(rows)} trials", markdown_table(header, table), _best_paragraph(summary)]
    return "\n\n".join(parts) + "\n"


def _best_paragraph(summary: SearchSummary) -> str:
    best = summary.best_trial
    if not best:
        return "No trial reported a finite validation metric."
    return (
        f"Best trial `{best['trial']}`: {summary.metric} {best['best']:.4f} at step {best['best_step']}, "
        f"params {best['params']}.\n\nBest adapter: `{summary.best_checkpoint}`\n\n"
        f"Train with its config: `medray train --config {summary.best_config}`\n\n"
        f"Resources held by trials: {summary.resource_seconds} (resource-seconds)"
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
) -> SearchSummary:
    """summary.json of the search: the fields every summary has (of the best trial) and the search's own."""
    per_trial = resources_per_trial(cfg)
    return SearchSummary(
        config=cfg.to_dict(),
        data=data_stats,
        metric=cfg.tune.metric,
        mode=cfg.tune.mode,
        metrics={"best": {cfg.tune.metric: best["best"], "step": best["best_step"]} if best else {}, "final": {}},
        best_checkpoint=best["best_checkpoint"] if best else None,
        best_trial=best,
        steps=best["steps"] if best else None,
        max_steps=max_steps,
        num_trials=len(rows),
        num_stopped_early=sum(row["stopped_early"] for row in rows),
        num_errors=sum(row["error"] is not None for row in rows),
        scheduler=cfg.tune.scheduler,
        max_concurrent_trials=concurrency,
        resources_per_trial=per_trial,
        resource_seconds={
            name: round(amount * sum(row["wall_time_s"] for row in rows), 1)
            for name, amount in per_trial.items()
            if amount > 0
        },
        trials=rows,
    )


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _read_run_summary(path: Path) -> RunSummary | None:
    try:
        return RunSummary.from_json(path)
    except (OSError, ValueError):
        return None
