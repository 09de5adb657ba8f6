"""Slow tier: what a run survives, on one shared Ray cluster (2 CPUs) and the tiny random Mistral.

- A full disk under run.storage_path ends the run in one line, and no half-written checkpoint stays.
- Requests the cluster cannot hold fail before any worker is reserved.
- Killed workers: test_reliability_workers.py; a killed driver: test_reliability_driver.py (files of their own, so
  that pytest-xdist runs them side by side); both use the helpers here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest
from conftest import environment

from medray.config import load_config
from medray.driver import run_training
from medray.failures import RunFailedError
from medray.preflight import PreflightError
from medray.presets import resolve_preset
from medray.runfolder import registered_checkpoints
from medray.scratch import scratch_root

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SECRETS = {
    "HF_TOKEN": "hf_medrayCanary7Q2x9Lw",
    "WANDB_API_KEY": "wandbcanary0123456789abcdef0123456789abcd",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-canary-5f3a",
}
STEPS = 12  # every 3 steps an evaluation and a checkpoint


def cluster_fixture():
    """A module-scoped `cluster` fixture: one local Ray cluster (2 CPUs) for the module, whose processes inherit the
    secrets the run must never write (conftest.py turns Ray's memory monitor off for every test process).
    Use: `module_cluster = cluster_fixture()`."""

    @pytest.fixture(scope="module", name="cluster")
    def fixture():
        import ray

        with environment(SECRETS):
            context = ray.init(
                address="local",
                num_cpus=2,
                object_store_memory=600 * 1024**2,
                include_dashboard=False,
                log_to_driver=False,
            )
            yield context
            ray.shutdown()

    return fixture


module_cluster = cluster_fixture()


def tiny(storage: Path, model_dir: Path, name: str, *overrides: str):
    return load_config(
        resolve_preset("tiny-test"),
        [
            f"model.name={model_dir}",
            f"run.storage_path={storage}",
            f"run.name={name}",
            f"train.max_steps={STEPS}",
            "train.eval_steps=3",
            "train.logging_steps=3",
            *overrides,
        ],
    )


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray registered in `run_dir` (none while the snapshot is missing or being written)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    return sorted(result["metrics"]["step"] for result in snapshot["checkpoint_results"])


def when_checkpointed(run_dir: Path, action, after_step: int = 0, timeout_s: float = 600) -> threading.Thread:
    """Run `action()` in a thread as soon as `run_dir` has a registered checkpoint later than `after_step`."""

    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if max(checkpoint_steps(run_dir), default=0) > after_step:
                action()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def kill_a_train_worker() -> int:
    """SIGKILL one Ray Train worker process of this test's cluster (a descendant of this process)."""
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                process.send_signal(signal.SIGKILL)
                return process.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no RayTrainWorker process found")


def history_steps(run_dir: Path) -> list[int]:
    return [entry["step"] for entry in json.loads((run_dir / "history.json").read_text())]


def test_requests_the_cluster_cannot_hold_fail_before_any_worker(cluster, tiny_mistral_dir, tmp_path):
    with pytest.raises(PreflightError, match=r"num_workers=1000 workers of 1 CPU each do not fit: .* 2 CPU\(s\)"):
        run_training(tiny(tmp_path, tiny_mistral_dir, "big", "scaling.num_workers=1000"))
    with pytest.raises(PreflightError, match=r"scaling.use_gpu=true, but the Ray cluster has 2 CPU\(s\) and 0 GPU"):
        run_training(tiny(tmp_path, tiny_mistral_dir, "gpu", "scaling.use_gpu=true"))
    started = time.monotonic()
    with pytest.raises(PreflightError, match=r"\(waited 3 s for the cluster to grow\)"):
        run_training(
            tiny(tmp_path, tiny_mistral_dir, "wait", "scaling.num_workers=3", "scaling.wait_for_resources_s=3")
        )
    assert time.monotonic() - started >= 3
    with pytest.raises(PreflightError, match=r"training row\(s\) over 1 worker\(s\) give \d+ per worker, fewer than"):
        run_training(tiny(tmp_path, tiny_mistral_dir, "batch", "train.per_device_batch_size=64"))
    assert not list(tmp_path.glob("*/checkpoint_*"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: the first checkpoint (adapter, optimizer, tokenizer: ~3 MB) does not fit."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_ends_the_run_in_one_line_without_half_checkpoints(cluster, tiny_mistral_dir, small_disk):
    with pytest.raises(RunFailedError) as failure:
        run_training(tiny(small_disk, tiny_mistral_dir, "full", "run.max_failures=0"))
    message = str(failure.value)
    assert "\n" not in message
    assert f"training in {small_disk}/full stopped (run.max_failures=0: no restart): the disk is full" in message
    registered = registered_checkpoints(pafs.LocalFileSystem(), str(small_disk / "full"))
    assert sorted(item.name for item in (small_disk / "full").glob("checkpoint_*") if item.is_dir()) == registered
    assert not [item.name for item in scratch_root().glob("full-*")]
    assert not (small_disk / ".full.lock").exists()
