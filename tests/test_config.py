"""Config: defaults are the reference recipe, presets load, bad configs name every problem."""

from pathlib import Path

import pytest

from medray.config import ConfigError, MedrayConfig, load_config
from medray.presets import preset_names, preset_path, resolve_preset

PRESETS = [preset_path(name) for name in preset_names()]


def test_defaults_are_the_reference_recipe():
    cfg = MedrayConfig()
    assert cfg.model.name == "unsloth/mistral-7b-instruct-v0.3-bnb-4bit"
    assert (cfg.data.hub_id, cfg.data.hub_config) == ("FreedomIntelligence/medical-o1-reasoning-SFT", "en")
    assert (cfg.lora.r, cfg.lora.alpha) == (16, 16)
    assert (cfg.train.per_device_batch_size, cfg.train.gradient_accumulation_steps) == (4, 4)
    assert cfg.train.learning_rate == 2e-4 and cfg.train.optim == "adamw_8bit"
    assert cfg.data.max_length == 2048 and cfg.data.validation_fraction == 0.1
    assert cfg.train.eval_steps == 200 and cfg.train.early_stopping_patience == 3
    # One departure: the loss covers the completion; the reference preset trains every token, as the recipe did.
    assert cfg.train.loss_on == "completion"
    assert load_config("mistral7b-medical-o1").train.loss_on == "all"


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_names_its_command(preset: Path):
    cfg = load_config(preset)
    assert isinstance(cfg, MedrayConfig)
    first_line = preset.read_text().splitlines()[0]
    assert first_line.startswith("# ") and preset.stem in first_line


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.max_steps=20", "scaling.num_workers=2", "train.learning_rate=1e-4"])
    assert cfg.train.max_steps == 20 and cfg.scaling.num_workers == 2 and cfg.train.learning_rate == 1e-4


def test_one_error_names_every_problem():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["train.lr=1", "scaling.num_workers=0", "model.backend=tpu", "data.max_length=big"])
    message = str(caught.value)
    assert "4 problem(s)" in message
    assert "train.lr: unknown key" in message and "learning_rate" in message  # lists the allowed keys
    assert "scaling.num_workers" in message and "model.backend" in message and "data.max_length" in message


def test_unknown_section_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="trainer: unknown key"):
        load_config(None, ["trainer.max_steps=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.max_steps"])


def test_template_must_hold_every_field():
    with pytest.raises(ConfigError, match="cot"):
        load_config(None, ["data.template='{question} {response}'"])


def test_missing_preset_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="cpu-demo"):
        resolve_preset("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_round_trip_through_plain_dict():
    cfg = load_config(None, ["lora.r=8", "run.name=x"])
    assert MedrayConfig.from_dict(cfg.to_dict()) == cfg


def test_old_column_keys_still_name_the_columns():
    cfg = load_config(None, ["data.question_column=q", "data.cot_column=why", "data.response_column=a"])
    assert (cfg.data.columns.question, cfg.data.columns.reasoning, cfg.data.columns.answer) == ("q", "why", "a")
    [source] = cfg.data.resolved_sources()
    assert source.columns == cfg.data.columns and source.hub_id == cfg.data.hub_id


def test_sources_name_every_problem():
    sources = [
        {"path": "a.jsonl", "weight": 0},
        {"path": "b", "row_format": "messages"},
        {"path": "b", "row_format": "qa"},
        {"hub_id": "x", "path": "y"},
    ]
    with pytest.raises(ConfigError) as caught:
        MedrayConfig.from_dict({"data": {"sources": sources, "format": "chat"}})
    message = str(caught.value)
    assert "data.sources.0.weight: Input should be greater than 0 (got 0)" in message
    assert "exactly one of path or hub_id" in message
    with pytest.raises(ConfigError, match="sources reading b give it different row formats"):
        MedrayConfig.from_dict({"data": {"sources": sources[1:3], "format": "chat"}})
    with pytest.raises(ConfigError, match="data.path or data.sources, not both"):
        MedrayConfig.from_dict({"data": {"sources": sources[1:2], "path": "z", "format": "chat"}})


def test_chat_rows_need_the_chat_format():
    with pytest.raises(ConfigError, match="source b holds chat rows, which need data.format=chat"):
        MedrayConfig.from_dict({"data": {"sources": [{"path": "b", "row_format": "messages"}]}})


def test_presets_are_found_by_name_and_at_their_old_path():
    assert resolve_preset("tiny-test") == resolve_preset("tiny-test.yaml") == preset_path("tiny-test")
    assert resolve_preset("jobs/configs/tiny-test.yaml") == preset_path("tiny-test")
    assert load_config("cpu-demo").run.name == "medray-demo"
