"""Quick tier: what medray refuses before any Ray worker is reserved, the run-folder lock, the resume rules, local
scratch, and the one-line failure messages (docs/reliability.md lists which test shows which promise)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from ray.train import WorkerGroupError

from medray.config import ConfigError, load_config
from medray.config_input import parse_override
from medray.driver import run_training
from medray.failures import describe_failure
from medray.preflight import PreflightError, check_batches, check_model, check_storage, cluster_shortfall
from medray.runfolder import (
    ResumeError,
    inspect_run_folder,
    remove_unregistered_checkpoints,
    save_run_config,
)
from medray.runlock import RunLock, RunLockedError
from medray.scratch import rank_dir, remove_rank_scratch, remove_run_scratch, resume_dir, scratch_root

REPO = Path(__file__).resolve().parents[1]


def _config(*overrides: str):
    return load_config(None, list(overrides))


# --- config ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "/tmp/absname", "a/b", ".", "..", "white space", "a:b"])
def test_run_name_is_one_path_segment(name):
    with pytest.raises(ConfigError, match="run.name: .*one folder name"):
        _config(f"run.name={name}")


def test_run_name_allows_letters_digits_and_dash_underscore_dot():
    assert _config("run.name=lr-1e-4_r16.v2").run.name == "lr-1e-4_r16.v2"


def test_override_value_with_space_hash_is_not_cut_as_a_comment():
    assert parse_override("data.hub_config=en #1")[1] == "en #1"
    assert parse_override("run.name=#x")[1] == "#x"
    assert parse_override("lora.target_modules=[q_proj, v_proj]")[1] == ["q_proj", "v_proj"]
    template = "Q {question} #note {cot} {response}"
    assert _config(f"data.template={template}").data.template == template


def test_unsloth_without_gpus_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"model.backend=unsloth runs on CUDA GPUs only: set scaling.use_gpu=true"):
        _config("model.backend=unsloth")
    assert _config("model.backend=unsloth", "scaling.use_gpu=true").model.backend == "unsloth"


# --- driver-side checks ----------------------------------------------------------------------------------------------


def test_unwritable_storage_fails_before_the_data_is_prepared(tmp_path):
    cfg = _config("run.storage_path=/proc/medray-x", f"data.path={tmp_path / 'never-read.jsonl'}")
    with pytest.raises(PreflightError, match=r"run.storage_path=/proc/medray-x is not writable"):
        run_training(cfg)  # a data error would name never-read.jsonl: the storage check came first
    check_storage(str(tmp_path / "new" / "folder"))  # created on the way
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())


def test_model_folder_without_weights_is_refused_on_the_driver(tmp_path, tiny_mistral_dir):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for item in tiny_mistral_dir.iterdir():
        if not item.name.endswith(".safetensors"):
            (folder / item.name).write_bytes(item.read_bytes())
    with pytest.raises(PreflightError, match=r"holds no weights \(\*\.safetensors\)"):
        check_model(_config(f"model.name={folder}").model)
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(PreflightError, match=r"PyTorch \.bin files, which medray does not load"):
        check_model(_config(f"model.name={folder}").model)
    check_model(_config(f"model.name={tiny_mistral_dir}").model)


def test_missing_model_names_fail_in_one_line_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(PreflightError, match=r"neither a local folder nor in the Hugging Face cache.*HF_HUB_OFFLINE=1"):
        check_model(_config("model.name=no-such-org/no-such-model-xyz").model)
    with pytest.raises(PreflightError, match=r"model.name=/no/such/folder: no such folder"):
        check_model(_config("model.name=/no/such/folder").model)
    with pytest.raises(PreflightError, match=r"not a valid PyPI model source"):
        check_model(_config("model.name=pypi:nonsense").model)


def test_cluster_shortfall_names_what_was_asked_and_what_exists():
    two_cpus = [{"CPU": 2.0, "memory": 1e9}]
    assert cluster_shortfall(_config("scaling.num_workers=2").scaling, two_cpus) is None
    message = cluster_shortfall(_config("scaling.num_workers=1000").scaling, two_cpus)
    assert "scaling.num_workers=1000 workers of 1 CPU each do not fit" in message
    assert "the Ray cluster has 2 CPU(s) and 0 GPU(s) on 1 node(s), room for 2" in message
    gpu = cluster_shortfall(_config("scaling.use_gpu=true").scaling, two_cpus)
    assert gpu.startswith("scaling.use_gpu=true, but the Ray cluster has 2 CPU(s) and 0 GPU(s)")
    # Per node: two nodes of 3 CPUs hold two 2-CPU workers, not three, though 6 CPUs are there in total.
    nodes = [{"CPU": 3.0}, {"CPU": 3.0}]
    assert "room for 2" in cluster_shortfall(
        _config("scaling.num_workers=3", "scaling.cpus_per_worker=2").scaling, nodes
    )
    gpus = [{"CPU": 8.0, "GPU": 2.0}]
    assert cluster_shortfall(_config("scaling.num_workers=2", "scaling.use_gpu=true").scaling, gpus) is None
    assert "room for 2" in cluster_shortfall(_config("scaling.num_workers=4", "scaling.use_gpu=true").scaling, gpus)


def test_a_batch_larger_than_the_split_is_refused():
    stats = {"rows_train": 30, "rows_validation": 3}
    check_batches(_config("train.per_device_batch_size=4", "train.gradient_accumulation_steps=4"), stats)
    with pytest.raises(PreflightError, match=r"30 training row\(s\) over 1 worker\(s\) give 30 per worker, fewer than"):
        check_batches(_config("train.per_device_batch_size=64", "train.max_steps=30"), stats)
    with pytest.raises(PreflightError, match=r"give 7 per worker"):
        check_batches(_config("scaling.num_workers=4", "train.per_device_batch_size=4", "train.max_steps=5"), stats)
    with pytest.raises(PreflightError, match=r"3 validation row\(s\) for 4 workers"):
        check_batches(
            _config("scaling.num_workers=4", "train.per_device_batch_size=1", "train.gradient_accumulation_steps=1"),
            stats,
        )


# --- the run-folder lock -------------------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_folder_fails_naming_the_owner(tmp_path):
    with RunLock(str(tmp_path), "same") as lock:
        owner = json.loads(Path(lock.path).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=rf"in use by another medray run \(pid {os.getpid()} on host "):
            RunLock(str(tmp_path), "same").acquire()
        RunLock(str(tmp_path), "other").acquire()  # another name is another folder
    assert not (tmp_path / ".same.lock").exists()
    RunLock(str(tmp_path), "same").acquire()  # released at the end of the block


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / ".run.lock"
    owner = {"host": socket.gethostname(), "pid": dead.pid, "process_started": 1.0, "started": "2026-01-01T00:00:00Z"}
    lock_file.write_text(json.dumps(owner))
    with RunLock(str(tmp_path), "run"):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    # A reused pid (a live process started at another time) is not the owner either.
    lock_file.write_text(json.dumps({**owner, "pid": os.getpid()}))
    RunLock(str(tmp_path), "run").acquire()
    # A lock from another host cannot be checked from here: refused, naming that host and the file to remove.
    lock_file.write_text(json.dumps({**owner, "host": "elsewhere"}))
    with pytest.raises(RunLockedError, match=r"on host elsewhere.*remove .*\.run\.lock"):
        RunLock(str(tmp_path), "run").acquire()


# --- resume rules --------------------------------------------------------------------------------------------------


def _ray_like_run(folder: Path, cfg, *checkpoints: str, registered: int, summary: bool = False) -> None:
    """A run folder as Ray Train V2 leaves it: checkpoint folders, and its snapshot naming the registered ones."""
    folder.mkdir(parents=True)
    for name in checkpoints:
        (folder / name / "checkpoint").mkdir(parents=True)
        (folder / name / "checkpoint" / "adapter_model.safetensors").write_bytes(b"x")
    results = [{"version": 0, "checkpoint_dir_name": name, "metrics": {}} for name in checkpoints[:registered]]
    snapshot = {"checkpoint_results": results, "latest_checkpoint_result": results[-1] if results else None}
    (folder / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    save_run_config(cfg, str(folder))
    if summary:
        (folder / "summary.json").write_text(json.dumps({"config": cfg.to_dict(), "steps": 6}))


def test_resuming_with_another_model_or_data_is_refused_naming_the_keys(tmp_path):
    base = ["run.name=r", f"run.storage_path={tmp_path}"]
    _ray_like_run(tmp_path / "r", _config(*base), "checkpoint_1", registered=1)
    with pytest.raises(ResumeError, match=r"model.name: .* -> \"other/model\"; lora.r: 16 -> 32"):
        inspect_run_folder(_config(*base, "lora.r=32", "model.name=other/model"), str(tmp_path))
    with pytest.raises(ResumeError, match=r"data.max_length: 2048 -> 512"):
        inspect_run_folder(_config(*base, "data.max_length=512"), str(tmp_path))
    # Learning rate, steps, workers: the checkpoint still fits.
    state = inspect_run_folder(_config(*base, "train.learning_rate=1e-5", "scaling.num_workers=2"), str(tmp_path))
    assert state.checkpoints == ["checkpoint_1"] and state.finished_summary is None


def test_a_finished_run_is_not_trained_again_unless_made_longer(tmp_path):
    base = ["run.name=done", f"run.storage_path={tmp_path}", "train.max_steps=6"]
    _ray_like_run(tmp_path / "done", _config(*base), "checkpoint_1", registered=1, summary=True)
    assert inspect_run_folder(_config(*base), str(tmp_path)).finished_summary["steps"] == 6
    assert inspect_run_folder(_config(*base, "train.max_steps=12"), str(tmp_path)).finished_summary is None


def test_resume_must_and_never(tmp_path):
    with pytest.raises(ResumeError, match=r"run.resume=must, but .*/fresh holds no checkpoint"):
        inspect_run_folder(_config("run.name=fresh", "run.resume=must"), str(tmp_path))
    cfg = _config("run.name=old", "run.resume=never")
    _ray_like_run(tmp_path / "old", cfg, "checkpoint_1", registered=1, summary=True)
    state = inspect_run_folder(cfg, str(tmp_path))
    assert state.checkpoints == [] and state.finished_summary is None and not (tmp_path / "old").exists()
    (aside,) = tmp_path.glob("old.replaced-*")
    assert (aside / "checkpoint_1" / "checkpoint").is_dir()  # moved, not deleted


def test_half_written_checkpoints_are_removed_never_resumed(tmp_path):
    cfg = _config("run.name=cut")
    _ray_like_run(tmp_path / "cut", cfg, "checkpoint_1", "checkpoint_2", registered=1)
    state = inspect_run_folder(cfg, str(tmp_path))
    assert state.checkpoints == ["checkpoint_1"]
    assert sorted(item.name for item in (tmp_path / "cut").glob("checkpoint_*") if item.is_dir()) == ["checkpoint_1"]
    assert remove_unregistered_checkpoints(pafs.LocalFileSystem(), str(tmp_path / "cut"), ["checkpoint_1"]) == []


# --- local scratch -------------------------------------------------------------------------------------------------


def test_scratch_is_private_per_user_and_removed(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    root = scratch_root()
    assert root == tmp_path / f"medray-{os.getuid()}" and stat.S_IMODE(root.stat().st_mode) == 0o700
    root.chmod(0o777)
    assert stat.S_IMODE(scratch_root().stat().st_mode) == 0o700
    rank0, rank1 = rank_dir("run-1", 0), rank_dir("run-1", 1)
    rank0.mkdir(), rank1.mkdir()
    restored = resume_dir("run-1", 0)
    remove_rank_scratch("run-1", 0)
    assert not rank0.exists() and not restored.exists() and rank1.exists()
    remove_run_scratch("run-1")
    assert not (root / "run-1").exists()


def test_a_medray_folder_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    planted = tmp_path / "medray"
    planted.mkdir()
    (planted / "report.py").write_text("raise SystemExit('the planted module ran')\n")
    code = "import importlib.util; print(importlib.util.find_spec('medray.report').origin)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == REPO / "medray" / "report.py"


# --- one-line failures ---------------------------------------------------------------------------------------------


def test_a_full_disk_in_a_worker_is_one_line():
    cause = OSError(28, "No space left on device")
    cause.filename = "/runs/r/checkpoint_2026/checkpoint/optimizer.pt"
    error = WorkerGroupError("Training failed due to worker errors", {0: cause})
    message = describe_failure(error, run_dir="/runs/r", max_failures=0)
    assert "\n" not in message
    assert message.startswith("training in /runs/r stopped (run.max_failures=0: no restart): the disk is full")
    assert "writing /runs/r/checkpoint_2026/checkpoint/optimizer.pt" in message


def test_an_error_in_the_training_code_is_its_last_error_line():
    text = "Traceback (most recent call last):\n  File 'x.py', line 1\nValueError: lora shapes do not match\n"
    error = WorkerGroupError("Training failed due to worker errors", {0: RuntimeError(text)})
    message = describe_failure(error, run_dir="/runs/r", max_failures=2)
    assert message == (
        "training in /runs/r failed after 2 restart(s): ValueError: lora shapes do not match "
        "(full traceback in the worker log above)"
    )


def test_the_cli_prints_a_refusal_as_one_line(capsys, tmp_path):
    from medray.cli import main

    code = main(["train", "--config", "tiny-test", "run.storage_path=/proc/medray-x", f"data.path={tmp_path}/none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("medray: error: run.storage_path=/proc/medray-x is not writable")
