"""Several sources in one run (medray.mixing), chat rows, and bad chat data, with the real Mistral v0.3 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medray.config import MedrayConfig
from medray.data import DataError, build_datasets

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer(chat_tokenizer):
    """The tests here read chat rows: conftest's `chat_tokenizer`, with the chat template."""
    return chat_tokenizer


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _team_rows(count: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"Team question {i}?"}, {"role": "assistant", "content": f"{i}."}]}
        for i in range(count)
    ]


def _config(data: dict, **train) -> MedrayConfig:
    return MedrayConfig.from_dict({"data": data, "train": train})


def test_two_sources_are_split_on_their_own_and_mixed_by_weight(ray_local, tokenizer, tmp_path, medical_o1_demo):
    team = _write_jsonl(tmp_path / "team.jsonl", _team_rows(20))
    sources = [
        {"path": str(medical_o1_demo), "max_rows": 60, "name": "medical-o1"},
        {"path": str(team), "weight": 2, "name": "team"},
    ]
    data = build_datasets(_config({"sources": sources, "format": "chat", "validation_fraction": 0.1}), tokenizer)
    o1, mine = data.stats["sources"]
    assert (o1["name"], o1["row_format"], o1["rows_read"], o1["rows_validation"], o1["rows_train"]) == (
        "medical-o1",
        "qa",
        60,
        6,
        54,
    )
    assert (mine["row_format"], mine["rows_read"], mine["rows_validation"], mine["rows_train"]) == (
        "messages",
        20,
        2,
        36,  # 18 training rows, each twice
    )
    assert data.stats["rows_train"] == 90 and data.stats["rows_validation"] == 8
    train = [tokenizer.decode(row["input_ids"]) for row in data.train.take_all()]
    validation = [tokenizer.decode(row["input_ids"]) for row in data.validation.take_all()]
    assert sum("Team question" in text for text in validation) == 2
    assert len({text for text in train if "Team question" in text}) == 18  # every team row, twice
    assert not {text for text in train} & {text for text in validation}
    # Shuffled with the seed: the team's rows are spread through the training order, not in one block.
    positions = [i for i, text in enumerate(train) if "Team question" in text]
    assert positions[0] < 30 and positions[-1] > 60
    row = data.train.take(1)[0]
    assert row["labels"][0] == IGNORE and row["labels"][-1] == row["input_ids"][-1]
    assert data.stats["loss_tokens_train"] < data.stats["tokens_train"]


def test_a_fractional_weight_takes_a_seeded_share(ray_local, tokenizer, tmp_path):
    team = _write_jsonl(tmp_path / "team.jsonl", _team_rows(40))
    config = _config({"sources": [{"path": str(team), "weight": 0.5}], "format": "chat", "validation_fraction": 0.1})
    first, again = build_datasets(config, tokenizer), build_datasets(config, tokenizer)
    assert first.stats["sources"][0]["rows_train"] == 18 and first.stats["rows_validation"] == 4
    ids = sorted(tuple(row["input_ids"]) for row in first.train.take_all())
    assert ids == sorted(tuple(row["input_ids"]) for row in again.train.take_all())


def test_rows_cut_inside_the_question_are_dropped_and_counted(ray_local, tokenizer, tmp_path):
    rows = [{"Question": f"Q{i}?", "Complex_CoT": "Think.", "Response": "Yes."} for i in range(10)]
    for number, row in enumerate(rows[:3]):
        row["Question"] = f"Why fever {number}? " * 40  # distinct: data.dedupe keeps one of repeated rows
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    short = {"path": str(path), "template": "Q: {question}\nA: <think>{cot}</think>{response}", "max_length": 40}
    data = build_datasets(_config({**short, "validation_fraction": 0}), tokenizer)
    assert data.stats["rows_dropped_cut_in_prompt"] == 3 and data.stats["rows_train"] == 7
    assert data.stats["rows_truncated"] == 0
    every = build_datasets(_config({**short, "validation_fraction": 0}, loss_on="all"), tokenizer)
    assert every.stats["rows_dropped_cut_in_prompt"] == 0 and every.stats["rows_truncated"] == 3
    long_only = _write_jsonl(tmp_path / "long.jsonl", rows[:3])
    with pytest.raises(DataError, match="long.jsonl: no usable rows left .3 read.: data.max_length=40 cuts every one"):
        build_datasets(_config({**short, "path": str(long_only)}), tokenizer)


# --- bad chat data: one error each, on the driver, before any Ray task ---------------------------------------------


@pytest.mark.parametrize(
    ("turns", "words"),
    [
        ([{"role": "user", "content": "Dose?"}], "line 2: 'messages' has no assistant turn"),
        (
            [{"role": "user", "content": "Dose?"}, {"role": "doctor", "content": "Ten."}],
            "line 2: 'messages' turn 2 has the unknown role 'doctor'; use one of system, user, assistant",
        ),
        (
            [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content": " "}],
            "line 2: 'messages' has an empty assistant turn",
        ),
    ],
)
def test_bad_messages_rows_name_file_and_line(tokenizer, tmp_path, turns, words):
    path = _write_jsonl(tmp_path / "chat.jsonl", [*_team_rows(1), {"messages": turns}])
    with pytest.raises(DataError, match=f"chat.jsonl, {words}"):
        build_datasets(_config({"path": str(path), "format": "chat"}), tokenizer)


def test_unknown_sharegpt_speaker(tokenizer, tmp_path):
    turns = [{"from": "human", "value": "Dose?"}, {"from": "bot", "value": "Ten."}]
    path = _write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": turns}])
    with pytest.raises(DataError, match="turn 2 has the unknown from 'bot'; use one of system, human, user, gpt"):
        build_datasets(_config({"path": str(path), "format": "chat"}), tokenizer)


def test_folder_with_two_row_formats_is_refused(tokenizer, tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", _team_rows(2))
    _write_jsonl(tmp_path / "b.jsonl", [{"Question": "q", "Complex_CoT": "c", "Response": "r"}])
    with pytest.raises(DataError, match="mixes row formats .*a.jsonl holds messages rows, b.jsonl holds qa rows"):
        build_datasets(_config({"path": str(tmp_path), "format": "chat"}), tokenizer)


def test_chat_rows_in_template_format_and_chat_format_without_a_template(mistral_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir))  # v0.3's sentencepiece model: no chat template
    path = _write_jsonl(tmp_path / "chat.jsonl", _team_rows(2))
    with pytest.raises(DataError, match="data.format=chat needs the tokenizer's chat template"):
        build_datasets(_config({"path": str(path), "format": "chat"}), plain)
    with pytest.raises(DataError, match="holds messages rows, which need data.format=chat"):
        build_datasets(_config({"path": str(path)}), plain)


# --- the trainer's loss follows the labels -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_reported_validation_loss_covers_the_completion_only(ray_local, tiny_mistral_dir, tmp_path):
    """An (almost) untrained step: eval_loss must equal the base model's loss over the completion tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from medray.config import load_config
    from medray.driver import prepare_data, run_training

    overrides = [
        f"model.name={tiny_mistral_dir}",
        f"run.storage_path={tmp_path}",
        "train.learning_rate=1e-12",
        "train.max_steps=1",
        "train.eval_steps=1",
        "train.per_device_batch_size=8",  # the 6 validation rows are one evaluation batch
        "train.gradient_accumulation_steps=1",
    ]
    cfg = load_config("jobs/configs/tiny-test.yaml", overrides)
    rows = prepare_data(cfg).validation.take_all()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_mistral_dir), dtype=torch.float32).eval()
    sums = {"completion": [0.0, 0], "all": [0.0, 0]}
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([list(row["input_ids"])]), torch.tensor(list(row["labels"]))
            losses = torch.nn.functional.cross_entropy(
                model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none"
            )
            in_loss = labels[1:] != IGNORE
            sums["completion"] = [
                sums["completion"][0] + losses[in_loss].sum().item(),
                sums["completion"][1] + in_loss.sum().item(),
            ]
            sums["all"] = [sums["all"][0] + losses.sum().item(), sums["all"][1] + len(losses)]
    expected = {name: total / count for name, (total, count) in sums.items()}
    assert abs(expected["completion"] - expected["all"]) > 0.005  # the two settings are told apart
    outcome = run_training(cfg)
    eval_loss = outcome.summary.metrics["final"]["eval_loss"]
    assert eval_loss == pytest.approx(expected["completion"], abs=5e-4)
    assert outcome.summary.data["loss_tokens_train"] < outcome.summary.data["tokens_train"]


def test_validation_rows_that_another_source_trains_on_are_counted(ray_local, tokenizer, tmp_path):
    rows = _team_rows(40)
    whole, part = _write_jsonl(tmp_path / "whole.jsonl", rows), _write_jsonl(tmp_path / "part.jsonl", rows[:20])
    sources = [{"path": str(whole)}, {"path": str(part)}]
    config = _config({"sources": sources, "format": "chat", "validation_fraction": 0.2, "dedupe": False})
    data = build_datasets(config, tokenizer)
    train = {tuple(row["input_ids"]) for row in data.train.take_all()}
    validation = [tuple(row["input_ids"]) for row in data.validation.take_all()]
    overlap = sum(ids in train for ids in validation)
    assert data.stats["rows_validation_in_train"] == overlap > 0
