"""The tuned CPU demo model learned to stop (issue 11 §1): trained as the default job (`cpu-demo`:
SmolLM2-135M-Instruct, LoRA, the loss on the reasoning, answer and EOS, `train.loss_on=completion`), it ends its greedy
answers to the run's held-out rows with EOS well before `max_new_tokens` on more rows than the base model does. A
count over the rows, recorded in `summary.json` (`evaluation.eos_stop`) and in the report's "Stopping at EOS" table.

The run is the default job unchanged (20 steps; about 2-3 minutes on 2 idle cores), the check generates for all 10
held-out rows in one batch. `MEDRAY_DEMO_RUN=<folder of a finished default run>` copies that run instead of
training (a local shortcut; the assertions are the same). Measured on the default run: base 1/10, tuned 7/10
(docs/evaluation.md).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from medray.cli import main

pytestmark = pytest.mark.slow

ROWS, MAX_NEW_TOKENS = 10, 256  # every held-out row of the demo data (96 rows, 10 % held out)


@pytest.fixture(scope="module")
def demo_run_dir(tmp_path_factory, request) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "medray-demo"
    if os.environ.get("MEDRAY_DEMO_RUN"):
        shutil.copytree(os.environ["MEDRAY_DEMO_RUN"], folder)
        return folder
    request.getfixturevalue("ray_local")
    from medray.config import load_config
    from medray.driver import run_training

    cfg = load_config("cpu-demo", [f"run.storage_path={folder.parent}", "run.name=medray-demo"])
    assert cfg.train.loss_on == "completion"  # the default this test is about
    return Path(run_training(cfg).run_dir)


def test_tuned_model_ends_with_eos_more_often_than_base(demo_run_dir, capsys):
    args = ["--eos-check", "--limit", str(ROWS), "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", str(ROWS)]
    assert main(["generate", str(demo_run_dir), *args]) == 0
    out = capsys.readouterr().out
    check = json.loads((demo_run_dir / "summary.json").read_text())["evaluation"]["eos_stop"]
    print(json.dumps(check))
    assert check["max_new_tokens"] == MAX_NEW_TOKENS and check["rows"] == "held-out"
    base, tuned = check["base"], check["tuned"]
    assert base["total"] == tuned["total"] == ROWS
    assert tuned["stopped"] > base["stopped"]
    assert tuned["stopped"] >= ROWS // 2
    assert tuned["median_tokens_when_stopped"] <= MAX_NEW_TOKENS * 3 // 4  # well before the limit
    report = (demo_run_dir / "report.md").read_text()
    assert "## Stopping at EOS" in report
    assert f"| tuned | {tuned['stopped']} / {ROWS} |" in report and f"| base | {base['stopped']} / {ROWS} |" in report
    expected = f"base {base['stopped']}/{ROWS}, tuned {tuned['stopped']}/{ROWS}"
    assert f"ended with EOS within {MAX_NEW_TOKENS} tokens on held-out rows: {expected}" in out
