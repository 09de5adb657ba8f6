"""Runs kept in object storage: a real S3 server (SeaweedFS on loopback), `run.storage_path=s3://...`.

Everything a run writes must land in the bucket and be read back from it: `summary.json`, `history.json`, the report
and its plot, TensorBoard events, checkpoints and the best adapter, also after a worker is killed and the run resumes
from its last checkpoint in the bucket, and when the workers run on two Ray nodes that share no folder. Credentials
reach pyarrow (on the driver and on every worker) through the standard AWS variables only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.fs
import pytest
from conftest import environment
from s3server import seaweedfs
from test_multinode import assert_adapter_loads

from medray.config import load_config
from medray.storage import StorageFolder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY_PRESET = "tiny-test"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One SeaweedFS for the module; its AWS variables are set in this process (and so in Ray started after)."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server, environment(server.env()):
        yield server


def bucket_files(s3, prefix: str) -> dict[str, int]:
    """Every file under `prefix` in the bucket: path relative to the prefix -> size."""
    found = s3.filesystem().get_file_info(
        pyarrow.fs.FileSelector(f"{s3.bucket}/{prefix}", recursive=True, allow_not_found=True)
    )
    return {
        info.path.removeprefix(f"{s3.bucket}/{prefix}/"): info.size
        for info in found
        if info.type == pyarrow.fs.FileType.File
    }


def kill_worker_after_first_checkpoint(s3, prefix: str, killed: list[int], timeout_s: float = 600) -> None:
    """Wait until Ray Train has registered a checkpoint (its checkpoint manager's snapshot in the bucket names one),
    then SIGKILL one Ray Train worker process of this test's Ray."""
    snapshot = f"{s3.bucket}/{prefix}/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with s3.filesystem().open_input_stream(snapshot) as stream:
                if json.loads(stream.read())["latest_checkpoint_result"] is not None:
                    break
        except (OSError, ValueError):  # not written yet (or half written)
            pass
        time.sleep(0.2)
    for process in psutil.Process().children(recursive=True):  # only this process's Ray: it started them
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                process.kill()
                killed.append(process.pid)
                return
        except psutil.Error:
            continue


def test_run_in_s3_survives_a_killed_worker_and_everything_is_in_the_bucket(s3, tiny_mistral_dir, tmp_path):
    import ray

    from medray.driver import run_training

    prefix = "runs/killed"
    uri = f"s3://{s3.bucket}/runs"
    cfg = load_config(
        TINY_PRESET,
        [
            f"model.name={tiny_mistral_dir}",
            f"run.storage_path={uri}",
            "run.name=killed",
            "run.max_failures=1",
            "train.max_steps=9",
            "train.eval_steps=3",
        ],
    )
    killed: list[int] = []
    ray.init(address="local", num_cpus=2, object_store_memory=400 * 1024**2, include_dashboard=False)
    try:
        killer = threading.Thread(target=kill_worker_after_first_checkpoint, args=(s3, prefix, killed), daemon=True)
        killer.start()
        outcome = run_training(cfg)
        killer.join(timeout=5)
    finally:
        ray.shutdown()
    assert killed, "no Ray Train worker was found to kill"

    folder = StorageFolder.of(f"{uri}/killed")
    assert outcome.run_dir == folder.uri and outcome.summary_path == f"{folder.uri}/summary.json"
    summary = json.loads(folder.read_text("summary.json"))
    assert summary["steps"] == 9
    assert summary["resumed_from_step"] in (3, 6), "the restarted worker did not resume from a checkpoint"
    steps = [entry["step"] for entry in json.loads(folder.read_text("history.json")) if "loss" in entry]
    assert steps[-1] == 9 and set(range(1, 10)) <= set(steps)

    report = folder.read_text("report.md")
    assert f"Run folder: `{folder.uri}`" in report and "| step | training loss | validation loss |" in report
    assert summary["report"] == f"{folder.uri}/report.md"
    files = bucket_files(s3, prefix)
    with s3.filesystem().open_input_stream(f"{s3.bucket}/{prefix}/loss.png") as stream:
        assert stream.read().startswith(PNG_SIGNATURE)
    assert_tensorboard_in_bucket(folder, files, tmp_path / "tensorboard", last_step=9)

    best = summary["best_checkpoint"]
    assert best.startswith(f"{folder.uri}/checkpoint_") and best.endswith("/checkpoint")
    local = StorageFolder.of(best).download("", tmp_path / "best")
    assert_adapter_loads(tiny_mistral_dir, local)
    assert not (Path.cwd() / "s3:").exists(), "something wrote the s3:// URI as a local path"

    # `medray report s3://...` rewrites the report in the bucket.
    from medray.cli import main

    s3.filesystem().delete_file(f"{s3.bucket}/{prefix}/report.md")
    assert main(["report", folder.uri]) == 0
    assert f"Run folder: `{folder.uri}`" in folder.read_text("report.md")


def assert_tensorboard_in_bucket(folder: StorageFolder, files: dict[str, int], local: Path, last_step: int) -> None:
    """The run's TensorBoard events are in the bucket and hold the training loss up to the last step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [name for name in files if name.startswith("tensorboard/") and "tfevents" in name]
    assert events, f"no TensorBoard events in the bucket: {sorted(files)}"
    folder.download("tensorboard", local)
    accumulator = EventAccumulator(str(local))
    accumulator.Reload()
    if "train/loss" not in accumulator.Tags()["scalars"]:  # transformers writes one event folder per run name
        accumulator = EventAccumulator(str(next(path.parent for path in local.rglob("*tfevents*"))))
        accumulator.Reload()
    assert accumulator.Scalars("train/loss")[-1].step == last_step


def test_two_node_run_keeps_everything_in_the_bucket(s3, tiny_mistral_dir, tmp_path):
    from raycluster import local_ray_cluster

    driver = (
        "import sys, ray\n"
        "from medray.config import load_config\n"
        "from medray.driver import run_training\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "print('summary:', run_training(load_config(sys.argv[2], sys.argv[3:])).summary_path, flush=True)\n"
    )
    uri = f"s3://{s3.bucket}/cluster"
    overrides = [
        f"model.name={tiny_mistral_dir}",
        f"run.storage_path={uri}",
        "run.name=two-nodes",
        "scaling.num_workers=2",
        "scaling.placement_strategy=STRICT_SPREAD",
    ]
    # The nodes inherit this process's environment: the AWS variables, and no shared folder but the bucket.
    with local_ray_cluster(num_cpus=2, worker_nodes=1) as cluster:
        command = [sys.executable, "-c", driver, cluster.gcs_address, TINY_PRESET, *overrides]
        result = subprocess.run(command, env=cluster.env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    folder = StorageFolder.of(f"{uri}/two-nodes")
    assert result.stdout.strip().splitlines()[-1] == f"summary: {folder.uri}/summary.json"

    summary = json.loads(folder.read_text("summary.json"))
    assert summary["steps"] == 6 and summary["world_size"] == 2 and len(set(summary["node_ids"])) == 2
    files = bucket_files(s3, "cluster/two-nodes")
    for name in ("summary.json", "history.json", "report.md", "loss.png"):
        assert files.get(name), f"{name} missing from the bucket: {sorted(files)}"
    assert any(name.startswith("tensorboard/") for name in files)
    best = summary["best_checkpoint"]
    assert f"{best.removeprefix(folder.uri + '/')}/adapter_model.safetensors" in files
    assert_adapter_loads(tiny_mistral_dir, StorageFolder.of(best).download("", tmp_path / "best"))
    assert not list(tmp_path.glob("s3:*")), "the driver wrote the s3:// URI as a local path"
