"""GPU tier of medray.search: a 4-trial search with 1 GPU per trial on 2 GPUs (skipped without 2 CUDA devices).

A small random-weight Mistral (~0.3B, the real v0.3 tokenizer) is tuned with the Unsloth 4-bit backend; the grid has
two sane and two absurd learning rates. The ASHA search runs 2 trials at a time, one GPU each, and stops trials; the
same 4 trials are then run to completion (`tune.scheduler=fifo`), and the GPU-seconds of both are compared.

    bash tests/gpu/run_tests.sh BUNDLE   # or: python3 -m pytest -s tests/test_search_gpu.py (bundle env sourced)

`$OUT` (when set) receives `search_gpu.json`, the measured figures, and both leaderboards.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from medray.config import load_config
from medray.search import run_search

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

SANE_LRS = (2.0e-3, 1.0e-3)
ABSURD_LRS = (10.0, 50.0)
MAX_STEPS = 200


@pytest.fixture(scope="module")
def ray_gpus():
    import ray

    ray.init(address="local", include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def small_mistral_dir(tmp_path_factory, mistral_tokenizer_dir) -> Path:
    """A random ~0.3B-parameter Mistral (12 layers, hidden 1024) in bf16 with the real tokenizer."""
    from conftest import save_random_mistral

    shape = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16)
    shape.update(num_key_value_heads=8, head_dim=64)
    folder = tmp_path_factory.mktemp("small_mistral")
    return save_random_mistral(folder, mistral_tokenizer_dir, dtype=torch.bfloat16, **shape)


def gpu_search_config(model_dir: Path, storage: Path, scheduler: str):
    grid = ", ".join(str(lr) for lr in (*SANE_LRS, *ABSURD_LRS))
    return load_config(
        "tiny-test",
        [
            f"model.name={model_dir}",
            "model.backend=auto",  # Unsloth on CUDA
            "model.load_in_4bit=true",
            "scaling.use_gpu=true",
            "train.optim=adamw_8bit",
            "lora.r=16",
            "train.eval_steps=25",
            "train.logging_steps=5",
            "train.early_stopping_patience=0",
            f"tune.space={{train.learning_rate: {{grid: [{grid}]}}}}",
            "tune.num_samples=1",
            f"tune.max_steps={MAX_STEPS}",
            "tune.grace_period=25",
            f"tune.scheduler={scheduler}",
            f"run.storage_path={storage}",
            f"run.name=gpu-{scheduler}",
        ],
    )


@pytest.fixture(scope="module")
def searches(ray_gpus, small_mistral_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("gpu_searches")
    outcomes = {}
    for scheduler in ("asha", "fifo"):
        started = time.monotonic()
        outcomes[scheduler] = run_search(gpu_search_config(small_mistral_dir, storage, scheduler))
        print(f"{scheduler}: {time.monotonic() - started:.0f}s, GPU-s {outcomes[scheduler].summary.resource_seconds}")
    _keep_record(outcomes)
    return outcomes


def most_at_once(search: Path) -> int:
    """The most trials running at one moment, from each trial's first and last Tune result."""
    spans = []
    for folder in search.glob("tune-*"):
        reports = [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]
        spans.append((reports[0]["timestamp"] - reports[0]["time_total_s"], reports[-1]["timestamp"]))
    return max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)


def test_trials_run_two_at_a_time_with_one_gpu_each(searches):
    for outcome in searches.values():
        summary = outcome.summary
        assert summary.max_concurrent_trials == 2 and summary.resources_per_trial["GPU"] == 1.0
        assert summary.num_trials == 4 and summary.num_errors == 0
        assert most_at_once(Path(outcome.search_dir)) == 2


def test_asha_stops_absurd_trials_and_saves_gpu_seconds(searches):
    asha, fifo = searches["asha"].summary, searches["fifo"].summary
    stopped = [row for row in asha.trials if row["stopped_early"]]
    assert any(row["params"]["train.learning_rate"] in ABSURD_LRS for row in stopped)
    assert all(row["steps"] == MAX_STEPS for row in fifo.trials)
    assert asha.best_trial["params"]["train.learning_rate"] in SANE_LRS
    assert asha.resource_seconds["GPU"] < fifo.resource_seconds["GPU"]


def _keep_record(outcomes) -> None:
    out = os.environ.get("OUT")
    if not out:
        return
    record = {}
    for scheduler, outcome in outcomes.items():
        summary = outcome.summary
        record[scheduler] = {
            "gpu_seconds": summary.resource_seconds.get("GPU"),
            "wall_time_s": summary.wall_time_s,
            "trials": [
                {key: row[key] for key in ("trial", "params", "best", "steps", "stopped_by", "wall_time_s")}
                for row in summary.trials
            ],
        }
        shutil.copy(Path(outcome.search_dir) / "leaderboard.md", Path(out) / f"leaderboard-{scheduler}.md")
    record["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    (Path(out) / "search_gpu.json").write_text(json.dumps(record, indent=2))
