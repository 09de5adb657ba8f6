"""A private, token-authenticated Ray cluster on this machine, started with the real `ray start` CLI, for tests.

Other Ray instances run on the same machine (other tests, other people), so a cluster from here:
- lives in its own temp dir (`--temp-dir`), so it never becomes the machine's default cluster in /tmp/ray;
- listens only on ports it picked in 20000-32000: outside Ray's worker port range (10002-19999, where `ray start`
  refuses them) and below the kernel's ephemeral range;
- turns token authentication on with a freshly generated token in its own file (`RAY_AUTH_MODE=token`,
  `RAY_AUTH_TOKEN_PATH`), never touching `~/.ray/auth_token`;
- is stopped by killing exactly its own processes. Every process it starts inherits the environment variables
  `MEDRAY_TEST_CLUSTER=<root>` and `MEDRAY_TEST_OWNER=<pid of the test process>`; `stop()` ends those and their
  children, and a new cluster first ends the clusters whose owner died without stopping them (a killed pytest).
  It never calls `ray stop`, which would end every Ray instance on the machine.

    with local_ray_cluster(num_cpus=2) as cluster:
        cluster.ray("job", "submit", "--working-dir", ".", "--", "python", "jobs/train.py", "--config", preset)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

MARKER = "MEDRAY_TEST_CLUSTER"
OWNER = "MEDRAY_TEST_OWNER"
ROOT_PREFIX = "medray-ray-"
PORT_RANGE = (20000, 32000)
HEAD_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)
NODE_PORT_FLAGS = HEAD_PORT_FLAGS[3:]
TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
_taken_ports: set[int] = set()


def write_token(path: Path) -> str:
    """Write a new 256-bit token (what `ray get-auth-token --generate` makes) to `path`, readable by its owner only."""
    token = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    path.chmod(0o600)
    return token


def worker_port_range() -> tuple[int, int]:
    """This pytest process's share of PORT_RANGE: under pytest-xdist each worker (`gw0`, `gw1`, ...) picks from its
    own slice of 1,500 ports, so two workers never pick the same port before either has bound it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return PORT_RANGE
    low, high = PORT_RANGE
    size = (high - low) // 8
    start = low + int(worker.removeprefix("gw")) % 8 * size
    return start, start + size - 1


def free_ports(count: int) -> list[int]:
    """`count` distinct ports in this process's share of PORT_RANGE (`worker_port_range`) that nothing listens on
    now (and that this process has not handed out)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(*worker_port_range())
        if port not in _taken_ports and _is_free(port):
            _taken_ports.add(port)
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


class LocalRayCluster:
    """A head node (plus optional worker nodes) started with `ray start`, owned by one test."""

    def __init__(self, root: Path, num_cpus: int = 2, object_store_mb: int = 400):
        self.root = root
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.token_path = root / "auth_token"
        self.token = write_token(self.token_path)
        self.ports = dict(zip(HEAD_PORT_FLAGS, free_ports(len(HEAD_PORT_FLAGS)), strict=True))
        self.gcs_address = ""
        self.dashboard_url = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
        self.nodes = 0

    # -- environments -------------------------------------------------------------------------------------------------

    def env(self, token: bool = True) -> dict[str, str]:
        """Environment for `ray` commands and jobs: token auth on (or off for `token=False`), our venv first on PATH."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env[MARKER] = str(self.root)
        env[OWNER] = str(os.getpid())
        if token:
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        else:
            # A client with no token at all: auth off on its side, and a HOME without ~/.ray/auth_token.
            env["RAY_AUTH_MODE"] = "disabled"
            env["HOME"] = str(self.root / "home-without-token")
        return env

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start_head(self) -> LocalRayCluster:
        """`ray start --head` with the dashboard on 127.0.0.1 only; raises with Ray's output if it fails."""
        args = ["--head", f"--temp-dir={self.root / 'head'}", "--dashboard-host=127.0.0.1"]
        args += [f"{flag}={port}" for flag, port in self.ports.items()]
        self._ray_start(args, self.num_cpus)
        self.gcs_address = f"{self._node_ip()}:{self.ports['--port']}"
        self.wait_for_dashboard()
        return self

    def add_node(self, num_cpus: int | None = None) -> None:
        """Join one more node (its own ports and temp dir) to the head, like `ray start --address` on a second host."""
        self.nodes += 1
        ports = dict(zip(NODE_PORT_FLAGS, free_ports(len(NODE_PORT_FLAGS)), strict=True))
        args = [f"--address={self.gcs_address}", f"--temp-dir={self.root / f'node{self.nodes}'}"]
        args += [f"{flag}={port}" for flag, port in ports.items()]
        self._ray_start(args, num_cpus or self.num_cpus)

    def _ray_start(self, args: list[str], num_cpus: int) -> None:
        command = [
            _ray_bin(),
            "start",
            *args,
            f"--num-cpus={num_cpus}",
            f"--object-store-memory={self.object_store_mb * 1024**2}",
            "--disable-usage-stats",
        ]
        result = subprocess.run(
            command, env=self.env(), capture_output=True, text=True, timeout=180, start_new_session=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def _node_ip(self) -> str:
        # `ray start` resolves 127.0.0.1 to the machine's address; read what it chose.
        address_file = next((self.root / "head").glob("ray_current_cluster"), None)
        if address_file is None:
            raise RuntimeError(f"ray start wrote no address file under {self.root / 'head'}")
        return address_file.read_text().strip().rsplit(":", 1)[0]

    def wait_for_dashboard(self, timeout_s: float = 120) -> None:
        """Poll the dashboard's jobs API until it answers (it starts a few seconds after `ray start` returns)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.http("GET", "/api/jobs/")[0] == 200:
                    return
            time.sleep(1)
        raise RuntimeError(f"the dashboard at {self.dashboard_url} did not answer within {timeout_s:.0f}s")

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those carrying our marker or temp dir, and all their children."""
        own = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter():
            if process.pid in own or not self._is_ours(process):
                continue
            found[process.pid] = process
            with contextlib.suppress(psutil.Error):
                found.update({child.pid: child for child in process.children(recursive=True)})
        return [process for pid, process in found.items() if pid not in own]

    def _is_ours(self, process: psutil.Process) -> bool:
        try:
            if process.environ().get(MARKER) == str(self.root):
                return True
            return any(str(self.root) in part for part in process.cmdline())
        except psutil.Error:
            return False

    def stop(self, grace_s: float = 5) -> None:
        """Terminate every process of this cluster, SIGKILL what is left after `grace_s`."""
        _terminate(self.processes(), grace_s)

    # -- clients ------------------------------------------------------------------------------------------------------

    def ray(self, *args: str, token: bool = True, cwd: Path | str | None = None, timeout: float = 120):
        """Run the `ray` CLI against this cluster; `ray job ...` commands get `--address <dashboard>` added."""
        command = [_ray_bin(), *args]
        if args[:1] == ("job",):
            command[3:3] = ["--address", self.dashboard_url]
        return subprocess.run(command, env=self.env(token), cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def http(self, method: str, path: str, token: bool | str = True, body: dict | None = None):
        """One request to the dashboard: `(status, parsed JSON or text)`.

        Sends `Authorization: Bearer <cluster token>`, or no header with `token=False`, or the given string as token.
        """
        request = urllib.request.Request(self.dashboard_url + path, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {self.token if token is True else token}")
        if body is not None:
            request.add_header("Content-Type", "application/json")
            request.data = json.dumps(body).encode()
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def job_info(self, submission_id: str) -> dict:
        """The jobs API's record of one job (`status`, `message`, `entrypoint`, ...)."""
        status, info = self.http("GET", f"/api/jobs/{submission_id}")
        if status != 200 or not isinstance(info, dict):
            raise RuntimeError(f"GET /api/jobs/{submission_id} answered {status}: {info}")
        return info

    def wait_for_job(self, submission_id: str, states=TERMINAL_JOB_STATES, timeout_s: float = 600) -> dict:
        """Poll a job until its status is one of `states`; raises with the job's logs on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.job_info(submission_id)
            if info["status"] in states:
                return info
            time.sleep(2)
        logs = self.ray("job", "logs", submission_id).stdout[-4000:]
        raise TimeoutError(f"job {submission_id} not in {sorted(states)} after {timeout_s:.0f}s:\n{logs}")

    def alive_actors(self, class_name: str) -> list[dict]:
        """Alive actors of one class, from the state API (e.g. `RayTrainWorker`)."""
        query = "/api/v0/actors?detail=1&limit=1000&filter_keys=class_name&filter_predicates=%3D"
        query += f"&filter_values={class_name}"
        status, answer = self.http("GET", query)
        if status != 200 or not isinstance(answer, dict):
            raise RuntimeError(f"state API answered {status}: {answer}")
        return [actor for actor in answer["data"]["result"]["result"] if actor["state"] == "ALIVE"]

    def logs_tail(self, chars: int = 6000) -> str:
        """The end of the head's raylet, GCS and job-manager logs, for a failing test's message."""
        parts = []
        for pattern in ("raylet.out", "gcs_server.out", "dashboard_JobHead.log", "job-driver-*.log"):
            for path in sorted((self.root / "head").glob(f"session_latest/logs/{pattern}")):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


def _terminate(processes: list[psutil.Process], grace_s: float = 5) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_orphaned_clusters() -> None:
    """End the processes of clusters from this module whose owning test process is gone (it was killed mid-test)."""
    orphans, roots = [], set()
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            env = process.environ()
            if MARKER in env and OWNER in env and not _alive(int(env[OWNER])):
                orphans.append(process)
                orphans.extend(process.children(recursive=True))
                roots.add(Path(env[MARKER]))
    _terminate(orphans)
    for root in roots:
        if root.name.startswith(ROOT_PREFIX):
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def local_ray_cluster(
    num_cpus: int = 2, worker_nodes: int = 0, keep: bool = False, attempts: int = 3
) -> Iterator[LocalRayCluster]:
    """A started head (and `worker_nodes` more nodes) for the `with` block; always stopped and removed afterwards.

    The root is a short folder in the system temp dir: Ray's Unix socket paths inside it must stay under 108 bytes,
    which pytest's deep `tmp_path` folders would break. On a loaded machine `ray start` can give up waiting for its
    own raylet (a fixed 30 s in Ray), so a failed start is cleaned up and tried again, up to `attempts` times.
    """
    stop_orphaned_clusters()
    cluster = _start_cluster(num_cpus, worker_nodes, keep, attempts)
    try:
        yield cluster
    finally:
        _discard(cluster, keep)


def _start_cluster(num_cpus: int, worker_nodes: int, keep: bool, attempts: int) -> LocalRayCluster:
    for attempt in range(1, attempts + 1):
        cluster = LocalRayCluster(Path(tempfile.mkdtemp(prefix=ROOT_PREFIX)), num_cpus=num_cpus)
        try:
            cluster.start_head()
            for _ in range(worker_nodes):
                cluster.add_node()
            return cluster
        except BaseException as error:  # never leave a half-started cluster behind, even on Ctrl-C
            _discard(cluster, keep)
            if attempt == attempts or not isinstance(error, RuntimeError | subprocess.TimeoutExpired):
                raise
    raise AssertionError("unreachable")


def _discard(cluster: LocalRayCluster, keep: bool) -> None:
    cluster.stop()
    if not keep:
        shutil.rmtree(cluster.root, ignore_errors=True)


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")
