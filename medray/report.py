"""A finished run's folder -> `report.md` (Markdown tables), `loss.png` (training and validation loss by step) and
`report.html` (the same report as one page, the plot inline). This module assembles the Markdown; the plot is drawn
by `medray.report_plot`, the page by `medray.report_html`, the "Read with care" warnings come from
`medray.report_warnings`.

The report holds, like the reference notebook's closing cells: the recipe with the values the run used (optimizer,
precision, backend, device, batch layout) and the keys changed from the defaults; warnings where the numbers
mislead (few validation rows, more passes than the configured epochs, validation rows also in training); training
and validation loss at every logged step, the best validation loss marked; training time (summed over the parts of a
resumed run), throughput and GPU memory (peak reserved, reserved by the base model before training, added by LoRA
training, each also as a % of the GPU's memory); and, for a Ray Tune search whose folder holds `leaderboard.csv`,
the leaderboard.

It reads only files of the run folder: `summary.json` and `history.json` (see docs/architecture.md), whose entries
carry the fields of `medray.metrics.TrainingMetricsCallback`. The driver writes the report at the end of every run;
`medray report RUN_DIR` writes it again.

    path = write_report("~/medray_results/medray-demo")   # -> .../medray-demo/report.md, next to loss.png
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
from pathlib import Path
from typing import Any

from medray.contracts import RunSummary, SearchSummary, read_summary
from medray.report_html import render_html
from medray.report_plot import best_validation, losses_by_step, plot_losses
from medray.report_warnings import warnings_section

logger = logging.getLogger(__name__)

LONGEST_VALUE = 100
CPU_RUN = "n/a (CPU run)"


def write_report(run_dir: str | Path, location: str | None = None) -> Path:
    """Write `report.md`, `loss.png` and `report.html` (the same report, the plot inline) into a run folder.

    Args:
        run_dir: The run folder (`{run.storage_path}/{run.name}`) or a Tune search folder.
        location: Where the report says the run is, when `run_dir` is a local copy (of a folder in object storage).

    Returns:
        The path of `report.md`.

    Raises:
        FileNotFoundError: The folder holds none of `summary.json`, `history.json`, `leaderboard.csv`.
    """
    run_dir = Path(run_dir).expanduser()
    summary_file = run_dir / "summary.json"
    summary = read_summary(summary_file) if summary_file.is_file() else None
    history = _read_json(run_dir / "history.json", default=[])
    leaderboard = _read_csv(run_dir / "leaderboard.csv")
    if not (summary or history or leaderboard):
        raise FileNotFoundError(
            f"{run_dir} holds no summary.json, history.json or leaderboard.csv; pass the folder of a finished run"
        )
    summary = summary or RunSummary()
    plot = plot_losses(history, run_dir / "loss.png", title=_run_name(summary, run_dir))
    report = run_dir / "report.md"
    markdown_text = render_report(summary, history, leaderboard, run_dir, location=location)
    report.write_text(markdown_text)
    report.with_suffix(".html").write_text(render_html(markdown_text, plot, title=_run_name(summary, run_dir)))
    return report


def write_report_or_warn(run_dir: str | Path, location: str | None = None) -> str | None:
    """`write_report`, for the end of a run or search: a failure is logged and gives None, since the summary and
    leaderboard are already on disk and a broken plot must not lose them."""
    try:
        return str(write_report(run_dir, location=location))
    except Exception as error:
        logger.warning("could not write the report for %s: %s", run_dir, error)
        return None


def render_report(
    summary: RunSummary | SearchSummary,
    history: list[dict],
    leaderboard: list[dict[str, str]],
    run_dir: Path,
    location: str | None = None,
) -> str:
    """The Markdown text of the report."""
    sections = [
        f"# medray report: {_run_name(summary, run_dir)}",
        _overview(summary, history, location or run_dir),
        *warnings_section(summary),
        "## Recipe",
        recipe_table(summary),
        "## Changed from the defaults",
        changed_table(summary.config),
        "## Training and validation loss",
        "![training and validation loss](loss.png)",
        loss_table(history),
        "## Time and GPU memory",
        markdown_table(["figure", "value"], time_and_memory_rows(summary, history)),
    ]
    eos_stop = (getattr(summary, "evaluation", None) or {}).get("eos_stop")
    if eos_stop:
        sections += ["## Stopping at EOS", eos_stop_table(eos_stop)]
    if summary.evaluation:
        sections += ["## Model quality", model_quality_table(summary.evaluation)]
    if leaderboard:
        sections += [
            "## Tune leaderboard",
            markdown_table(list(leaderboard[0]), [list(row.values()) for row in leaderboard]),
        ]
    return "\n\n".join(sections) + "\n"


def _overview(summary: RunSummary | SearchSummary, history: list[dict], run_dir: Path | str) -> str:
    """One paragraph: where the run is, its steps and best validation loss, its data."""
    lines = [f"Run folder: `{run_dir}`"]
    if summary.steps is not None:
        lines.append(f"Optimizer steps: {summary.steps}")
    best = best_validation(history)
    if best is not None:
        lines.append(f"Best validation loss: {best[1]:.4f} at step {best[0]}")
    data = summary.data
    if "rows_train" in data:
        lines.append(f"Rows: {data['rows_train']} training, {data.get('rows_validation', 0)} validation")
    for source in data.get("sources") or []:
        lines.append(
            f"Source {source['name']} ({source['row_format']} rows, weight {source['weight']:g}): "
            f"{source['rows_read']} read, {source['rows_train']} training, {source['rows_validation']} validation"
        )
    if data.get("rows_dropped_cut_in_prompt"):
        lines.append(f"Dropped (cut before the answer by data.max_length): {data['rows_dropped_cut_in_prompt']} rows")
    if summary.best_checkpoint:
        lines.append(f"Best checkpoint: `{summary.best_checkpoint}`")
    effective = getattr(summary, "effective", None) or {}
    if effective:
        lines.append(
            f"Ran with: {effective.get('backend')} on {effective.get('device')}, {effective.get('optimizer')}, "
            f"{effective.get('precision')}, {effective.get('rows_per_step')} rows per optimizer step"
        )
    return "  \n".join(lines)


def eos_stop_table(eos_stop: dict[str, Any]) -> str:
    """Base vs tuned: answers that ended with EOS before `max_new_tokens` (`medray generate --eos-check`)."""
    rows = [
        [
            name,
            f"{counts['stopped']} / {counts['total']}",
            f"{100 * counts['stopped'] / max(counts['total'], 1):.0f} %",
            "–" if counts.get("median_tokens_when_stopped") is None else str(counts["median_tokens_when_stopped"]),
        ]
        for name, counts in (("base", eos_stop["base"]), ("tuned", eos_stop["tuned"]))
    ]
    where = "held-out rows" if eos_stop.get("rows") == "held-out" else "rows"
    return (
        f"Greedy answers to the run's {where} that ended with EOS within {eos_stop['max_new_tokens']} new tokens.\n\n"
        + markdown_table(["model", "ended with EOS", "share", "median new tokens when it ended"], rows)
    )


def recipe_table(summary: RunSummary | SearchSummary) -> str:
    """The recipe in a dozen rows, with the values the run used where they differ from the configured ones."""
    config = summary.config
    if not config:
        return "No configuration: the folder holds no summary.json."
    model, lora, data, train = (config.get(key, {}) for key in ("model", "lora", "data", "train"))
    effective = getattr(summary, "effective", None) or {}
    workers = effective.get("world_size") or config.get("scaling", {}).get("num_workers", 1)
    batch, accumulation = train.get("per_device_batch_size"), train.get("gradient_accumulation_steps")
    stats = summary.data or {}
    rows = [
        ["model", model.get("name")],
        ["data", _data_source(data)],
        ["rows", f"{stats.get('rows_train', 'n/a')} training, {stats.get('rows_validation', 'n/a')} validation"],
        [
            "LoRA",
            f"r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
            f"{len(lora.get('target_modules') or [])} target modules",
        ],
        ["max length", f"{data.get('max_length')} tokens ({data.get('overlong')} longer samples)"],
        [
            "batch",
            f"{batch} x grad-accum {accumulation} x {workers} worker(s) = {batch * accumulation * workers} "
            f"rows per optimizer step" + (f" ({effective['batch_layout']})" if effective.get("batch_layout") else ""),
        ],
        [
            "learning rate",
            f"{train.get('learning_rate')} ({train.get('lr_scheduler')}, warmup {train.get('warmup_steps')} steps)",
        ],
        ["optimizer", _used(effective.get("optimizer"), train.get("optim"))],
        ["precision", _used(effective.get("precision"), train.get("precision"))],
        ["steps", _steps(train, summary)],
        [
            "evaluation",
            f"every {train.get('eval_steps')} steps, early stopping patience {train.get('early_stopping_patience')}",
        ],
        [
            "backend, device",
            f"{_used(effective.get('backend'), model.get('backend'))}, {effective.get('device', 'n/a')}",
        ],
    ]
    return markdown_table(["", "value"], [[name, str(value)] for name, value in rows])


def changed_table(config: dict[str, Any]) -> str:
    """The keys whose values differ from medray's defaults (`tune.*` and unused data sources left out)."""
    from medray.config import MedrayConfig

    if not config:
        return "No configuration: the folder holds no summary.json."
    defaults = dict(config_rows(MedrayConfig().to_dict()))
    data = config.get("data", {})
    unused = ("data.hub_id", "data.hub_config", "data.hub_split") if data.get("path") or data.get("sources") else ()
    rows = [
        [key, _cell(value), _cell(defaults.get(key))]
        for key, value in config_rows(config)
        if not key.startswith("tune.") and key not in unused and (key not in defaults or defaults[key] != value)
    ]
    return markdown_table(["key", "value", "default"], rows) if rows else "Every key has its default value."


def _data_source(data: dict[str, Any]) -> str:
    if data.get("sources"):
        return ", ".join(str(source.get("path") or source.get("hub_id")) for source in data["sources"])
    if data.get("path"):
        return str(data["path"])
    return f"{data.get('hub_id')} ({data.get('hub_config')}, {data.get('hub_split')})"


def _used(effective: Any, configured: Any) -> str:
    if effective is None:
        return str(configured)
    return str(effective) if effective == configured else f"{effective} (configured: {configured})"


def _steps(train: dict[str, Any], summary: RunSummary | SearchSummary) -> str:
    ran = f"{summary.steps} optimizer steps" if summary.steps is not None else "n/a"
    if train.get("max_steps", -1) > 0:
        return f"{ran} (train.max_steps={train['max_steps']})"
    return f"{ran} ({train.get('num_epochs')} epoch(s))"


def config_rows(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten a nested config dict into (`section.key`, value) rows, in the config's order."""
    rows: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += config_rows(value, prefix=f"{name}.")
        else:
            rows.append((name, value))
    return rows


def loss_table(history: list[dict]) -> str:
    """Markdown table step | training loss | validation loss, the best validation loss in bold with a star."""
    rows = losses_by_step(history)
    if not rows:
        return "No loss was logged (fewer steps than `train.logging_steps`?)."
    best = best_validation(history)
    cells = []
    for step, train, validation in rows:
        validation_cell = _loss(validation)
        if best is not None and step == best[0]:
            validation_cell = f"**{validation_cell}** ★"
        cells.append([str(step), _loss(train), validation_cell])
    table = markdown_table(["step", "training loss", "validation loss"], cells)
    return table if best is None else f"{table}\n\n★ lowest validation loss"


def time_and_memory_rows(summary: RunSummary | SearchSummary, history: list[dict]) -> list[list[str]]:
    """Rows of the time, throughput and memory table; GPU rows say "n/a (CPU run)" when no GPU figure was logged."""
    last = _last_values(history)
    # A search's summary has no world size or training time of its own: they come from the config and history.
    world_size = getattr(summary, "world_size", None) or summary.config.get("scaling", {}).get("num_workers", 1)
    runtime = getattr(summary, "train_runtime_s", None) or last.get("train_runtime") or last.get("train_runtime_s")
    rows = [
        ["training time", _duration(runtime)],
        ["job wall time (data preparation included)", _duration(summary.wall_time_s)],
        *_parts_rows(getattr(summary, "parts", None) or []),
        ["workers", str(world_size)],
        ["tokens/s, all workers (run average)", _number(last.get("tokens_per_s_avg"), ".0f")],
        ["tokens/s per worker (run average)", _number(_divide(last.get("tokens_per_s_avg"), world_size), ".0f")],
        ["MFU (mean of the logged values)", _number(_mean(history, "mfu"), ".1%")],
        ["peak process RSS (rank 0)", _number(_max(history, "rss_gb"), ".2f", " GB")],
    ]
    return rows + gpu_rows(history, last)


def _parts_rows(parts: list[dict[str, Any]]) -> list[list[str]]:
    """With a resume: the run's parts, since the times above are their sums."""
    if len(parts) < 2:
        return []
    text = "; ".join(
        f"steps {part['from_step']}-{part['to_step']}: {_duration(part.get('train_runtime_s'))}" for part in parts
    )
    return [["parts (training resumed; times above are sums)", text]]


def gpu_rows(history: list[dict], last: dict[str, Any]) -> list[list[str]]:
    """Rank 0's GPU: total memory, base-model, peak and LoRA-training memory (GB and %), NVML means."""
    if "gpu_peak_reserved_gb" not in last:
        names = ["GPU memory", "peak reserved GPU memory", "memory for LoRA training", "base model memory"]
        return [[name, CPU_RUN] for name in names]

    def memory(field: str) -> str:
        return f"{last[f'{field}_gb']:.3f} GB ({last[f'{field}_pct']:.1f} % of the GPU's memory)"

    return [
        ["GPU memory", f"{last['gpu_total_gb']:.3f} GB"],
        ["peak reserved GPU memory", memory("gpu_peak_reserved")],
        ["memory for LoRA training (peak - base model)", memory("gpu_lora_mem")],
        ["base model memory (reserved before training)", memory("gpu_mem_reserved_before")],
        ["GPU utilisation (mean of the logged values)", _number(_mean(history, "gpu_util_pct"), ".0f", " %")],
        ["GPU power (mean of the logged values)", _number(_mean(history, "gpu_power_w"), ".0f", " W")],
    ]


def model_quality_table(evaluation: dict[str, Any]) -> str:
    """Markdown table benchmark | figure | one column per model (base, tuned, ...), from summary.json `evaluation`.

    Benchmarks whose entry has a `models` mapping are shown: loss and perplexity, accuracy with its 95 % interval,
    the share of unparsable answers; other entries are left to their own sections.
    """
    benchmarks = {name: entry for name, entry in evaluation.items() if isinstance(entry, dict) and entry.get("models")}
    models = list(dict.fromkeys(model for entry in benchmarks.values() for model in entry["models"]))
    rows = []
    for name, entry in benchmarks.items():
        label = QUALITY_LABELS.get(name, name)
        size = entry.get("questions") or entry.get("rows")
        label = f"{label} ({size} {'questions' if 'questions' in entry else 'rows'})" if size else label
        for figure, render in QUALITY_FIGURES:
            cells = [render(entry["models"].get(model) or {}) for model in models]
            if any(cell != "" for cell in cells):
                rows.append([label, figure, *cells])
    if not rows:
        return "No benchmark results."
    notes = "Accuracy: share correct [95 % Wilson interval]. Unparsable: generated answers that named no option."
    return markdown_table(["benchmark", "figure", *models], rows) + f"\n\n{notes}"


def _accuracy_cell(results: dict[str, Any]) -> str:
    if "accuracy" not in results:
        return ""
    low, high = results["ci95"]
    return f"{results['accuracy']:.1%} [{low:.1%}, {high:.1%}]"


QUALITY_LABELS = {
    "validation": "held-out validation split",
    "medqa_loglik": "MedQA 4-option, log-likelihood",
    "medqa_generation": "MedQA 4-option, generation",
}
QUALITY_FIGURES = [
    ("loss", lambda results: _number(results.get("loss"), ".4f") if "loss" in results else ""),
    ("perplexity", lambda results: _number(results.get("perplexity"), ".2f") if "perplexity" in results else ""),
    ("accuracy", _accuracy_cell),
    ("unparsable", lambda results: f"{results['unparsable_share']:.1%}" if "unparsable_share" in results else ""),
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; `|` and line breaks inside cells are escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_escape(str(cell)) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def _cell(value: Any) -> str:
    """A config value for a table cell: lists joined, None and {} as in JSON, long text cut (see summary.json)."""
    if isinstance(value, list):
        text = ", ".join(map(str, value))
    elif value is None or value == {}:
        text = json.dumps(value)
    else:
        text = str(value)
    if len(text) > LONGEST_VALUE:
        text = f"{text[:LONGEST_VALUE]}… ({len(text)} characters, see summary.json)"
    return text


def _loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _number(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{datetime.timedelta(seconds=round(seconds))} ({seconds:.1f} s)"


def _divide(value: float | None, by: int) -> float | None:
    return None if value is None else value / max(1, by)


def _last_values(history: list[dict]) -> dict[str, Any]:
    """Every field's latest value over the history."""
    last: dict[str, Any] = {}
    for entry in history:
        last.update(entry)
    return last


def _values(history: list[dict], field: str) -> list[float]:
    return [entry[field] for entry in history if isinstance(entry.get(field), (int, float))]


def _mean(history: list[dict], field: str) -> float | None:
    values = _values(history, field)
    return sum(values) / len(values) if values else None


def _max(history: list[dict], field: str) -> float | None:
    values = _values(history, field)
    return max(values) if values else None


def _run_name(summary: RunSummary | SearchSummary, run_dir: Path) -> str:
    return summary.config.get("run", {}).get("name") or run_dir.name


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def summary_lines(run_dir: str | Path) -> list[str]:
    """The report's overview as plain lines (what `medray train` and `medray report` print)."""
    run_dir = Path(run_dir).expanduser()
    summary_file = run_dir / "summary.json"
    summary = read_summary(summary_file) if summary_file.is_file() else RunSummary()
    history = _read_json(run_dir / "history.json", default=[])
    return _overview(summary, history, run_dir).replace("`", "").split("  \n")
