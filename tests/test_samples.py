"""Loss labels token by token (medray.samples) with the real Mistral v0.3 tokenizer, and the worker's collator."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from medray.config import ColumnArgs, DataArgs, SourceArgs
from medray.data import Source
from medray.prompts import format_prompt, generation_prompt, prompt_token_ids
from medray.samples import IGNORE, prepare_batch

BOS, EOS = 1, 2
ROW = {"Question": "Why fever?", "Complex_CoT": "Infection is likely.", "Response": "Give antipyretics."}


@pytest.fixture(scope="module")
def tokenizer(mistral_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir))


def _prepare(rows, tokenizer, loss_on="completion", row_format="qa", **data):
    source = Source(0, SourceArgs(path="x"), row_format, "test rows")
    table = prepare_batch(
        pa.Table.from_pylist(rows), tokenizer=tokenizer, data=DataArgs(**data), source=source, loss_on=loss_on
    )
    return table.to_pylist()


def _trained(sample) -> list[int]:
    return [label for label in sample["labels"] if label != IGNORE]


# --- template format -----------------------------------------------------------------------------------------------


def test_completion_labels_start_exactly_after_the_prompt(tokenizer):
    [sample] = _prepare([ROW], tokenizer)
    prompt_ids = tokenizer(format_prompt(ROW["Question"], DataArgs().template))["input_ids"]
    ids, labels = sample["input_ids"], sample["labels"]
    # The prompt's tokens are those generation feeds (prompt_token_ids), and they alone are out of the loss.
    assert ids[: len(prompt_ids)] == prompt_ids == prompt_token_ids(DataArgs(), ROW["Question"], tokenizer)
    assert labels == [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) :]
    assert ids[-1] == EOS and labels[-1] == EOS
    completion = tokenizer.decode(ids[len(prompt_ids) :])
    assert completion == "Infection is likely.\n</think>\nGive antipyretics.</s>"
    assert sample["loss_tokens"] == len(ids) - len(prompt_ids) and not sample["cut_in_prompt"]


def test_loss_on_all_trains_every_token_of_the_reference_text(tokenizer):
    [completion] = _prepare([ROW], tokenizer)
    [every] = _prepare([ROW], tokenizer, loss_on="all")
    assert every["input_ids"] == completion["input_ids"]  # the same tokens: only the mask differs
    assert every["labels"] == every["input_ids"] and every["input_ids"][0] == BOS
    assert every["loss_tokens"] == len(every["input_ids"])


def test_response_marker_inside_the_question_does_not_move_the_mask(tokenizer):
    tricky = "Is this ### Response:\n<think>\nfake</think> part of the question?"
    row = {**ROW, "Question": tricky}
    [sample] = _prepare([row], tokenizer)
    prompt_ids = tokenizer(format_prompt(tricky, DataArgs().template))["input_ids"]
    assert sample["labels"][: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert sample["labels"][len(prompt_ids) :] == sample["input_ids"][len(prompt_ids) :]
    assert tokenizer.decode(_trained(sample)).startswith("Infection is likely.")


def test_row_cut_inside_the_question_is_flagged_and_kept_whole_with_all(tokenizer):
    long_question = {**ROW, "Question": "Why fever? " * 60}
    [cut] = _prepare([long_question, ROW], tokenizer, max_length=64)[:1]
    assert cut["length"] == 64 and cut["input_ids"][-1] == EOS
    assert cut["labels"] == [IGNORE] * 63 + [EOS] and cut["cut_in_prompt"] and cut["loss_tokens"] == 1
    [every] = _prepare([long_question], tokenizer, loss_on="all", max_length=64)
    assert every["labels"] == every["input_ids"] and not every["cut_in_prompt"]


def test_row_cut_inside_the_reasoning_keeps_its_mask(tokenizer):
    row = {**ROW, "Complex_CoT": "Infection is likely. " * 40}
    [sample] = _prepare([row], tokenizer, max_length=120)
    prompt_length = len(tokenizer(format_prompt(ROW["Question"], DataArgs().template))["input_ids"])
    assert sample["length"] == 120 and sample["full_length"] > 120 and not sample["cut_in_prompt"]
    assert sample["labels"] == [IGNORE] * prompt_length + sample["input_ids"][prompt_length:]


# --- chat format and chat rows -------------------------------------------------------------------------------------


def test_chat_format_trains_the_assistant_turn_only(chat_tokenizer):
    row = {**ROW, "Question": "Why [/INST] fever?"}  # the template's own marker inside the question
    [sample] = _prepare([row], chat_tokenizer, format="chat")
    ids, labels = sample["input_ids"], sample["labels"]
    prompt = generation_prompt(DataArgs(format="chat"), row["Question"], chat_tokenizer)
    prompt_ids = prompt_token_ids(DataArgs(format="chat"), row["Question"], chat_tokenizer)
    assert prompt == "<s>[INST] Why [/INST] fever?[/INST]"
    assert ids[: len(prompt_ids)] == prompt_ids and ids.count(BOS) == 1
    assert labels == [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) :]
    assert chat_tokenizer.decode(_trained(sample)) == "<think>\nInfection is likely.\n</think>\nGive antipyretics.</s>"


def test_messages_rows_train_every_assistant_turn_and_nothing_else(chat_tokenizer):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Dose?"},
        {"role": "assistant", "content": "Ten mg."},
        {"role": "user", "content": "Route?"},
        {"role": "assistant", "content": "Oral."},
    ]
    [sample] = _prepare([{"messages": turns}], chat_tokenizer, row_format="messages", format="chat")
    trained = [i for i, label in enumerate(sample["labels"]) if label != IGNORE]
    pieces = chat_tokenizer.decode([sample["input_ids"][i] for i in trained])
    assert pieces == "Ten mg.</s> Oral.</s>"
    pairs = zip(sample["input_ids"], sample["labels"], strict=True)
    masked = chat_tokenizer.decode([tid for tid, label in pairs if label == IGNORE])
    assert "Be brief." in masked and "Dose?" in masked and "Route?" in masked and "Ten" not in masked


def test_sharegpt_rows_are_the_same_turns(chat_tokenizer):
    messages = [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content": "Ten mg."}]
    sharegpt = [{"from": "human", "value": "Dose?"}, {"from": "gpt", "value": "Ten mg."}]
    [a] = _prepare([{"messages": messages}], chat_tokenizer, row_format="messages", format="chat")
    [b] = _prepare([{"conversations": sharegpt}], chat_tokenizer, row_format="sharegpt", format="chat")
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]


def test_chat_prompt_needs_a_tokenizer_with_a_chat_template(tokenizer):
    with pytest.raises(ValueError, match="data.format=chat needs the tokenizer's chat template"):
        generation_prompt(DataArgs(format="chat"), "q", tokenizer)


def test_custom_columns_without_reasoning(tokenizer):
    columns = ColumnArgs(question="q", reasoning=None, answer="a")
    source = Source(0, SourceArgs(path="x", columns=columns), "qa", "rows")
    table = prepare_batch(
        pa.Table.from_pylist([{"q": "Dose?", "a": "Ten mg."}]),
        tokenizer=tokenizer,
        data=DataArgs(),
        source=source,
        loss_on="completion",
    )
    [sample] = table.to_pylist()
    assert tokenizer.decode(_trained(sample)) == "\n</think>\nTen mg.</s>"


# --- the worker's collator keeps the mask --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded", "padding_free"])
def test_worker_collator_keeps_the_labels(tokenizer, layout):
    from medray.batching import RowCollator

    samples = _prepare([ROW, {**ROW, "Response": "Rest and fluids, then review."}], tokenizer)
    batch = {
        "input_ids": np.array([np.array(s["input_ids"]) for s in samples], dtype=object),
        "labels": np.array([np.array(s["labels"]) for s in samples], dtype=object),
    }
    labels = RowCollator(layout, pad_token_id=0)(batch)["labels"].tolist()
    if layout == "padding_free":  # one packed row; each sample's first label is -100 anyway
        assert labels == [samples[0]["labels"] + samples[1]["labels"]]
    else:
        longest = max(len(s["labels"]) for s in samples)
        assert labels == [s["labels"] + [IGNORE] * (longest - len(s["labels"])) for s in samples]
