"""Batch layouts (medray.batching) on CPU: what the collator builds, and that a padding-free micro-batch trains the
tiny random Mistral exactly as the same rows padded: same loss, no token attending across a row boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medray import batching
from medray.batching import IGNORE_INDEX, RowCollator, groups_by_length, layout_problem, resolve_layout
from medray.config import ConfigError, load_config

ROWS = {"input_ids": np.array([np.array([1, 11, 12, 13]), np.array([1, 21, 22])], dtype=object)}


def test_padding_free_concatenates_rows_with_restarting_positions():
    batch = RowCollator("padding_free", pad_token_id=0, packed_seq_lengths=True)(ROWS)
    assert batch["input_ids"].tolist() == [[1, 11, 12, 13, 1, 21, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 11, 12, 13, -100, 21, 22]]  # no row predicts the next row's start
    assert batch["packed_seq_lengths"].tolist() == [4, 3] and batch["packed_seq_lengths"].dtype == torch.int32
    assert "attention_mask" not in batch  # transformers finds the rows from the position ids only without one


def test_padded_rows_and_a_multiple_of_eight():
    batch = RowCollator("padded", pad_token_id=0, pad_to_multiple_of=8)(ROWS)
    assert batch["input_ids"].tolist() == [[1, 11, 12, 13, 0, 0, 0, 0], [1, 21, 22, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [4, 3]
    assert batch["labels"][1].tolist() == [1, 21, 22] + [IGNORE_INDEX] * 5


def test_padding_free_multiple_is_one_segment_of_its_own_without_loss():
    batch = RowCollator("padding_free", pad_token_id=0, pad_to_multiple_of=5, packed_seq_lengths=True)(ROWS)
    assert batch["input_ids"].shape == (1, 10)
    assert batch["position_ids"][0, 7:].tolist() == [0, 1, 2]
    assert batch["labels"][0, 7:].tolist() == [IGNORE_INDEX] * 3
    assert batch["packed_seq_lengths"].tolist() == [4, 3, 3]


@pytest.mark.parametrize("layout", ["padded", "padding_free"])
def test_a_rows_loss_mask_is_kept(layout):
    rows = {**ROWS, "labels": [[-100, -100, 12, 13], [-100, 21, 22]]}
    labels = RowCollator(layout, pad_token_id=0)(rows)["labels"]
    kept = labels[labels != IGNORE_INDEX].tolist()
    assert kept == [12, 13, 21, 22]


def test_labels_that_do_not_match_their_row_are_refused():
    with pytest.raises(ValueError, match="row 1: 2 labels for 3 input_ids"):
        RowCollator("padded", pad_token_id=0)({**ROWS, "labels": [[1, 11, 12, 13], [1, 21]]})


def test_auto_resolves_per_backend_and_attention(monkeypatch):
    monkeypatch.setattr(batching, "varlen_attention_installed", lambda: True)
    assert resolve_layout("auto", "unsloth", "sdpa") == "padding_free"
    monkeypatch.setattr(batching, "varlen_attention_installed", lambda: False)  # Unsloth would use a dense mask
    assert resolve_layout("auto", "unsloth", "sdpa") == "padded"
    assert resolve_layout("auto", "hf", "flash_attention_2") == "padding_free"
    assert resolve_layout("auto", "hf", "sdpa") == "padded"
    assert resolve_layout("padding_free", "hf", "sdpa") == "padding_free"
    assert layout_problem("padding_free", "hf", "sdpa") is None
    assert "keeps packed rows apart" in layout_problem("padding_free", "hf", "my-kernel")


def test_length_grouping_is_on_for_padded_micro_batches_unless_set():
    assert load_config(None, []).train.length_grouping is None
    assert groups_by_length(None, "padded") and not groups_by_length(None, "padding_free")
    assert not groups_by_length(False, "padded") and groups_by_length(True, "padded")
    assert load_config(None, ["train.padding=padding_free"]).train.padding == "padding_free"  # grouping unset: fine


def test_config_refuses_a_padding_that_could_not_take_effect():
    with pytest.raises(ConfigError, match="length_grouping=true only removes padding"):
        load_config(None, ["train.padding=padding_free", "train.length_grouping=true"])
    with pytest.raises(ConfigError, match="attn_implementation='my-kernel'"):
        load_config(None, ["train.padding=padding_free", "model.backend=hf", "model.attn_implementation=my-kernel"])
    assert load_config(None, ["train.padding=padding_free", "model.backend=hf"]).train.padding == "padding_free"


# ---------------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_model(request, tiny_mistral_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, attn_implementation=request.param)
    return model.eval()


def real_rows(tokenizer_dir, count=3) -> list[np.ndarray]:
    """Rows of different lengths (the longest 3x the shortest), from real text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["Chest pain radiating to the left arm.", "Fever, cough and night sweats for three weeks " * 3, "Rash."]
    return [np.asarray(tokenizer(text)["input_ids"]) for text in texts[:count]]


def forward(model, batch):
    """The model's forward as the trainer calls it: TRL's compute_loss passes use_cache=False, and transformers
    finds packed rows from the position ids only when no cache is built."""
    with torch.no_grad():
        return model(**batch, use_cache=False)


def test_padding_free_loss_equals_padded_loss(tiny_model, mistral_tokenizer_dir):
    rows = {"input_ids": real_rows(mistral_tokenizer_dir)}
    rows["labels"] = [np.where(np.arange(len(ids)) < 3, IGNORE_INDEX, ids) for ids in rows["input_ids"]]  # a mask
    padded = forward(tiny_model, RowCollator("padded", pad_token_id=0)(rows)).loss
    free = forward(tiny_model, RowCollator("padding_free", pad_token_id=0)(rows)).loss
    assert free.item() == pytest.approx(padded.item(), rel=1e-5)  # fp32: the same sums in another order


def test_no_token_attends_across_a_row_boundary(tiny_model, mistral_tokenizer_dir):
    first, second, third = real_rows(mistral_tokenizer_dir)
    collate = RowCollator("padding_free", pad_token_id=0)
    logits = forward(tiny_model, collate({"input_ids": [first, second, third]})).logits[0]
    changed = second.copy()
    changed[1:] = (changed[1:] + 1000) % 32000  # every token of row 2 but BOS
    perturbed = forward(tiny_model, collate({"input_ids": [first, changed, third]})).logits[0]
    n1, n2 = len(first), len(second)
    torch.testing.assert_close(perturbed[:n1], logits[:n1], rtol=0, atol=1e-5)  # row 1: untouched
    torch.testing.assert_close(perturbed[n1 + n2 :], logits[n1 + n2 :], rtol=0, atol=1e-5)  # row 3 too
    assert (perturbed[n1 + 1 : n1 + n2] - logits[n1 + 1 : n1 + n2]).abs().max() > 0.1  # row 2 itself did change
    alone = forward(tiny_model, {"input_ids": torch.from_numpy(third)[None]}).logits[0]
    torch.testing.assert_close(logits[n1 + n2 :], alone, rtol=0, atol=1e-5)  # row 3 as if it ran on its own


# ---------------------------------------------------------------------------------------------------- the worker


def test_the_workers_ray_loaders_feed_padding_free_batches(ray_local):
    """Train: each optimizer step's 4 rows as 2 micro-batches of 2 rows; evaluation: `train.eval_batch_size` rows."""
    import ray.data

    from medray.ray_streams import RayStreams, ray_collate

    rows = [{"input_ids": list(range(1, 2 + n)), "length": 1 + n} for n in range(10)]
    train = load_config(None, ["train.per_device_batch_size=2", "train.gradient_accumulation_steps=2",
                               "train.eval_batch_size=5"]).train  # fmt: skip
    shard = ray.data.from_items(rows).iterator()
    collate = ray_collate(RowCollator("padding_free", pad_token_id=0))
    streams = RayStreams(shard, shard, train, collate, torch.device("cpu"), length_grouping=False)
    first = [row_lengths(batch) for _, batch in zip(range(4), streams.train_loader(), strict=False)]
    assert [len(lengths) for lengths in first] == [2, 2, 2, 2]
    assert len({n for lengths in first for n in lengths}) == 8  # 8 different rows: two steps, nothing repeated
    evaluation = [row_lengths(batch) for batch in streams.eval_loader()]
    assert [len(lengths) for lengths in evaluation] == [5, 5]
    assert sorted(n for lengths in evaluation for n in lengths) == [row["length"] for row in rows]


def test_padded_evaluation_batches_are_cut_from_rows_sorted_by_length(ray_local):
    """With length grouping, each padded evaluation micro-batch holds rows of neighbouring lengths: less padding,
    every validation row still evaluated exactly once."""
    import ray.data

    from medray.ray_streams import RayStreams, ray_collate

    lengths = [3, 9, 1, 7, 5, 2, 8, 4, 6, 10]
    rows = [{"input_ids": list(range(1, 1 + n)), "length": n} for n in lengths]
    train = load_config(None, ["train.per_device_batch_size=2", "train.eval_batch_size=4"]).train
    shard = ray.data.from_items(rows).iterator()
    collate = ray_collate(RowCollator("padded", pad_token_id=0))
    streams = RayStreams(shard, shard, train, collate, torch.device("cpu"), length_grouping=True)
    evaluation = [batch["attention_mask"].sum(dim=1).tolist() for batch in streams.eval_loader()]
    assert evaluation == [[10, 9, 8, 7], [6, 5, 4, 3], [2, 1]]
    assert [batch["input_ids"].shape[1] for batch in streams.eval_loader()] == [10, 6, 2]  # padded to the longest


def row_lengths(batch) -> list[int]:
    """The rows of a padding-free batch, from where its position ids restart."""
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
    return [end - start for start, end in zip(starts, starts[1:], strict=False)]
