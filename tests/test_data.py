"""medray.data on the 198 real medical-o1 demo rows with the real Mistral v0.3 tokenizer, plus bad-data cases."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import build_mistral_tokenizer

from medray.config import DEFAULT_TEMPLATE, load_config
from medray.data import DataError, build_datasets
from medray.prompts import format_sample
from medray.samples import encode_with_labels

BOS, EOS = 1, 2
DEMO_ROWS = 198
# Ray 2.60's read_parquet starts 32 footer-reader actors per read: seconds each on a 2-core machine. One is plenty here
# (the variable reaches Ray's workers because `ray_local` starts Ray after this module is imported).
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")


@pytest.fixture(scope="module")
def tokenizer(mistral_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir))


@pytest.fixture(scope="module")
def demo_rows(medical_o1_demo) -> list[dict]:
    return [json.loads(line) for line in medical_o1_demo.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_lengths(demo_rows, tokenizer) -> list[int]:
    """Token count of every demo sample, straight from the tokenizer (BOS + text + EOS)."""
    texts = [
        format_sample(row["Question"], row["Complex_CoT"], row["Response"], DEFAULT_TEMPLATE, "</s>")
        for row in demo_rows
    ]
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]


@pytest.fixture(scope="module")
def demo(ray_local, tokenizer, medical_o1_demo):
    """The default build of the demo file (seed 3407, 10 % validation, max_length 2048)."""
    return build_datasets(_config(medical_o1_demo), tokenizer)


def _config(path: Path | str, *overrides: str):
    return load_config(None, [f"data.path={path}", *overrides])


def _samples(dataset) -> list[list[int]]:
    return [list(row["input_ids"]) for row in dataset.take_all()] if dataset is not None else []


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(count: int, **extra) -> list[dict]:
    return [
        {"Question": f"Question {i}?", "Complex_CoT": f"Reasoning {i}.", "Response": f"Answer {i}.", **extra}
        for i in range(count)
    ]


# --- the real demo rows --------------------------------------------------------------------------------------------


def test_demo_rows_are_all_used_and_split(demo, demo_lengths):
    stats = demo.stats
    assert stats["rows_read"] == DEMO_ROWS
    assert stats["rows_validation"] == round(DEMO_ROWS * 0.1)
    assert stats["rows_train"] + stats["rows_validation"] == DEMO_ROWS
    assert stats["rows_truncated"] == stats["rows_dropped_overlong"] == 0  # the longest demo sample is < 2048
    train, validation = _samples(demo.train), _samples(demo.validation)
    assert (len(train), len(validation)) == (stats["rows_train"], stats["rows_validation"])
    assert stats["tokens_train"] == sum(len(ids) for ids in train)
    assert sorted(len(ids) for ids in train + validation) == sorted(demo_lengths)


def test_every_sample_is_bos_text_eos(demo, tokenizer):
    rows = demo.train.take_all() + demo.validation.take_all()
    for row in rows:
        ids = list(row["input_ids"])
        assert ids[0] == BOS and ids[1] != BOS
        assert ids[-1] == EOS and ids.count(EOS) == 1
        assert row["length"] == len(ids)
    text = tokenizer.decode(rows[0]["input_ids"])
    assert "### Question:" in text and "<think>" in text and "</think>" in text


def test_split_is_fixed_by_the_seed(demo, tokenizer, medical_o1_demo):
    again = build_datasets(_config(medical_o1_demo), tokenizer)
    other = build_datasets(_config(medical_o1_demo, "data.seed=1"), tokenizer)
    held_out = sorted(map(tuple, _samples(demo.validation)))
    assert sorted(map(tuple, _samples(again.validation))) == held_out
    assert sorted(map(tuple, _samples(other.validation))) != held_out
    assert other.stats["rows_validation"] == demo.stats["rows_validation"]


@pytest.mark.parametrize("mode", ["truncate", "drop"])
def test_overlong_rows_are_truncated_or_dropped(ray_local, tokenizer, demo_lengths, mode, medical_o1_demo):
    max_length = sorted(demo_lengths)[DEMO_ROWS // 2]
    overlong = sum(length > max_length for length in demo_lengths)
    data = build_datasets(_config(medical_o1_demo, f"data.max_length={max_length}", f"data.overlong={mode}"), tokenizer)
    samples = _samples(data.train) + _samples(data.validation)
    assert all(len(ids) <= max_length and ids[-1] == EOS and ids.count(EOS) == 1 for ids in samples)
    if mode == "truncate":
        assert data.stats["rows_truncated"] == overlong and data.stats["rows_dropped_overlong"] == 0
        assert len(samples) == DEMO_ROWS
        assert sum(len(ids) == max_length for ids in samples) >= overlong
    else:
        assert data.stats["rows_dropped_overlong"] == overlong and data.stats["rows_truncated"] == 0
        assert len(samples) == DEMO_ROWS - overlong
    assert data.stats["rows_read"] == DEMO_ROWS


def test_max_rows_takes_the_first_rows_of_a_folder(ray_local, tokenizer, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    rows = _rows(30)
    for index in range(3):
        _write_jsonl(folder / f"part-{index}.jsonl", rows[index * 10 : index * 10 + 10])
    data = build_datasets(_config(folder, "data.max_rows=15", "data.validation_fraction=0"), tokenizer)
    assert data.validation is None
    assert data.stats["rows_read"] == data.stats["rows_train"] == 15
    numbers = [int(re.search(r"Question (\d+)\?", tokenizer.decode(ids))[1]) for ids in _samples(data.train)]
    assert sorted(numbers) == list(range(15))


def test_custom_columns_and_extra_columns(ray_local, tokenizer, tmp_path):
    rows = [
        {
            "q": f"Question {i}?",
            "why": f"Reasoning {i}.",
            "a": f"Answer {i}.",
            "meta": {"options": list(range(i))},
            "n": i,
        }
        for i in range(12)
    ]
    path = _write_jsonl(tmp_path / "custom.jsonl", rows)
    overrides = ["data.columns.question=q", "data.columns.reasoning=why", "data.columns.answer=a"]
    data = build_datasets(_config(path, *overrides), tokenizer)
    assert data.stats["rows_read"] == 12
    assert data.train.columns() == ["input_ids", "labels", "length"]
    text = tokenizer.decode(data.train.take(1)[0]["input_ids"], skip_special_tokens=True)
    assert "Question" in text and "<think>\nReasoning" in text and "</think>\nAnswer" in text


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_json_list_and_parquet_files(ray_local, tokenizer, tmp_path, kind):
    rows = _rows(10, extra="ignored")
    path = tmp_path / f"rows.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        pd.DataFrame(rows).to_parquet(path)
    data = build_datasets(_config(path, "data.validation_fraction=0.2"), tokenizer)
    assert (data.stats["rows_train"], data.stats["rows_validation"]) == (8, 2)


# --- bad data ------------------------------------------------------------------------------------------------------


def _missing_column(rows):
    del rows[1]["Complex_CoT"]


def _null_field(rows):
    rows[2]["Response"] = None


def _empty_field(rows):
    rows[2]["Question"] = "   "


def _number_field(rows):
    rows[1]["Response"] = 42


@pytest.mark.parametrize(
    ("spoil", "where", "words"),
    [
        (_missing_column, "line 2", "has no 'Complex_CoT' field"),
        (_null_field, "line 3", "'Response' is null"),
        (_empty_field, "line 3", "'Question' is empty"),
        (_number_field, "line 2", "'Response' is a int, not text"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tokenizer, tmp_path, spoil, where, words):
    rows = _rows(4)
    spoil(rows)
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=f"bad.jsonl, {where}: {words}"):
        build_datasets(_config(path), tokenizer)


def test_non_json_line_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_rows(1)[0]) + "\n\n" + '{"Question": "unterminated\n')
    with pytest.raises(DataError, match=r"broken.jsonl, line 3: not valid JSON .*fix or remove that line"):
        build_datasets(_config(path), tokenizer)


def test_missing_path_is_a_data_error(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"nowhere.jsonl does not exist; set data.path"):
        build_datasets(_config(tmp_path / "nowhere.jsonl"), tokenizer)


def test_empty_file_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        build_datasets(_config(path), tokenizer)


def test_parquet_bad_row_is_found_by_ray_and_located(ray_local, tokenizer, tmp_path):
    rows = _rows(6)
    rows[4]["Complex_CoT"] = ""
    path = tmp_path / "bad.parquet"
    pd.DataFrame(rows).to_parquet(path)
    with pytest.raises(DataError, match="bad.parquet, row 5: 'Complex_CoT' is empty; fix or remove that row"):
        build_datasets(_config(path), tokenizer)


def test_parquet_missing_column_is_found_from_the_footer(tokenizer, tmp_path):
    path = tmp_path / "short.parquet"
    pd.DataFrame(_rows(3)).drop(columns=["Response"]).to_parquet(path)
    with pytest.raises(DataError, match=r"short.parquet has no column\(s\) \['Response'\].*data.columns"):
        build_datasets(_config(path), tokenizer)


def test_unreachable_hub_says_to_set_data_path(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["data.hub_id=medray-tests/no-such-dataset"])
    started = time.monotonic()
    with pytest.raises(DataError, match="data.path") as raised:
        build_datasets(cfg, tokenizer)
    assert "medray-tests/no-such-dataset" in str(raised.value)
    assert time.monotonic() - started < 30


# --- tokens and batches --------------------------------------------------------------------------------------------


def test_eos_that_the_tokenizer_splits_is_appended_as_an_id():
    class CharTokenizer:
        """Ids are characters; the EOS text `</s>` is not special, so it falls apart into 4 ids."""

        eos_token, eos_token_id = "</s>", 2

        def __call__(self, texts, add_special_tokens=True):
            encode_one = lambda text: [1] * add_special_tokens + [ord(char) for char in text]  # noqa: E731
            return {"input_ids": encode_one(texts) if isinstance(texts, str) else [encode_one(t) for t in texts]}

    ids = [1, ord("a"), ord("b"), 2]
    assert encode_with_labels(CharTokenizer(), ["ab</s>"], [[(0, 2)]], True, "all") == [(ids, ids)]


def test_tokenizer_that_adds_eos_itself_still_gives_one_eos(tmp_path):
    tokenizer = build_mistral_tokenizer(tmp_path / "tok")
    tokenizer.add_eos_token = True
    [(ids, labels)] = encode_with_labels(tokenizer, ["Hi Hello</s>"], [[(2, 12)]], True, "completion")
    assert labels == [-100, -100, *ids[2:]]
    assert ids[0] == BOS and ids[-1] == EOS and ids.count(EOS) == 1


# --- repeated rows, odd bytes, stray files --------------------------------------------------------------------------


def test_repeated_rows_are_dropped_so_validation_never_holds_a_training_row(ray_local, tokenizer, tmp_path):
    rows = _rows(20)
    rows += [rows[3]] * 30 + [rows[7]] * 2  # 32 copies of two rows
    data = build_datasets(
        _config(_write_jsonl(tmp_path / "dup.jsonl", rows), "data.validation_fraction=0.2"), tokenizer
    )
    assert data.stats["rows_read"] == 52 and data.stats["rows_duplicate"] == 32
    train, validation = _samples(data.train), _samples(data.validation)
    assert len(train) + len(validation) == 20 == data.stats["rows_train"] + data.stats["rows_validation"]
    assert len({tuple(ids) for ids in train + validation}) == 20  # one copy of each
    assert not {tuple(ids) for ids in train} & {tuple(ids) for ids in validation}


def test_identical_rows_are_a_clean_error_before_training(ray_local, tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "same.jsonl", _rows(1) * 40)
    with pytest.raises(DataError, match=r"only 1 usable row\(s\) \(39 repeated row\(s\) dropped by data.dedupe\)"):
        build_datasets(_config(path), tokenizer)
    with pytest.raises(DataError, match=r"no training rows: all 40 rows are copies of the validation rows"):
        build_datasets(_config(path, "data.dedupe=false"), tokenizer)


def test_a_byte_that_is_not_utf8_is_named_by_its_offset(tokenizer, tmp_path):
    path = tmp_path / "latin1.jsonl"
    first = (json.dumps(_rows(1)[0]) + "\n").encode()
    path.write_bytes(first + b'{"Question": "caf\xe9", "Complex_CoT": "c", "Response": "r"}\n')
    offset = len(first) + len(b'{"Question": "caf')
    with pytest.raises(DataError, match=rf"latin1.jsonl: byte {offset} \(line 2, 0xe9\) is not UTF-8; save the file"):
        build_datasets(_config(path), tokenizer)


def test_files_that_are_not_data_are_reported_as_skipped(ray_local, tokenizer, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write_jsonl(folder / "rows.jsonl", _rows(10))
    (folder / "notes.txt").write_text("not data")
    (folder / "extra.csv").write_text("a,b")
    with caplog.at_level("WARNING", logger="medray.data"):
        data = build_datasets(_config(folder, "data.validation_fraction=0"), tokenizer)
    assert data.stats["rows_train"] == 10
    assert "skipped 2 file(s) that are not .json, .jsonl or .parquet: extra.csv, notes.txt" in caplog.text
