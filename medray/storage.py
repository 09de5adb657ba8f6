"""Where a run's files go: a local folder or object storage (`s3://`, `gs://`, ...), both through pyarrow.fs.

`run.storage_path` is a local path or a URI. Ray Train puts checkpoints there itself; everything else medray writes
(`summary.json`, `history.json`, the report, TensorBoard and W&B files) goes through `StorageFolder`, which is the
plain local folder for a local path, so local runs write exactly where they always did. For a URI, files are written
into a local staging folder and uploaded (`staged`), and logs written on a worker are mirrored up as training goes
(`MirrorCallback`).

Object stores are reached the way their own tools reach them: credentials and endpoint from the standard variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for an S3-compatible server such as MinIO or
SeaweedFS; `GOOGLE_APPLICATION_CREDENTIALS` for GCS). pyarrow's URI options also work
(`s3://bucket/runs?endpoint_override=host:9000&scheme=http`).

    folder = StorageFolder.of("s3://bucket/runs/medray-demo")
    folder.write_text("summary.json", "{}")
    with folder.staged(fetch=["summary.json"]) as local:  # a local Path; uploaded back when the block ends
        (local / "report.md").write_text("...")
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from medray.sources import is_uri

logger = logging.getLogger(__name__)


def resolve(path: str) -> str:
    """A storage path as Ray wants it: an absolute local path (`~` expanded), or the URI unchanged."""
    if is_uri(path):
        return path
    return str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI; a URI's `?query` (pyarrow options) stays at the end."""
    base, mark, query = str(base).partition("?")
    joined = "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])
    return f"{joined}{mark}{query}"


@dataclass(frozen=True)
class StorageFolder:
    """One folder of local or object storage: `filesystem` and the folder's `path` in it, `uri` for people."""

    filesystem: pyarrow.fs.FileSystem
    path: str
    uri: str

    @classmethod
    def of(cls, location: str) -> StorageFolder:
        """The folder at a local path or URI (nothing is created)."""
        location = resolve(location)
        if not is_uri(location):
            return cls(pyarrow.fs.LocalFileSystem(), location, location)
        filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
        return cls(filesystem, path.rstrip("/"), location.partition("?")[0].rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pyarrow.fs.LocalFileSystem)

    def child(self, name: str) -> StorageFolder:
        return StorageFolder(self.filesystem, f"{self.path}/{name}", f"{self.uri}/{name}")

    def uri_of(self, path: str) -> str:
        """The URI (or local path) of a `filesystem` path inside this folder, e.g. a Ray checkpoint's `.path`."""
        if path == self.path or path.startswith(f"{self.path}/"):
            return self.uri + path[len(self.path) :]
        return path

    def exists(self, name: str) -> bool:
        return self.filesystem.get_file_info(f"{self.path}/{name}").type != pyarrow.fs.FileType.NotFound

    def read_text(self, name: str) -> str:
        with self.filesystem.open_input_stream(f"{self.path}/{name}") as stream:
            return stream.read().decode()

    def write_text(self, name: str, text: str) -> str:
        """Write one file (whole, replacing any old one); returns its URI."""
        self.filesystem.create_dir(self.path, recursive=True)
        with self.filesystem.open_output_stream(f"{self.path}/{name}") as stream:
            stream.write(text.encode())
        return f"{self.uri}/{name}"

    def upload(self, local_dir: str | Path, name: str = "") -> None:
        """Copy a local folder's files into this folder (or its subfolder `name`), replacing files of the same name."""
        target = f"{self.path}/{name}".rstrip("/")
        self.filesystem.create_dir(target, recursive=True)
        pyarrow.fs.copy_files(str(local_dir), target, destination_filesystem=self.filesystem)

    def download(self, name: str, local_dir: str | Path) -> Path:
        """Copy this folder's subfolder `name` (e.g. a checkpoint) to `local_dir`; returns the local copy."""
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(f"{self.path}/{name}".rstrip("/"), str(local_dir), source_filesystem=self.filesystem)
        return Path(local_dir)

    @contextlib.contextmanager
    def staged(self, fetch: tuple[str, ...] | list[str] = ()) -> Iterator[Path]:
        """A local folder for the block to read and write; for object storage, a temporary copy of the files named in
        `fetch` (those that exist), whose files are all uploaded here when the block ends without an error."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="medray_stage_") as scratch:
            local = Path(scratch)
            for name in fetch:
                if self.exists(name):
                    (local / name).write_text(self.read_text(name))
            yield local
            self.upload(local)


def report_uri(folder: StorageFolder, local_report: str | None) -> str | None:
    """Where a report written into `folder`'s staging copy ends up (None stays None: no report was written)."""
    return None if local_report is None else join(folder.uri, Path(local_report).name)


def mirror_callback(local_dir: str | Path, destination: str):
    """A transformers `TrainerCallback` that uploads `local_dir` (logs a worker writes, e.g. TensorBoard events) to
    `destination` at every log, checkpoint and at the end of training."""
    from transformers import TrainerCallback

    folder = StorageFolder.of(destination)

    class MirrorCallback(TrainerCallback):
        def _mirror(self):
            if Path(local_dir).is_dir():
                try:
                    folder.upload(local_dir)
                except OSError as error:  # a storage hiccup must not stop training; the next call uploads again
                    logger.warning("could not copy %s to %s: %s", local_dir, folder.uri, error)

        def on_log(self, args, state, control, **kwargs):
            self._mirror()

        def on_save(self, args, state, control, **kwargs):
            self._mirror()

        def on_train_end(self, args, state, control, **kwargs):
            self._mirror()

    return MirrorCallback()
