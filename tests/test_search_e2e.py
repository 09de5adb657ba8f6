"""End to end on CPU: Ray Tune searches over Ray Train runs of a tiny random Mistral (the real Mistral v0.3 tokenizer).

1. `medray tune` (the CLI, in this process, on a local 2-CPU Ray): 4 trials, 2 at a time, two with an absurd
   learning rate. ASHA stops at least one trial before its last step (read from the trials' own Tune results), the
   best trial is a sane one, its adapter and preset are written, and afterwards every CPU is free again.
2. `ray job submit python jobs/tune.py` on a token-authenticated head: the job is stopped (`ray job stop`) after its
   first trial finished; submitting the same command again resumes the search, keeps the finished trial without
   running it again, and completes the other.
"""

from __future__ import annotations

import csv
import json
import time
import uuid
from pathlib import Path

import pytest
from raycluster import local_ray_cluster

from medray.cli import main
from medray.config import load_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY_PRESET = "tiny-test"
SANE_LRS = (1.0e-2, 5.0e-3)
ABSURD_LRS = (10.0, 50.0)


def search_overrides(model_dir: Path, storage: Path, name: str, learning_rates, *extra: str) -> list[str]:
    grid = ", ".join(str(lr) for lr in learning_rates)
    return [
        f"model.name={model_dir}",
        f"run.storage_path={storage}",
        f"run.name={name}",
        f"tune.space={{train.learning_rate: {{grid: [{grid}]}}}}",
        "tune.num_samples=1",
        "tune.max_steps=4",
        "train.eval_steps=2",
        "tune.grace_period=2",
        "train.early_stopping_patience=0",  # only ASHA stops trials early here
        *extra,
    ]


def tune_results(search: Path) -> dict[str, list[dict]]:
    """Each trial's reports as Tune recorded them (`tune-<trial>/result.json`), by trial id."""
    results = {}
    for folder in sorted(search.glob("tune-*")):
        if not (folder / "result.json").is_file():  # a trial that has not started yet
            continue
        lines = (folder / "result.json").read_text().splitlines()
        results[folder.name.removeprefix("tune-")] = [json.loads(line) for line in lines if line.strip()]
    return results


def wait_until_free(ray, timeout_s: float = 60) -> dict[str, float]:
    """Poll until every CPU and the trials' memory reservations are back; return what is still held."""
    deadline = time.monotonic() + timeout_s
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        held = {
            name: total[name] - free.get(name, 0.0) for name in ("CPU", "memory") if total[name] > free.get(name, 0)
        }
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(1)


@pytest.fixture(scope="module")
def asha_search(ray_local, tiny_mistral_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("searches")
    argv = ["tune", "--config", TINY_PRESET]
    argv += search_overrides(tiny_mistral_dir, storage, "asha", (*SANE_LRS, *ABSURD_LRS))
    started = time.monotonic()
    code = main(argv)
    print(f"4-trial ASHA search took {time.monotonic() - started:.0f}s")
    assert code == 0
    search = storage / "asha"
    return ray_local, search, json.loads((search / "summary.json").read_text())


def most_at_once(results: dict[str, list[dict]]) -> int:
    """The most trials that were running at the same moment, from each trial's first and last report."""
    spans = [
        (reports[0]["timestamp"] - reports[0]["time_total_s"], reports[-1]["timestamp"]) for reports in results.values()
    ]
    return max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)


def test_trials_ran_two_at_a_time_and_asha_stopped_some_early(asha_search):
    _, search, summary = asha_search
    assert summary["num_trials"] == 4 and summary["max_concurrent_trials"] == 2  # 2 CPUs / 1 worker of 1 CPU
    results = tune_results(search)
    assert len(results) == 4
    assert most_at_once(results) == 2
    steps = {trial: max(report["step"] for report in reports) for trial, reports in results.items()}
    iterations = {trial: max(report["training_iteration"] for report in reports) for trial, reports in results.items()}
    stopped = [trial for trial, last in steps.items() if last < 4]
    assert stopped, f"ASHA stopped no trial: {steps}"
    assert all(iterations[trial] < 2 for trial in stopped)  # reports every 2 steps: stopped after the first rung
    assert summary["num_stopped_early"] == len(stopped)
    lr_of = {row["trial"]: row["params"]["train.learning_rate"] for row in summary["trials"]}
    assert any(lr_of[trial] in ABSURD_LRS for trial in stopped)


def test_best_trial_is_sane_and_its_adapter_and_preset_exist(asha_search):
    _, search, summary = asha_search
    best = summary["best_trial"]
    assert best["params"]["train.learning_rate"] in SANE_LRS
    assert best["best"] == min(row["best"] for row in summary["trials"] if row["best"] is not None)
    checkpoint = Path(summary["best_checkpoint"])
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert checkpoint.is_relative_to(search / "trials" / f"asha-trial-{best['trial']}")

    preset = load_config(summary["best_config"])
    assert preset.train.learning_rate == best["params"]["train.learning_rate"] and preset.train.max_steps == 4
    assert preset.run.name == "asha-best"


def test_leaderboard_lists_every_trial_best_first(asha_search):
    _, search, summary = asha_search
    with (search / "leaderboard.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["trial", "train.learning_rate", "best_eval_loss", "steps", "stopped_early", "wall_time_s"]
    assert [row["trial"] for row in rows] == [trial["trial"] for trial in summary["trials"]]
    assert rows[0]["trial"] == summary["best_trial"]["trial"]
    losses = [float(row["best_eval_loss"]) for row in rows]
    assert losses == sorted(losses)
    assert "Tune leaderboard" in Path(summary["report"]).read_text()
    assert (search / "leaderboard.md").read_text().count("\n| ") == 5  # header + 4 trials


def test_cluster_resources_are_all_free_after_the_search(asha_search):
    ray, _, _ = asha_search
    assert wait_until_free(ray) == {}
    groups = ray.util.placement_group_table().values()
    assert [group for group in groups if group["state"] != "REMOVED"] == []


def saved_trial_states(search: Path) -> dict[str, str]:
    """Trial id -> status in Tune's saved experiment state (what a restore starts from)."""
    states = {}
    for path in search.glob("experiment_state-*.json"):
        try:
            saved = json.loads(path.read_text())
        except ValueError:  # being written
            continue
        for trial_json, _ in saved["trial_data"]:
            trial = json.loads(trial_json)
            states[trial["trial_id"]] = trial["status"]
    return states


def wait_for_a_finished_trial(cluster, submission_id: str, search: Path, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        finished = [trial for trial, status in saved_trial_states(search).items() if status == "TERMINATED"]
        if finished:
            return finished[0]
        status = cluster.job_info(submission_id)["status"]
        assert status == "RUNNING" or status == "PENDING", cluster.ray("job", "logs", submission_id).stdout[-4000:]
        time.sleep(2)
    raise TimeoutError(f"no trial of {search} finished within {timeout_s}s")


def files_of(folder: Path) -> dict[str, float]:
    return {str(path.relative_to(folder)): path.stat().st_mtime for path in folder.rglob("*") if path.is_file()}


def test_stopped_search_job_resumes_without_rerunning_finished_trials(tiny_mistral_dir, tmp_path):
    storage = tmp_path / "results"
    entrypoint = ["python", "jobs/tune.py", "--config", TINY_PRESET]
    entrypoint += search_overrides(
        tiny_mistral_dir,
        storage,
        "resumable",
        SANE_LRS,
        "tune.max_steps=2",  # one evaluation per trial: the test is about the search, not the training
        "tune.scheduler=fifo",
        "tune.max_concurrent_trials=1",
    )
    search = storage / "resumable"
    with local_ray_cluster(num_cpus=2) as head:
        first = f"medray-tune-{uuid.uuid4().hex[:8]}"
        submitted = head.ray(
            "job", "submit", "--no-wait", "--submission-id", first, "--working-dir", ".", "--", *entrypoint, cwd=ROOT
        )
        assert submitted.returncode == 0, submitted.stderr
        finished = wait_for_a_finished_trial(head, first, search)
        finished_run = search / "trials" / f"resumable-trial-{finished}"
        before = (tune_results(search)[finished], files_of(finished_run))
        assert head.ray("job", "stop", first).returncode == 0
        assert head.wait_for_job(first, timeout_s=120)["status"] == "STOPPED"
        assert not (search / "summary.json").exists()

        second = f"medray-tune-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        result = head.ray(
            "job", "submit", "--submission-id", second, "--working-dir", ".", "--", *entrypoint, cwd=ROOT, timeout=900
        )
        print(f"resumed search took {time.monotonic() - started:.0f}s")
        assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
        logs = head.ray("job", "logs", second).stdout
        # The search's last line (Ray may still print a worker's log line after it).
        assert f"summary: {search / 'summary.json'}" in logs.splitlines()
        assert "resuming the search" in logs
        assert head.alive_actors("RayTrainWorker") == []

    summary = json.loads((search / "summary.json").read_text())
    assert summary["num_trials"] == 2 and summary["num_errors"] == 0
    assert [row["steps"] for row in summary["trials"]] == [2, 2]
    # The finished trial was kept as it was: no new Tune result, no file of its Ray Train run touched.
    assert (tune_results(search)[finished], files_of(finished_run)) == before
