"""Slow tier: a run survives killed workers (test_reliability.py says what the reliability tests cover, and holds
their helpers). A file of its own, so that pytest-xdist runs it beside the other long reliability test.

- A worker killed with run.max_failures=0 ends the run in one line; the same command with max_failures=1 resumes
  from the checkpoint, survives a second worker kill, and ends at exactly train.max_steps; a run started meanwhile
  on the same folder is refused at once; the finished run is not trained again; a changed model is refused.
- No secret from the environment reaches any file of a run or of Ray's session folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_reliability import (
    SECRETS,
    STEPS,
    checkpoint_steps,
    cluster_fixture,
    history_steps,
    kill_a_train_worker,
    tiny,
    when_checkpointed,
)

from medray.driver import run_training
from medray.failures import RunFailedError
from medray.runfolder import ResumeError
from medray.runlock import RunLockedError
from medray.scratch import scratch_root

pytestmark = pytest.mark.slow
module_cluster = cluster_fixture()


def test_worker_deaths_resume_and_the_run_folder_is_guarded(cluster, tiny_mistral_dir, tmp_path):
    run_dir = tmp_path / "killed"
    # 1. No restarts allowed: a killed worker ends the run with one line, after its first checkpoint.
    killed = []
    watcher = when_checkpointed(run_dir, lambda: killed.append(kill_a_train_worker()))
    with pytest.raises(RunFailedError) as failure:
        run_training(tiny(tmp_path, tiny_mistral_dir, "killed", "run.max_failures=0"))
    watcher.join(5)
    assert killed, "the run ended before a worker could be killed"
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"training in {run_dir} stopped (run.max_failures=0: no restart): a worker process died")
    first_checkpoints = checkpoint_steps(run_dir)
    assert first_checkpoints and max(first_checkpoints) < STEPS

    # 2. The same command with one restart allowed: it resumes from that checkpoint; a second kill is absorbed; a
    # run started meanwhile on the same folder is refused at once.
    refused = []

    def kill_and_collide():
        kill_a_train_worker()
        try:
            run_training(tiny(tmp_path, tiny_mistral_dir, "killed"))
        except RunLockedError as error:
            refused.append(str(error))

    watcher = when_checkpointed(run_dir, kill_and_collide, after_step=max(first_checkpoints))
    outcome = run_training(tiny(tmp_path, tiny_mistral_dir, "killed", "run.max_failures=1"))
    watcher.join(60)
    assert refused and f"run folder {run_dir} is in use by another medray run (pid {os.getpid()}" in refused[0]
    summary = outcome.summary
    assert summary.steps == STEPS and history_steps(run_dir)[-1] == STEPS
    assert summary.resumed_from_step > max(first_checkpoints)  # the second kill's restart resumed, mid-run
    assert Path(summary.best_checkpoint, "adapter_model.safetensors").is_file()

    # 3. Nothing is left in local scratch, and no secret reached a file of the run or of Ray's session folder.
    assert not [item.name for item in scratch_root().glob("killed-*")]
    session = Path(cluster.address_info["session_dir"])
    leaks = [
        f"{path}: {name}"
        for root in (tmp_path, session)
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink()
        for name, value in SECRETS.items()
        if value.encode() in path.read_bytes()
    ]
    assert not leaks

    # 4. The finished run is not trained again; a changed adapter shape is refused before anything starts.
    again = run_training(tiny(tmp_path, tiny_mistral_dir, "killed", "run.max_failures=1"))
    assert again.result is None and again.summary.steps == STEPS and again.summary_path == f"{run_dir}/summary.json"
    with pytest.raises(ResumeError, match=r"another model or data \(lora.r: 8 -> 16\)"):
        run_training(tiny(tmp_path, tiny_mistral_dir, "killed", "lora.r=16"))
