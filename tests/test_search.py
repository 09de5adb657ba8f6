"""Ray Tune search (`medray.search`): the `tune` config -> Ray Tune mapping, checks, concurrency and the leaderboard.

Fast tests check the config -> sampler mapping, every config problem named at once, the concurrency derived from the
cluster, and the leaderboard / best-config files from recorded trial results. The slow end-to-end search (4 trials on
a tiny random Mistral, two with an absurd learning rate) lives in `test_search_e2e.py`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from ray import tune
from ray.tune.search import sample
from ray.tune.search.variant_generator import generate_variants

from medray import search_space
from medray.config import ConfigError, MedrayConfig, load_config
from medray.leaderboard import leaderboard_rows, write_search_outcome
from medray.search import build_scheduler, trial_config
from medray.search_space import WORST_METRIC

TINY_PRESET = "tiny-test"


def config(*overrides: str) -> MedrayConfig:
    return load_config(TINY_PRESET, list(overrides))


# -- config -> Ray Tune samplers -------------------------------------------------------------------------------------


def test_every_sampler_maps_onto_its_ray_tune_domain():
    cfg = config(
        "tune.space={"
        "train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}, "
        "lora.dropout: {uniform: [0.0, 0.1]}, "
        "train.weight_decay: {quniform: [0.0, 0.1, 0.01]}, "
        "train.max_grad_norm: {qloguniform: [0.1, 10.0, 0.1]}, "
        "train.warmup_steps: {randint: [0, 20]}, "
        "train.eval_steps: {qrandint: [2, 10, 2]}, "
        "lora.alpha: {lograndint: [8, 64]}, "
        "lora.r: {choice: [8, 16, 32]}, "
        "train.lr_scheduler: {grid: [linear, cosine]}}"
    )
    space = search_space.param_space(cfg.tune)

    lr = space["train.learning_rate"]
    assert isinstance(lr, sample.Float) and isinstance(lr.get_sampler(), sample.LogUniform)
    assert (lr.lower, lr.upper) == (1e-5, 1e-3)
    assert isinstance(space["lora.dropout"].get_sampler(), sample.Uniform)
    assert isinstance(space["train.weight_decay"].get_sampler(), sample.Quantized)
    assert space["train.weight_decay"].get_sampler().q == 0.01
    assert isinstance(space["train.max_grad_norm"].get_sampler().get_sampler(), sample.LogUniform)
    warmup = space["train.warmup_steps"]
    assert isinstance(warmup, sample.Integer) and (warmup.lower, warmup.upper) == (0, 20)
    assert space["train.eval_steps"].get_sampler().q == 2
    assert isinstance(space["lora.alpha"].get_sampler(), sample.LogUniform)
    assert isinstance(space["lora.r"], sample.Categorical) and space["lora.r"].categories == [8, 16, 32]
    assert space["train.lr_scheduler"] == tune.grid_search(["linear", "cosine"])


def test_samples_fall_inside_the_space_and_make_valid_trial_configs():
    cfg = config(
        "tune.space={train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}, lora.r: {choice: [8, 16]}, "
        "train.warmup_steps: {randint: [0, 3]}}"
    )
    space = search_space.param_space(cfg.tune)
    for _ in range(20):
        params = {key: domain.sample() for key, domain in space.items()}
        trial = trial_config(cfg.to_dict(), params, trial_id="abc_00001", max_steps=7, search_path="/x/search")
        assert 1e-5 <= trial.train.learning_rate <= 1e-3
        assert trial.lora.r in (8, 16) and 0 <= trial.train.warmup_steps < 3
        assert trial.train.max_steps == 7
        assert (trial.run.name, trial.run.storage_path) == ("tiny-test-trial-abc_00001", "/x/search/trials")


def test_space_can_be_nested_yaml_and_overrides_add_to_it(tmp_path):
    preset = tmp_path / "search.yaml"
    preset.write_text(
        "tune:\n  space:\n    lora:\n      r: {choice: [4, 8]}\n      dropout: {uniform: [0.0, 0.2]}\n"
        "    train.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n"
    )
    cfg = load_config(preset, ["tune.space.train.warmup_steps={randint: [0, 4]}"])
    assert cfg.tune.space == {
        "lora.r": {"choice": [4, 8]},
        "lora.dropout": {"uniform": [0.0, 0.2]},
        "train.learning_rate": {"loguniform": [1e-4, 1e-2]},
        "train.warmup_steps": {"randint": [0, 4]},
    }


def test_numbers_written_as_yaml_strings_are_read_as_numbers():
    # PyYAML reads `1e-5` (no dot) as a string; the sampler arguments are made numbers anyway.
    cfg = config("tune.space.train.learning_rate={loguniform: [1e-5, 1e-3]}")
    assert cfg.tune.space["train.learning_rate"] == {"loguniform": [1e-5, 1e-3]}


def test_grid_times_num_samples_is_the_number_of_trials():
    cfg = config("tune.space={train.learning_rate: {grid: [1.0e-3, 1.0e-2, 10.0]}, lora.r: {grid: [4, 8]}}")
    assert search_space.number_of_trials(cfg.tune.model_copy(update={"num_samples": 2})) == 12
    variants = list(generate_variants(search_space.param_space(cfg.tune)))
    assert len(variants) == 6


def test_default_space_is_a_learning_rate_and_lora_search():
    cfg = MedrayConfig()
    assert set(cfg.tune.space) == {"train.learning_rate", "lora.r", "lora.alpha"}
    assert cfg.tune.metric == "eval_loss" and cfg.tune.mode == "min" and cfg.tune.scheduler == "asha"
    search_space.check_search(cfg)


# -- every problem named before anything starts ---------------------------------------------------------------------


def test_one_config_error_names_every_bad_dimension():
    with pytest.raises(ConfigError) as caught:
        config(
            "tune.space={"
            "lora.rank: {choice: [8]}, "  # not a setting
            "scaling.num_workers: {choice: [1, 2]}, "  # changes what a trial reserves
            "train.learning_rate: {loguniform: [0, 1.0e-3]}, "  # log of 0
            "lora.dropout: {gaussian: [0.0, 0.1]}, "  # unknown sampler
            "train.weight_decay: {uniform: [0.1]}, "  # missing high
            "lora.alpha: {choice: []}, "  # nothing to choose
            "train.max_grad_norm: {uniform: [2.0, 1.0]}}"  # low > high
        )
    message = str(caught.value)
    assert "7 problem(s)" in message
    for expected in (
        "lora.rank is not a setting",
        "scaling.num_workers cannot be searched",
        "loguniform needs low > 0",
        "SAMPLER one of uniform",
        "uniform takes [low, high]",
        "choice needs at least one value",
        "uniform needs low < high",
    ):
        assert expected in message


def test_an_integer_setting_needs_an_integer_sampler():
    with pytest.raises(ConfigError, match="lora.r takes whole numbers: use randint"):
        config("tune.space.lora.r={uniform: [4, 16]}")


def test_values_a_sampler_can_draw_are_checked_against_the_setting():
    cfg = config("tune.space={lora.r: {choice: [0, 8]}, lora.dropout: {uniform: [0.0, 1.0]}}")
    with pytest.raises(ConfigError) as caught:
        search_space.check_search(cfg)
    message = str(caught.value)
    assert "tune.space.lora.r can draw 0: lora.r" in message
    assert "tune.space.lora.dropout can draw 1.0" in message


def test_search_needs_a_validation_split_and_an_evaluation_before_the_end():
    cfg = config("data.validation_fraction=0", "tune.max_steps=4", "train.eval_steps=5", "tune.grace_period=6")
    with pytest.raises(ConfigError) as caught:
        search_space.check_search(cfg)
    message = str(caught.value)
    assert "needs a validation split" in message
    assert "train.eval_steps=5 is more than the 4 steps" in message
    assert "tune.grace_period=6 is more than the 4 steps" in message


# -- scheduler, resources, concurrency ------------------------------------------------------------------------------


def test_asha_counts_optimizer_steps_and_lets_finishing_trials_finish():
    cfg = config("tune.reduction_factor=3")
    asha = build_scheduler(cfg.tune, max_steps=40, eval_steps=5)
    assert asha._time_attr == "step" and asha._max_t == 40
    assert asha._reduction_factor == 3 and not asha._stop_last_trials
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [15, 5]  # grace defaults to eval_steps
    assert type(build_scheduler(config("tune.scheduler=fifo").tune, 40, 5)).__name__ == "FIFOScheduler"


def test_trial_driver_reserves_no_cpu_by_default():
    assert search_space.trial_resources(config().tune) == {"CPU": 0, "memory": 64 * 1024**2}
    assert search_space.trial_resources(config("tune.trial_cpus=0.5").tune) == {"CPU": 0.5}
    tune.with_resources(lambda params: None, search_space.trial_resources(config().tune))  # a reservation Tune accepts


@pytest.mark.parametrize(
    ("overrides", "cluster", "expected"),
    [
        (["scaling.use_gpu=true"], {"CPU": 32.0, "GPU": 2.0}, 2),  # 2 GPUs, 1 GPU worker per trial
        (["scaling.use_gpu=true", "scaling.num_workers=2"], {"CPU": 64.0, "GPU": 8.0}, 4),
        ([], {"CPU": 2.0}, 2),  # the 2-core CPU machine: one 1-CPU worker per trial
        (["tune.trial_cpus=0.5"], {"CPU": 2.0}, 1),  # the trial's own CPU counts too
        (["scaling.use_gpu=true", "tune.max_concurrent_trials=3"], {"CPU": 2.0, "GPU": 1.0}, 3),  # set: kept
    ],
)
def test_concurrency_is_what_the_cluster_holds(overrides, cluster, expected):
    assert search_space.max_concurrent_trials(config(*overrides), cluster) == expected


def test_a_trial_bigger_than_the_cluster_is_a_config_error():
    with pytest.raises(ConfigError, match=r"one trial needs \{'CPU': 2.0, 'GPU': 2.0\}.*tune.max_concurrent_trials"):
        search_space.max_concurrent_trials(
            config("scaling.use_gpu=true", "scaling.num_workers=2"), {"CPU": 16.0, "GPU": 1.0}
        )


# -- metrics into Tune ----------------------------------------------------------------------------------------------


def test_a_diverged_metric_becomes_the_worst_value():
    assert search_space.finite_metric({"eval_loss": 1.5, "step": 2}, "eval_loss", WORST_METRIC) == {
        "eval_loss": 1.5,
        "step": 2,
    }
    for bad in (float("nan"), float("inf"), None, 1e31):
        report = {"eval_loss": bad, "step": 2} if bad is not None else {"step": 2}
        assert search_space.finite_metric(report, "eval_loss", WORST_METRIC)["eval_loss"] == WORST_METRIC
    assert (
        search_space.finite_metric({"eval_loss": float("nan")}, "eval_loss", -WORST_METRIC)["eval_loss"]
        == -WORST_METRIC
    )


# -- leaderboard, best config, summary ------------------------------------------------------------------------------


def fake_result(trial_id: str, lr: float, losses: list[float], step_every: int = 2, error=None, seconds: float = 10):
    """What Tune's ResultGrid holds for a trial: its config and the reports it made."""
    rows = [
        {
            "eval_loss": loss,
            "step": step_every * (i + 1),
            "time_total_s": seconds * (i + 1),
            "checkpoint_path": f"/ckpt/{trial_id}/{i}",
            "trial_id": trial_id,
        }
        for i, loss in enumerate(losses)
    ]
    return SimpleNamespace(
        config={"train.learning_rate": lr},
        metrics=rows[-1] if rows else {},
        metrics_dataframe=pd.DataFrame(rows) if rows else None,
        error=error,
        path=f"/search/tune-{trial_id}",
    )


@pytest.fixture
def recorded_search(tmp_path):
    cfg = config(
        f"run.storage_path={tmp_path}",
        "run.name=fake",
        "tune.space.train.learning_rate={grid: [1.0e-3, 1.0e-2, 10.0, 50.0]}",
        "tune.max_steps=6",
    )
    results = [
        fake_result("t_00000", 1e-3, [2.0, 1.9, 1.8]),
        fake_result("t_00001", 1e-2, [1.9, 1.5, 1.6]),  # best at step 4, not at the end
        fake_result("t_00002", 10.0, [WORST_METRIC]),  # diverged (NaN was reported as the worst value)
        fake_result("t_00003", 50.0, [9.0]),
    ]
    folder = tmp_path / "fake"
    folder.mkdir()
    outcome = write_search_outcome(
        cfg, {"rows_train": 10}, ResultGrid(results, folder), max_steps=6, concurrency=2, wall_time_s=40.0
    )
    return cfg, outcome, folder


class ResultGrid(list):
    """Iterates over results and knows the search folder, like Tune's ResultGrid."""

    def __init__(self, results, folder: Path):
        super().__init__(results)
        self.experiment_path = str(folder)


def test_leaderboard_csv_ranks_trials_and_marks_early_stops(recorded_search):
    _, _, folder = recorded_search
    with (folder / "leaderboard.csv").open() as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["trial", "train.learning_rate", "best_eval_loss", "steps", "stopped_early", "wall_time_s"]
    assert [row[0] for row in rows[1:]] == ["t_00001", "t_00000", "t_00003", "t_00002"]
    assert rows[1][1:] == ["0.01", "1.5", "6", "False", "30.0"]
    assert rows[3][1:] == ["50", "9", "2", "True", "10.0"]
    assert rows[4][2] == "nan" and rows[4][4] == "True"  # the diverged trial ranks last


def test_summary_names_the_best_trial_and_its_checkpoint(recorded_search):
    _, outcome, folder = recorded_search
    summary = json.loads((folder / "summary.json").read_text())
    assert summary == json.loads(outcome.summary.to_json())
    best = summary["best_trial"]
    assert best["trial"] == "t_00001" and best["best_step"] == 4 and best["params"] == {"train.learning_rate": 0.01}
    assert summary["best_checkpoint"] == "/ckpt/t_00001/1/checkpoint"  # the report at the best step
    assert summary["metrics"]["best"] == {"eval_loss": 1.5, "step": 4}
    assert summary["num_trials"] == 4 and summary["num_stopped_early"] == 2 and summary["max_concurrent_trials"] == 2
    assert summary["resource_seconds"] == {"CPU": 80.0}  # 30 + 30 + 10 + 10 seconds x 1 CPU
    assert [trial["stopped_by"] for trial in summary["trials"]] == [None, None, "scheduler", "scheduler"]
    assert Path(summary["report"]).is_file()
    assert "Tune leaderboard" in Path(summary["report"]).read_text()


def test_best_config_is_a_preset_that_trains_the_best_trial(recorded_search):
    cfg, outcome, folder = recorded_search
    path = Path(outcome.summary.best_config)
    assert path == folder / "best_config.yaml"
    assert path.read_text().startswith(f"# medray train --config {path}\n")
    best = load_config(path)
    assert best.train.learning_rate == 0.01 and best.train.max_steps == 6
    assert best.run.name == "fake-best" and best.model.name == cfg.model.name
    assert best.tune == MedrayConfig().tune  # the search section is left out


def test_leaderboard_markdown_shows_the_table_and_how_to_train_the_best(recorded_search):
    _, outcome, folder = recorded_search
    markdown = (folder / "leaderboard.md").read_text()
    assert "| 1 | t_00001 | 0.01 | 1.5000 | 6 / 6 | no | 30 |" in markdown
    assert "| 4 | t_00002 | 10 | diverged | 2 / 6 | scheduler | 10 |" in markdown
    assert f"medray train --config {outcome.summary.best_config}" in markdown


def test_failed_and_silent_trials_rank_last():
    cfg = config("tune.space.train.learning_rate={grid: [1.0e-3, 1.0e-2]}", "tune.max_steps=6")
    results = [
        fake_result("t_00000", 1e-3, [], error=RuntimeError("worker died\ntrace")),
        fake_result("t_1", 1e-2, [3]),
    ]
    rows = leaderboard_rows(cfg, results, max_steps=6)
    assert [row["trial"] for row in rows] == ["t_1", "t_00000"]
    assert rows[1]["error"] == "worker died" and rows[1]["stopped_by"] == "error" and not rows[1]["stopped_early"]
    assert rows[1]["steps"] == 0 and math.isclose(rows[0]["best"], 3.0)


def test_resuming_with_another_config_is_refused_before_ray_starts(tmp_path, monkeypatch):
    from medray import search

    first = config(f"run.storage_path={tmp_path}", "run.name=again", "tune.max_steps=6")
    folder = tmp_path / "again"
    search._write_search_config(first, str(folder))
    (folder / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    monkeypatch.setattr(search.ray, "init", lambda *a, **k: pytest.fail("Ray started before the config was checked"))
    changed = config(f"run.storage_path={tmp_path}", "run.name=again", "tune.max_steps=6", "lora.r=4")
    with pytest.raises(ConfigError, match=r"started with another config: lora.r \(was 8, now 4\)"):
        search.run_search(changed)


def test_ledger_hands_back_the_groups_of_ended_trials_once():
    from medray._ray_placement import PlacementGroupLedger

    ledger = PlacementGroupLedger()
    ledger.add("a", "group-a1")
    ledger.add("a", "group-a2")  # a retried trial starts a second worker group
    ledger.add("b", "group-b")
    assert ledger.pop(["a", "unknown"]) == ["group-a1", "group-a2"]
    assert ledger.pop(["a"]) == []
    assert ledger.pop(None) == ["group-b"]
