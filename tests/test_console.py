"""What a person sees: `medray train` through the real CLI (a subprocess) on the tiny model, its console counted line by
line: no bytecode, no raw TrainingReport dicts, each `[medray]` line once, one line per log, evaluation and checkpoint,
and few lines in all. The same run's report.html is then opened in a real headless Chromium."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import pytest

pytestmark = pytest.mark.slow

MAX_STEPS, EVAL_STEPS = 6, 3  # the tiny-test preset; a log every step
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Other Ray clusters on the same machine (parallel test sessions) make Ray Train's PlacementGroupCleaner fail to
# find its own cluster and print a traceback; that cannot happen with one cluster, as in CI or a person's run.
MULTI_CLUSTER = "Found multiple active Ray instances"


@pytest.fixture(scope="module")
def cli_run(tiny_mistral_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("console")
    command = [sys.executable, "-m", "medray", "train", "--config", "tiny-test", f"model.name={tiny_mistral_dir}"]
    command += [f"run.storage_path={folder}", "run.name=console"]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MEDRAY_VERBOSE", "RAY_DATA_LOG"))}
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout
    return folder / "console", [ANSI.sub("", line) for line in result.stdout.splitlines()]


def test_console_has_no_bytecode_and_no_raw_reports(cli_run):
    _, lines = cli_run
    for marker in ("LOAD_", "COPY_FREE_VARS", "RETURN_GENERATOR", "TrainingReport(", "Reporting training result"):
        assert not [line for line in lines if marker in line], marker


def test_each_medray_line_once_one_per_log_evaluation_and_checkpoint(cli_run):
    _, lines = cli_run
    medray = [line.split("[medray] ", 1)[1] for line in lines if "[medray] " in line]
    assert [text for text, count in Counter(medray).items() if count > 1] == []
    steps = [text for text in medray if re.match(r"step \d+/6 \(\d+%\) \| loss ", text)]
    evaluations = [text for text in medray if "| eval_loss " in text]
    checkpoints = [text for text in medray if text.endswith("| checkpoint saved")]
    assert len(steps) == MAX_STEPS
    assert len(evaluations) == len(checkpoints) == MAX_STEPS // EVAL_STEPS
    assert [text for text in medray if "train_loss" in text] == [medray[-1]]  # the trainer's final summary
    assert medray[0].startswith("Ray ")


def test_console_is_short(cli_run):
    run_dir, lines = cli_run
    if any(MULTI_CLUSTER in line for line in lines):
        lines = [line for line in lines if not line.startswith("(PlacementGroupCleaner")]
    medray = [line for line in lines if "[medray] " in line]
    assert lines[-1] == f"summary: {run_dir / 'summary.json'}"
    assert f"Best checkpoint: {run_dir}" in "\n".join(lines[-4:])
    # The [medray] lines, the summary block (5 lines + `summary:`), and a handful of Ray's own warnings.
    others = [line for line in lines if line not in medray]
    assert len(others) <= 15, "\n".join(others)
    assert len(lines) <= 35


def test_summary_records_what_the_run_used(cli_run):
    import json

    run_dir, _ = cli_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["effective"]["optimizer"] == "adamw_torch"  # the preset's adamw_8bit needs CUDA
    assert summary["effective"]["device"] == "cpu" and summary["effective"]["precision"] == "fp32"
    assert summary["effective"]["rows_per_step"] == 4  # batch 2 x grad-accum 2 x 1 worker
    assert [(part["from_step"], part["to_step"]) for part in summary["parts"]] == [(0, MAX_STEPS)]
    assert summary["parts"][0]["train_runtime_s"] > 0
    assert summary["train_runtime_s"] == pytest.approx(summary["parts"][0]["train_runtime_s"], abs=0.01)
    assert "adamw_torch (configured: adamw_8bit)" in (run_dir / "report.html").read_text()
