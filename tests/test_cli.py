"""The `medray` command as a person finds it: help without arguments, --version, `python -m medray` (which imports
neither torch nor Ray to print), the preset list, the effective config as YAML, and `tune --help` naming the README's
preset. All in-process except `python -m`."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from medray.cli import DEFAULT_TUNE_PRESET, main
from medray.config import MedrayConfig, load_config
from medray.presets import preset_names, preset_path


def test_no_arguments_prints_help_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: medray")
    for command in ("train", "tune", "report", "presets", "config"):
        assert command in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"medray {version('medray')}"


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run([sys.executable, "-m", "medray", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"medray {version('medray')}"


def test_help_version_and_presets_import_no_torch_or_ray():
    # `python -m medray` for each command in one interpreter: the commands that only print must stay quick to start.
    code = (
        "import runpy, sys\n"
        "for argv in (['--help'], ['--version'], ['presets'], ['evaluate', '--help']):\n"
        "    sys.argv = ['medray', *argv]\n"
        "    try:\n"
        "        runpy.run_module('medray', run_name='__main__')\n"
        "    except SystemExit as exited:\n"
        "        assert exited.code in (0, None), (argv, exited.code)\n"
        "print('heavy:', sorted(name for name in ('torch', 'ray', 'transformers') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "heavy: []"


def test_presets_lists_each_preset_with_its_first_comment_line(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = preset_names()
    assert len(lines) == len(names) >= 4
    for line, name in zip(lines, names, strict=True):
        first_comment = preset_path(name).read_text().splitlines()[0].lstrip("# ").strip()
        assert line.split(maxsplit=1) == [name, first_comment]
    assert any(line.startswith("cpu-demo ") and "medray train --config cpu-demo" in line for line in lines)


def test_config_show_prints_the_effective_config_with_defaults_filled(capsys):
    assert main(["config", "show", "--config", "cpu-demo", "lora.r=32", "train.max_steps=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_config("cpu-demo", ["lora.r=32", "train.max_steps=7"]).to_dict()
    assert shown["lora"]["r"] == 32 and shown["train"]["max_steps"] == 7
    assert shown["data"]["max_length"] == 384  # from the preset
    defaults = MedrayConfig().to_dict()
    assert shown["lora"]["dropout"] == defaults["lora"]["dropout"] and shown["tune"] == defaults["tune"]
    assert MedrayConfig.from_dict(shown).to_dict() == shown  # it loads back as a config


def test_config_show_without_config_uses_the_default_preset(capsys):
    assert main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == load_config("cpu-demo").to_dict()


def test_config_show_refuses_an_unknown_key_in_one_line(capsys):
    assert main(["config", "show", "lora.rank=8"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "lora.rank" in captured.err and "Traceback" not in captured.err


def test_tune_help_names_the_readme_preset(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["tune", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert DEFAULT_TUNE_PRESET == "tune-cpu-demo" and "tune-cpu-demo" in out and "--verbose" in out
    assert "medray tune --config tune-cpu-demo" in (Path(__file__).parents[1] / "README.md").read_text()


def test_report_prints_the_summary_lines(tiny_run_dir, tmp_path, capsys):
    import shutil

    run = shutil.copytree(tiny_run_dir, tmp_path / "run")
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"Run folder: {run}" in out and "Optimizer steps: 6" in out
    assert out[-1].startswith(f"report: {run / 'report.md'}")
    assert (run / "report.md").is_file() and (run / "report.html").is_file()


def test_report_of_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"medray: error: {tmp_path} holds no summary.json; pass the folder of a finished medray run"
    )
