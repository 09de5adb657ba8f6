"""Micro-batch layouts: how the rows of one micro-batch become the model's input tensors (`train.padding`).

medray collates its own batches in the worker's Ray-fed loader, so the layout is medray's decision, never one that
Unsloth or TRL infers from the dataset:

- `padded`: rows right-padded to the longest (then to `train.pad_to_multiple_of`), with an `attention_mask`;
- `padding_free`: the rows concatenated into one sequence of shape [1, N], `position_ids` restarting at 0 at each
  row and no `attention_mask`. Attention stays inside each row: Unsloth reads the row lengths from
  `packed_seq_lengths` (varlen attention); transformers finds the rows from the `position_ids` resets
  (`masking_utils.find_packed_sequence_indices`: a block-diagonal mask under eager / sdpa / flex, varlen under
  flash-attention; only in a forward without a KV cache, `use_cache=False`, which TRL's compute_loss passes).
  The label of each row's first token is -100, so no row learns to predict the next row's start.

A row's `labels` (the loss mask: -100 on prompt tokens) are kept when the row has them; otherwise labels = input_ids.

    layout = resolve_layout(cfg.train.padding, backend, cfg.model.attn_implementation)   # "padding_free" or "padded"
    collate = RowCollator(layout, pad_token_id=0, packed_seq_lengths=backend == "unsloth")
    batch = collate({"input_ids": [[1, 5, 6], [1, 7]]})   # input_ids [1, 5], position_ids [[0, 1, 2, 0, 1]]
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medray.config import ROW_ISOLATING_ATTENTION

IGNORE_INDEX = -100
LAYOUTS = ("padded", "padding_free")
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")


def resolve_layout(padding: str, backend: str, attn_implementation: str) -> str:
    """`train.padding` -> the layout this worker trains with.

    `auto` is padding-free where it is also the faster layout, i.e. where a varlen attention kernel runs each packed
    row on its own: on unsloth with flash-attn or xformers installed, and on the hf backend with flash-attention.
    Without one, packed rows are correct but attend through a dense block-diagonal mask (Unsloth's SDPA fallback;
    transformers' eager / sdpa), costlier than the padding it saves, so `auto` pads there (one H200, torch 2.11
    without flash-attn/xformers, real-length rows 4 x 4: medray padding-free 6,372 tokens/s, bare Unsloth padded
    7,712 and 8,679, medray padded and length-grouped 9,209; docs/benchmarks-status.md).
    """
    if padding != "auto":
        return padding
    if backend == "unsloth" and varlen_attention_installed():
        return "padding_free"
    if backend != "unsloth" and attn_implementation in FLASH_ATTENTION:
        return "padding_free"
    return "padded"


def varlen_attention_installed() -> bool:
    """Whether Unsloth has a varlen kernel for packed rows (flash-attn, else xformers; else it falls back to SDPA
    with a dense mask: `unsloth.utils.attention_dispatch.select_attention_backend`)."""
    return any(importlib.util.find_spec(name) is not None for name in ("flash_attn", "xformers"))


def groups_by_length(length_grouping: bool | None, layout: str) -> bool:
    """`train.length_grouping` for this layout: unset means on for padded micro-batches (it only removes padding)."""
    return layout == "padded" if length_grouping is None else length_grouping


def layout_problem(padding: str, backend: str, attn_implementation: str) -> str | None:
    """Why `train.padding` cannot take effect on this backend, or None when it can (the worker's check, once the
    backend is known; the config refuses what it can tell before any worker starts)."""
    if padding != "padding_free" or backend == "unsloth" or attn_implementation in ROW_ISOLATING_ATTENTION:
        return None
    return (
        f"train.padding=padding_free needs an attention implementation that keeps packed rows apart "
        f"({', '.join(ROW_ISOLATING_ATTENTION)}); model.attn_implementation={attn_implementation!r} is not known "
        "to. Use train.padding=padded, or one of those implementations."
    )


@dataclass(frozen=True)
class RowCollator:
    """Rows (columns `input_ids` and optionally `labels`, one sequence per row) -> one micro-batch of tensors."""

    layout: str
    pad_token_id: int
    pad_to_multiple_of: int | None = None
    packed_seq_lengths: bool = False
    """Padding-free only: add Unsloth's `packed_seq_lengths` (int32 row lengths) to the batch."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown batch layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}")

    def __call__(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = [np.asarray(row, dtype=np.int64) for row in rows["input_ids"]]
        labels = _row_labels(ids, rows.get("labels"))
        if self.layout == "padded":
            return self._padded(ids, labels)
        return self._padding_free(ids, labels)

    def _padded(self, ids: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, torch.Tensor]:
        width = _round_up(max(len(row) for row in ids), self.pad_to_multiple_of)
        input_ids = np.full((len(ids), width), self.pad_token_id, dtype=np.int64)
        label_ids = np.full((len(ids), width), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((len(ids), width), dtype=np.int64)
        for index, (row, row_labels) in enumerate(zip(ids, labels, strict=True)):
            input_ids[index, : len(row)] = row
            label_ids[index, : len(row)] = row_labels
            attention_mask[index, : len(row)] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(label_ids),
        }

    def _padding_free(self, ids: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, torch.Tensor]:
        lengths = [len(row) for row in ids]
        total = sum(lengths)
        tail = _round_up(total, self.pad_to_multiple_of) - total
        if tail:  # the padding is one more segment of its own: it attends only to itself and carries no loss
            ids = [*ids, np.full(tail, self.pad_token_id, dtype=np.int64)]
            labels = [*labels, np.full(tail, IGNORE_INDEX, dtype=np.int64)]
            lengths.append(tail)
        label_ids = np.concatenate(labels)
        starts = np.cumsum([0, *lengths[:-1]])
        label_ids[starts] = IGNORE_INDEX  # the token before a row start belongs to another row
        batch = {
            "input_ids": torch.from_numpy(np.concatenate(ids))[None],
            "position_ids": torch.from_numpy(np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]))[None],
            "labels": torch.from_numpy(label_ids)[None],
        }
        if self.packed_seq_lengths:
            batch["packed_seq_lengths"] = torch.tensor(lengths, dtype=torch.int32)
        return batch


def _row_labels(ids: list[np.ndarray], labels: Sequence | None) -> list[np.ndarray]:
    """Each row's labels: its own `labels` column when present (the loss mask), else a copy of its ids."""
    if labels is None:
        return [row.copy() for row in ids]
    out = [np.asarray(row_labels, dtype=np.int64) for row_labels in labels]
    for index, (row, row_labels) in enumerate(zip(ids, out, strict=True)):
        if len(row_labels) != len(row):
            raise ValueError(f"row {index}: {len(row_labels)} labels for {len(row)} input_ids; they must match")
    return out


def _round_up(value: int, multiple: int | None) -> int:
    return value if not multiple else -(-value // multiple) * multiple
