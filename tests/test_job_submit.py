"""`ray job submit` end to end against a real, token-authenticated Ray head (started with `ray start`).

What a user does on a cluster: submit `python jobs/train.py --config ... key=value` with `--working-dir .`, wait,
read the logs (last line `summary: <path>`), find the adapter in the storage path. Also: the same submission without
the token is refused with 401, bad input fails the job with a message instead of a traceback, and `ray job stop`
ends a running training and frees its workers.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import psutil
import pytest
from raycluster import LocalRayCluster, local_ray_cluster
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY_PRESET = "tiny-test"


@pytest.fixture(scope="module")
def head():
    """A head node with token auth, 2 CPUs and its own ports and temp dir; stopped after the module, pass or fail."""
    with local_ray_cluster(num_cpus=2) as cluster:
        yield cluster


def train_entrypoint(model_dir: Path, storage: Path, name: str, *overrides: str) -> list[str]:
    """The command a user submits: the real entry point, the tiny preset, overrides last."""
    return [
        "python",
        "jobs/train.py",
        "--config",
        TINY_PRESET,
        f"model.name={model_dir}",
        f"run.storage_path={storage}",
        f"run.name={name}",
        *overrides,
    ]


def submit(cluster: LocalRayCluster, entrypoint: list[str], *options: str, token: bool = True, timeout: float = 900):
    """`ray job submit --working-dir . [options] -- entrypoint`, run from the repository root."""
    args = ["job", "submit", "--working-dir", ".", *options, "--", *entrypoint]
    return cluster.ray(*args, token=token, cwd=ROOT, timeout=timeout)


def job_logs(cluster: LocalRayCluster, submission_id: str) -> str:
    result = cluster.ray("job", "logs", submission_id)
    assert result.returncode == 0, result.stderr
    return result.stdout


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1].strip()


def test_submitted_training_succeeds_and_leaves_its_adapter(head, tiny_mistral_dir, tmp_path):
    storage, submission_id = tmp_path / "results", f"medray-train-{uuid.uuid4().hex[:8]}"
    entrypoint = train_entrypoint(tiny_mistral_dir, storage, "submitted")

    started = time.monotonic()
    result = submit(head, entrypoint, "--submission-id", submission_id)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n{head.logs_tail()}"
    print(f"ray job submit (tiny training) took {time.monotonic() - started:.1f}s")

    assert head.job_info(submission_id)["status"] == "SUCCEEDED"
    run_dir = storage / "submitted"
    assert last_line(job_logs(head, submission_id)) == f"summary: {run_dir / 'summary.json'}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["model"]["name"] == str(tiny_mistral_dir)  # the override reached the job
    assert summary["steps"] == summary["config"]["train"]["max_steps"] == 6
    adapters = sorted(run_dir.glob("checkpoint_*/checkpoint/adapter_model.safetensors"))
    assert adapters, f"no checkpoint under {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    assert Path(summary["best_checkpoint"], "adapter_model.safetensors") in adapters
    weights = load_file(str(adapters[-1]))
    assert any("lora_B" in key and weights[key].abs().sum() > 0 for key in weights), "LoRA B weights never trained"


def test_submission_without_the_token_is_refused(head):
    marker = f"must-not-run-{uuid.uuid4().hex[:8]}"
    result = submit(head, ["python", "-c", f"print('{marker}')"], token=False, timeout=120)
    assert result.returncode != 0
    assert "Unauthorized" in result.stdout + result.stderr

    # The same request over plain HTTP: 401 without a token, 403 with a wrong one, and no job was created.
    assert head.http("POST", "/api/jobs/", token=False, body={"entrypoint": "echo hi"})[0] == 401
    assert head.http("GET", "/api/jobs/", token="0" * 64)[0] == 403
    status, jobs = head.http("GET", "/api/jobs/")
    assert status == 200
    assert not any(marker in job["entrypoint"] for job in jobs)


def test_bad_config_fails_the_job_with_a_message(head, tiny_mistral_dir, tmp_path):
    submission_id = f"medray-bad-{uuid.uuid4().hex[:8]}"
    entrypoint = train_entrypoint(tiny_mistral_dir, tmp_path, "bad", "train.max_stepz=3")
    result = submit(head, entrypoint, "--submission-id", submission_id, timeout=300)

    assert result.returncode != 0
    info = head.job_info(submission_id)
    assert info["status"] == "FAILED"
    logs = job_logs(head, submission_id)
    assert "medray: error:" in logs and "train.max_stepz: unknown key" in logs, logs[-3000:]
    assert "Traceback" not in logs
    assert not (tmp_path / "bad").exists()  # failed before any training started


def test_job_stop_ends_a_running_training(head, tiny_mistral_dir, tmp_path):
    storage, submission_id = tmp_path / "results", f"medray-stop-{uuid.uuid4().hex[:8]}"
    long_run = ("train.max_steps=100000", "train.eval_steps=100000", "train.logging_steps=1")
    entrypoint = train_entrypoint(tiny_mistral_dir, storage, "stopped", *long_run)
    result = submit(head, entrypoint, "--submission-id", submission_id, "--no-wait", timeout=120)
    assert result.returncode == 0, result.stderr

    wait_for_training_workers(head, submission_id)
    stop = head.ray("job", "stop", submission_id, timeout=180)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert head.wait_for_job(submission_id, timeout_s=120)["status"] == "STOPPED"

    wait_until(lambda: not head.alive_actors("RayTrainWorker"), "training workers still alive after ray job stop")
    wait_until(lambda: not driver_processes(head), "the job's driver process survived ray job stop")
    assert "summary:" not in job_logs(head, submission_id)
    assert not (storage / "stopped" / "summary.json").exists()


def wait_for_training_workers(cluster: LocalRayCluster, submission_id: str, timeout_s: float = 300) -> None:
    """Block until the job's Ray Train workers are alive (the run is training, not still starting)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cluster.alive_actors("RayTrainWorker"):
            return
        status = cluster.job_info(submission_id)["status"]
        if status not in {"PENDING", "RUNNING"}:
            raise AssertionError(f"job ended ({status}) before training:\n{job_logs(cluster, submission_id)[-3000:]}")
        time.sleep(2)
    raise TimeoutError(f"no RayTrainWorker after {timeout_s}s:\n{job_logs(cluster, submission_id)[-3000:]}")


def driver_processes(cluster: LocalRayCluster) -> list[psutil.Process]:
    """`python jobs/train.py` processes still running on this cluster."""
    found = []
    for process in cluster.processes():
        try:
            if "jobs/train.py" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:  # it ended while we looked
            continue
    return found


def wait_until(condition, message: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(message)
