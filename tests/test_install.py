"""A non-editable install works from any folder: the wheel holds the presets and the sample data.

Builds the wheel from a copy of the sources, installs it (no dependencies) into a fresh virtual environment that
borrows the test environment's packages through a `.pth` line (so nothing is downloaded and the checkout's medray
is never on the path), then runs `medray train --config cpu-demo train.max_steps=1` from an empty folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment holding the medray wheel; returns its bin/ folder."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    shutil.copytree(ROOT / "medray", source / "medray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = work / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
        source,
    )
    (wheel,) = wheels.glob("medray-*.whl")

    environment = work / "venv"
    venv.create(environment, with_pip=False)
    bin_dir = environment / "bin"
    python = bin_dir / "python"
    site = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work).stdout.strip()
    )
    # The test environment's packages (torch, ray, ...) after the new site-packages; its .pth files (and so an
    # editable medray) are not processed from a plain path line.
    (site / "shared_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], work)
    return bin_dir


def clean_env(bin_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_wheel_ships_the_presets_and_the_version(installed, tmp_path):
    code = "import medray, medray.presets as p; print(medray.__file__, medray.__version__, p.preset_names())"
    out = run([str(installed / "python"), "-c", code], tmp_path, clean_env(installed)).stdout.split(" ", 2)
    assert str(ROOT) not in out[0] and "site-packages" in out[0]
    assert out[1] == "0.1.0"
    assert all(name in out[2] for name in ("cpu-demo", "mistral7b-medical-o1", "tiny-test", "tune-cpu-demo"))


def test_installed_medray_trains_the_demo_preset_from_another_folder(installed, smollm2_cache, tmp_path):
    results = tmp_path / "results"
    command = [str(installed / "medray"), "train", "--config", "cpu-demo", "train.max_steps=1"]
    command += [f"run.storage_path={results}", "run.name=installed"]
    # The preset's SmolLM2, downloaded and converted once per session (into the cache MEDRAY_CACHE names).
    env = {**clean_env(installed), "MEDRAY_CACHE": str(smollm2_cache["cache_dir"])}
    done = run(command, tmp_path, env, timeout=900)
    summary_path = Path(done.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    summary = json.loads(summary_path.read_text())
    assert summary_path.parent == results / "installed"
    assert summary["steps"] == 1 and summary["config"]["data"]["path"].startswith("pkg:")
    assert summary["data"]["rows_train"] > 0
