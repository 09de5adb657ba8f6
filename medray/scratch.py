"""Local scratch space of a run's workers: per-rank trainer folders and restored checkpoints.

Everything a run puts on a node's local disk lives under `{TMPDIR}/medray-{uid}/{run_id}/`, and that folder is
removed when the run ends, whatever the outcome: the worker removes its own on the way out, and the driver removes
the folder on its node after `fit()` (a worker killed with SIGKILL cannot clean up after itself). The root is
private to the user (mode 0700), so other users on a shared machine can neither read adapters nor plant files there.

    folder = rank_dir(run_id, rank=0)       # /tmp/medray-1000/<run_id>/rank0
    remove_run_scratch(run_id)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path


def scratch_root() -> Path:
    """`{TMPDIR}/medray-{uid}`, created with mode 0700; refuses a root that another user owns or that is a link."""
    root = Path(tempfile.gettempdir()) / f"medray-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    info = root.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(
            f"{root} is a link or belongs to another user; remove it or point TMPDIR at a folder of your own"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        root.chmod(0o700)
    return root


def new_run_id(name: str, run_dir: str) -> str:
    """`{name}-{run folder hash}-{random}`: unique per attempt, tied to its run folder (`remove_stale_scratch`)."""
    return f"{_run_prefix(name, run_dir)}-{uuid.uuid4().hex[:8]}"


def remove_stale_scratch(name: str, run_dir: str) -> None:
    """Remove what earlier attempts of the run in `run_dir` left on this node (a killed driver cleans up nothing).
    Call it only while holding the run folder's lock: then no other attempt of this run is running."""
    for folder in scratch_root().glob(f"{_run_prefix(name, run_dir)}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def _run_prefix(name: str, run_dir: str) -> str:
    return f"{name}-{hashlib.sha1(run_dir.encode()).hexdigest()[:8]}"


def run_scratch(run_id: str) -> Path:
    """This run's scratch folder on this node (created)."""
    folder = scratch_root() / run_id
    folder.mkdir(exist_ok=True)
    return folder


def rank_dir(run_id: str, rank: int) -> Path:
    """The trainer's local output folder of one rank."""
    return run_scratch(run_id) / f"rank{rank}"


def resume_dir(run_id: str, rank: int) -> Path:
    """A fresh folder to restore a checkpoint into, for one rank."""
    return Path(tempfile.mkdtemp(prefix=f"medray_resume_rank{rank}_", dir=run_scratch(run_id)))


def remove_rank_scratch(run_id: str, rank: int) -> None:
    """Remove one rank's trainer folder and restored checkpoints (other ranks on this node may still be running)."""
    folder = scratch_root() / run_id
    for item in [folder / f"rank{rank}", *folder.glob(f"medray_resume_rank{rank}_*")]:
        shutil.rmtree(item, ignore_errors=True)


def remove_run_scratch(run_id: str) -> None:
    """Remove this run's scratch folder on this node, if any."""
    shutil.rmtree(scratch_root() / run_id, ignore_errors=True)
