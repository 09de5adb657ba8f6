"""What the report says beyond the loss: the values the run used, a short recipe and the changed keys, warnings
where the numbers mislead, times over every part of a resumed run; and report.html opened in a real headless
Chromium (Debian's `chromium` package), its screenshot showing the loss plot."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_report import color_mask, make_run, read_table, synthetic_history

from medray.contracts import RunSummary, WorkerResult
from medray.driver import mean_train_loss, run_parts
from medray.report import write_report
from medray.report_plot import TRAIN_COLOR, VALIDATION_COLOR

CPU_EFFECTIVE = {
    "backend": "hf",
    "device": "cpu",
    "optimizer": "adamw_torch",
    "precision": "fp32",
    "per_device_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "world_size": 2,
    "rows_per_step": 32,
    "batch_layout": "padded",
    "gradient_checkpointing": True,
}


def test_recipe_shows_the_values_the_run_used(tmp_path):
    markdown = write_report(make_run(tmp_path / "run", synthetic_history(), effective=CPU_EFFECTIVE)).read_text()
    recipe = dict(read_table(markdown, "Recipe"))
    assert recipe["optimizer"] == "adamw_torch (configured: adamw_8bit)"
    assert recipe["precision"] == "fp32 (configured: auto)"
    assert recipe["backend, device"] == "hf (configured: auto), cpu"
    assert recipe["batch"] == "4 x grad-accum 4 x 2 worker(s) = 32 rows per optimizer step (padded)"
    assert recipe["rows"] == "900 training, 100 validation"
    assert 10 <= len(recipe) <= 14
    assert "Ran with: hf on cpu, adamw_torch, fp32, 32 rows per optimizer step" in markdown


def test_changed_keys_only_without_tune_or_unused_hub_keys(tmp_path):
    run = make_run(tmp_path / "run", synthetic_history())
    summary = json.loads((run / "summary.json").read_text())
    summary["config"]["data"]["path"] = "rows.jsonl"
    summary["config"]["tune"]["num_samples"] = 8
    (run / "summary.json").write_text(json.dumps(summary))
    rows = read_table(write_report(run).read_text(), "Changed from the defaults")
    assert rows == [
        ["data.path", "rows.jsonl", "null"],
        ["scaling.num_workers", "2", "1"],
        ["run.name", "report-test", "medray-run"],
    ]


def test_warnings_for_one_validation_row_extra_epochs_and_overlap(tmp_path):
    run = make_run(tmp_path / "run", synthetic_history(), effective=CPU_EFFECTIVE)
    summary = json.loads((run / "summary.json").read_text())
    summary["data"] |= {"rows_train": 640, "rows_validation": 1, "rows_validation_in_train": 1}
    summary["config"]["train"]["max_steps"] = 100
    (run / "summary.json").write_text(json.dumps(summary))
    markdown = write_report(run).read_text()
    section = markdown.split("## Read with care\n", 1)[1].split("\n## ", 1)[0]
    items = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(items) == 3
    assert "mean over 1 row(s)" in items[0]
    assert "train.max_steps=100 made 5.0 passes over the 640 training rows" in items[1]
    assert "1 of the 1 validation rows also appear in the training rows" in items[2]
    assert "## Read with care" not in write_report(make_run(tmp_path / "plain", synthetic_history())).read_text()


def test_a_resumed_run_sums_its_parts_and_averages_the_loss_over_every_step(tmp_path):
    history = [
        {"step": 10, "loss": 3.0, "train_runtime_s": 50.0},
        {"step": 20, "loss": 2.0, "train_runtime_s": 100.0},
        {"step": 30, "loss": 1.0, "train_runtime_s": 40.0},  # the resumed part's clock started again
    ]
    assert mean_train_loss(history) == pytest.approx(2.0)
    # The first part was interrupted (no summary.json): its time comes from the history.
    returned = WorkerResult(global_step=30, resumed_from_step=20, train_runtime_s=41.0)
    parts = run_parts(tmp_path / "summary.json", history, returned, wall_time_s=60.0)
    assert parts == [
        {"from_step": 0, "to_step": 20, "train_runtime_s": 100.0, "wall_time_s": None},
        {"from_step": 20, "to_step": 30, "train_runtime_s": 41.0, "wall_time_s": 60.0},
    ]
    # A first part that finished wrote its summary: its parts are taken as they are.
    RunSummary(steps=20, parts=[parts[0] | {"wall_time_s": 130.0}]).to_json(tmp_path / "summary.json")
    parts = run_parts(tmp_path / "summary.json", history, returned, wall_time_s=60.0)
    assert [part["wall_time_s"] for part in parts] == [130.0, 60.0]
    run = make_run(tmp_path / "run", history, parts=parts, train_runtime_s=141.0, wall_time_s=190.0)
    rows = dict(read_table(write_report(run).read_text(), "Time and GPU memory"))
    assert rows["training time"] == "0:02:21 (141.0 s)"
    assert rows["parts (training resumed; times above are sums)"] == (
        "steps 0-20: 0:01:40 (100.0 s); steps 20-30: 0:00:41 (41.0 s)"
    )


def test_html_report_holds_the_tables_and_the_plot_inline(tmp_path):
    run = make_run(tmp_path / "run", synthetic_history(), effective=CPU_EFFECTIVE)
    write_report(run)
    page = (run / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "<h2>Recipe</h2>" in page
    assert 'src="data:image/png;base64,' in page and 'src="loss.png"' not in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium_with_the_plot(tmp_path):
    run = make_run(tmp_path / "run", synthetic_history(), effective=CPU_EFFECTIVE)
    write_report(run)
    shutil.move(run / "loss.png", tmp_path / "loss-moved.png")  # the page must not need the file beside it
    screenshot = tmp_path / "page.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars"]
    command = ["chromium", *flags, f"--screenshot={screenshot}", "--window-size=1200,4000"]
    result = subprocess.run([*command, (run / "report.html").as_uri()], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and screenshot.is_file(), result.stderr[-2000:]
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (4000, 1200)
    assert (pixels.sum(axis=2) < 600).mean() > 0.01  # text and tables, not a blank page
    # The plot's two curves, decoded from the inline PNG and drawn at their natural width (800 px, max-width 100%).
    train, validation = color_mask(pixels, TRAIN_COLOR), color_mask(pixels, VALIDATION_COLOR)
    assert train.sum() > 500 and validation.sum() > 500
    columns = np.flatnonzero(train.any(axis=0))
    assert columns.max() - columns.min() > 400
