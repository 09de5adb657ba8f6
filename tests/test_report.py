"""medray.report: report.md's tables read back against the history, loss.png checked pixel by pixel, the GPU and
CPU memory rows, the Tune leaderboard, and the report of a real CPU training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medray.config import MedrayConfig
from medray.report import CPU_RUN, write_report
from medray.report_plot import TRAIN_COLOR, VALIDATION_COLOR

BEST_STEP = 60


def synthetic_history(gpu: bool = False, validation: bool = True) -> list[dict]:
    """100 steps: training loss every 10 falling from 2.5, validation every 20 lowest at step 60, metric fields."""
    history = []
    for step in range(10, 101, 10):
        entry = {"loss": 2.5 - 0.012345 * step, "learning_rate": 2e-4, "grad_norm": 0.9, "step": step}
        entry |= {
            "train_runtime_s": 3.0 * step,
            "tokens_per_s_avg": 1500.0 + step,
            "mfu": 0.1,
            "rss_gb": 3.0 + step / 100,
        }
        if gpu:
            entry |= {"gpu_total_gb": 80.0, "gpu_mem_reserved_before_gb": 6.0, "gpu_mem_reserved_before_pct": 7.5}
            entry |= {"gpu_peak_reserved_gb": 30.0, "gpu_peak_reserved_pct": 37.5, "gpu_lora_mem_gb": 24.0}
            entry |= {"gpu_lora_mem_pct": 30.0, "gpu_util_pct": 90.0 + step / 10, "gpu_power_w": 500.0}
        history.append(entry)
        if validation and step % 20 == 0:
            history.append(
                {"eval_loss": 2.0 - 0.01 * step + (0.02 * (step - BEST_STEP) if step > BEST_STEP else 0), "step": step}
            )
    history.append({"train_runtime": 301.5, "train_loss": 1.9, "step": 100, "train_runtime_s": 301.5})
    return history


def make_run(folder: Path, history: list[dict], **summary_fields) -> Path:
    """A run folder holding summary.json (a real config, two workers) and history.json."""
    config = MedrayConfig.from_dict({"run": {"name": "report-test"}, "scaling": {"num_workers": 2}}).to_dict()
    summary = {"config": config, "data": {"rows_train": 900, "rows_validation": 100}, "steps": 100, "world_size": 2}
    summary |= {"train_runtime_s": 301.5, "wall_time_s": 340.0} | summary_fields
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "history.json").write_text(json.dumps(history))
    return folder


def read_table(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after `## heading`, as lists of cell texts."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def loss_rows(markdown: str) -> list[tuple[int, float | None, float | None]]:
    def number(cell: str) -> float | None:
        cell = cell.replace("**", "").replace("★", "").strip()
        return float(cell) if cell else None

    table = read_table(markdown, "Training and validation loss")
    return [(int(step), number(train), number(validation)) for step, train, validation in table]


def expected_losses(history: list[dict]) -> list[tuple[int, float | None, float | None]]:
    train = {entry["step"]: round(entry["loss"], 4) for entry in history if "loss" in entry}
    validation = {entry["step"]: round(entry["eval_loss"], 4) for entry in history if "eval_loss" in entry}
    return [(step, train.get(step), validation.get(step)) for step in sorted(train.keys() | validation.keys())]


def test_loss_table_equals_the_history_step_for_step_and_marks_the_best(tmp_path):
    history = synthetic_history()
    report = write_report(make_run(tmp_path / "run", history))
    markdown = report.read_text()
    assert report == tmp_path / "run" / "report.md"
    assert loss_rows(markdown) == expected_losses(history)
    starred = [row for row in read_table(markdown, "Training and validation loss") if "★" in row[2]]
    assert [row[0] for row in starred] == [str(BEST_STEP)] and starred[0][2].startswith("**")
    assert "Best validation loss: 1.4000 at step 60" in markdown


def color_mask(image: np.ndarray, color: str, tolerance: int = 40) -> np.ndarray:
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    return np.abs(image[:, :, :3].astype(int) - rgb).sum(axis=2) < tolerance


def test_loss_png_shows_a_falling_training_curve_and_the_validation_curve(tmp_path):
    write_report(make_run(tmp_path / "run", synthetic_history()))
    png = tmp_path / "run" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (800, 500)
        pixels = np.asarray(image.convert("RGB"))
    train, validation = color_mask(pixels, TRAIN_COLOR), color_mask(pixels, VALIDATION_COLOR)
    assert train.sum() > 500 and validation.sum() > 500
    for mask in (train, validation):
        columns = np.flatnonzero(mask.any(axis=0))
        assert columns.max() - columns.min() > 400  # a curve across the plot, not only a legend swatch
    # Image rows grow downwards: the falling training loss starts high (small row) and ends low (large row).
    columns = np.flatnonzero(train.any(axis=0))
    first, last = columns[columns < columns.min() + 40], columns[columns > columns.max() - 40]
    assert np.flatnonzero(train[:, first].any(axis=1)).mean() < np.flatnonzero(train[:, last].any(axis=1)).mean()


def test_loss_png_without_evaluations_has_no_validation_colour(tmp_path):
    write_report(make_run(tmp_path / "run", synthetic_history(validation=False)))
    pixels = np.asarray(Image.open(tmp_path / "run" / "loss.png").convert("RGB"))
    assert color_mask(pixels, TRAIN_COLOR).sum() > 500
    assert color_mask(pixels, VALIDATION_COLOR).sum() == 0
    assert "★" not in (tmp_path / "run" / "report.md").read_text()


def test_cpu_run_time_and_memory_table(tmp_path):
    markdown = write_report(make_run(tmp_path / "run", synthetic_history())).read_text()
    rows = dict(read_table(markdown, "Time and GPU memory"))
    assert rows["training time"] == "0:05:02 (301.5 s)"
    assert rows["job wall time (data preparation included)"] == "0:05:40 (340.0 s)"
    assert rows["tokens/s, all workers (run average)"] == "1600"
    assert rows["tokens/s per worker (run average)"] == "800"
    assert rows["MFU (mean of the logged values)"] == "10.0%"
    assert rows["peak process RSS (rank 0)"] == "4.00 GB"
    for name in ("GPU memory", "peak reserved GPU memory", "memory for LoRA training", "base model memory"):
        assert rows[name] == CPU_RUN


def test_gpu_run_memory_rows_in_gb_and_percent(tmp_path):
    markdown = write_report(make_run(tmp_path / "run", synthetic_history(gpu=True))).read_text()
    rows = dict(read_table(markdown, "Time and GPU memory"))
    assert rows["GPU memory"] == "80.000 GB"
    assert rows["peak reserved GPU memory"] == "30.000 GB (37.5 % of the GPU's memory)"
    assert rows["memory for LoRA training (peak - base model)"] == "24.000 GB (30.0 % of the GPU's memory)"
    assert rows["base model memory (reserved before training)"] == "6.000 GB (7.5 % of the GPU's memory)"
    assert rows["GPU utilisation (mean of the logged values)"] == "96 %"
    assert rows["GPU power (mean of the logged values)"] == "500 W"


def test_changed_keys_table_names_each_changed_key_once_and_cuts_long_values(tmp_path):
    run = make_run(tmp_path / "run", synthetic_history())
    summary = json.loads((run / "summary.json").read_text())
    summary["config"]["data"]["template"] = "### Q\n{question}\n" * 20
    (run / "summary.json").write_text(json.dumps(summary))
    rows = {row[0]: row[1:] for row in read_table(write_report(run).read_text(), "Changed from the defaults")}
    assert set(rows) == {"data.template", "scaling.num_workers", "run.name"}
    assert rows["scaling.num_workers"] == ["2", "1"] and rows["run.name"] == ["report-test", "medray-run"]
    assert rows["data.template"][0].endswith("characters, see summary.json)") and "\n" not in rows["data.template"][0]


def test_tune_leaderboard_is_a_fourth_table(tmp_path):
    run = make_run(tmp_path / "search", synthetic_history())
    (run / "leaderboard.csv").write_text(
        "rank,trial,train.learning_rate,eval_loss\n1,trial_b,0.0001,1.21\n2,trial_a,0.0003,1.35\n"
    )
    markdown = write_report(run).read_text()
    assert markdown.index("## Time and GPU memory") < markdown.index("## Tune leaderboard")
    assert read_table(markdown, "Tune leaderboard") == [
        ["1", "trial_b", "0.0001", "1.21"],
        ["2", "trial_a", "0.0003", "1.35"],
    ]


def test_a_folder_without_run_files_is_an_error_that_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no summary.json, history.json or leaderboard.csv"):
        write_report(tmp_path)


def test_report_of_a_real_cpu_training_run(tiny_mistral_dir, tmp_path):
    from test_metrics import MAX_STEPS, train_tiny

    from medray.metrics import TrainingMetricsCallback

    history = train_tiny(tiny_mistral_dir, tmp_path / "out", TrainingMetricsCallback("cpu-run")).state.log_history
    markdown = write_report(make_run(tmp_path / "run", history, world_size=1)).read_text()
    assert loss_rows(markdown) == expected_losses(history)
    assert [row[0] for row in loss_rows(markdown)] == list(range(1, MAX_STEPS + 1))
    rows = dict(read_table(markdown, "Time and GPU memory"))
    assert float(rows["tokens/s, all workers (run average)"]) > 0
    assert rows["peak reserved GPU memory"] == CPU_RUN
    with Image.open(tmp_path / "run" / "loss.png") as image:
        assert image.size == (800, 500)
