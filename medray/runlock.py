"""One run per run folder: a lock file beside the folder, `{run.storage_path}/.{run.name}.lock`.

The lock holds its owner (host, pid, process start time, when the run started). A second run on the same folder
fails at once naming that owner. A lock whose owner is gone (same host, that pid no longer runs the process that
took it: killed driver, reboot) is stale and taken over. A lock taken on another host cannot be checked from here:
the message says which host and pid hold it, and to remove the file if that run is known to be gone.

The lock sits beside the run folder, not inside it, so `run.resume=never` can move the folder aside while holding it.
On a local disk (or NFS) the lock is taken atomically (O_CREAT | O_EXCL); on object storage (s3://, gs://) it is a
check-then-write through pyarrow's filesystem, which narrows the race without closing it.

    with RunLock(storage_path, run_name):
        ...  # train
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass

import psutil
import pyarrow.fs as pafs


class RunLockedError(ValueError):
    """Another run owns the run folder."""


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    process_started: float
    """The owner process's start time (psutil), so a reused pid is not mistaken for the owner."""
    started: str
    """When the lock was taken (UTC, ISO 8601)."""

    @classmethod
    def me(cls) -> LockOwner:
        pid = os.getpid()
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return cls(socket.gethostname(), pid, psutil.Process(pid).create_time(), started)

    def is_gone(self) -> bool:
        """True only when the owner is known to have ended: same host, and its pid is dead or another process."""
        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.process_started) > 1.0
        except psutil.NoSuchProcess:
            return True

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"


class RunLock:
    """The lock of run folder `{storage}/{name}`; a context manager."""

    def __init__(self, storage: str, name: str):
        self.fs, root = pafs.FileSystem.from_uri(storage)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.path = f"{root.rstrip('/')}/.{name}.lock"
        self.run_dir = f"{storage.rstrip('/')}/{name}"
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise `RunLockedError` naming the owner of a live one."""
        for _ in range(3):
            if self._create():
                self.held = True
                return
            owner = self._read_owner()
            if owner is not None and not owner.is_gone():
                raise RunLockedError(
                    f"run folder {self.run_dir} is in use by another medray run ({owner.describe()}); wait for it to "
                    f"end or pick another run.name (if that run is gone, remove {self.path})"
                )
            self._remove_stale()
        raise RunLockedError(f"could not take the lock {self.path}: other runs keep taking it; pick another run.name")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.fs.delete_file(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _create(self) -> bool:
        """Write the lock if nobody holds it; False if the file exists."""
        content = json.dumps(asdict(LockOwner.me())).encode()
        parent = self.path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.local:
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as file:
                file.write(content)
            return True
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(content)
        return True

    def _read_owner(self) -> LockOwner | None:
        """The lock's owner; None for a lock that vanished or that its writer left empty (it died writing it)."""
        try:
            with self.fs.open_input_stream(self.path) as stream:
                return LockOwner(**json.loads(stream.read()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            age = time.time() - self.fs.get_file_info(self.path).mtime.timestamp()
            if age < 30:  # being written right now
                return LockOwner(host="?", pid=-1, process_started=0.0, started="just now")
            return None

    def _remove_stale(self) -> None:
        # Renaming first means two runs that both found the lock stale cannot both remove a fresh one.
        stale = f"{self.path}.stale-{os.getpid()}"
        try:
            self.fs.move(self.path, stale)
            self.fs.delete_file(stale)
        except (FileNotFoundError, OSError):
            pass
