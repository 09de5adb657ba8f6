"""Slow tier: a killed driver leaves a stale lock; the same command run again takes it over and resumes to the exact
step (test_reliability.py holds the helpers). A file of its own, so that pytest-xdist runs it beside the other long
reliability test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from test_reliability import REPO, STEPS, checkpoint_steps, cluster_fixture, history_steps, tiny, when_checkpointed

from medray.driver import run_training
from medray.presets import resolve_preset
from medray.scratch import scratch_root

pytestmark = pytest.mark.slow
module_cluster = cluster_fixture()


def test_a_killed_driver_is_resumed_by_the_same_command(cluster, tiny_mistral_dir, tmp_path):
    run_dir = tmp_path / "driver"
    overrides = [f"model.name={tiny_mistral_dir}", f"run.storage_path={tmp_path}", "run.name=driver"]
    overrides += [f"train.max_steps={STEPS}", "train.eval_steps=3", "train.logging_steps=3"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address_info["gcs_address"], "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "medray.cli", "train", "--config", str(resolve_preset("tiny-test")), *overrides]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    when_checkpointed(run_dir, driver.kill).join(600)
    assert driver.wait(30) == -signal.SIGKILL
    lock = json.loads((tmp_path / ".driver.lock").read_text())
    assert lock["pid"] == driver.pid  # the killed driver's lock is left behind
    at_kill = checkpoint_steps(run_dir)
    assert max(at_kill) < STEPS

    outcome = run_training(tiny(tmp_path, tiny_mistral_dir, "driver"))
    assert outcome.summary.resumed_from_step >= max(at_kill)
    assert outcome.summary.steps == STEPS and history_steps(run_dir)[-1] == STEPS
    assert not (tmp_path / ".driver.lock").exists()
    assert not [item.name for item in scratch_root().glob("driver-*")]  # the killed attempt's scratch too
