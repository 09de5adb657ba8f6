"""Raw rows -> tokenized training samples with their loss labels (the `map_batches` function of `medray.data`).

Each row is rendered to text in the run's format (`data.format`: the filled template, or the tokenizer's chat
template) together with the character spans the loss covers: the completion (reasoning, answer, EOS) of a
question/answer row, every assistant turn of a chat row. The text is tokenized once, with offsets, so the token ids
are exactly those of the whole text (what the reference recipe trains on); a token is in the loss when it starts
inside a span. Spans come from how the text was built, never from searching it, so a question that contains the
response marker (`### Response:`, `<think>`, `[/INST]`) cannot move them.

`labels` are the ids with -100 where the loss is off (`train.loss_on=completion`), or a copy of the ids
(`train.loss_on=all`). Samples are cut to `data.max_length`, keeping the final EOS; a sample cut before any of its
completion is marked `cut_in_prompt` (nothing to learn) and dropped by `medray.data`.

    table = prepare_batch(batch, tokenizer=tokenizer, data=cfg.data, source=source, loss_on="completion")
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pyarrow as pa

from medray.config import DataArgs
from medray.prompts import Span, qa_messages, render_chat, render_template
from medray.rows import needed_columns, row_problem, to_messages, to_qa

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from medray.data import Source

IGNORE = -100
"""Label of a token the loss skips (PyTorch's cross-entropy `ignore_index`)."""
PREPARED_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int64()),
        ("full_length", pa.int64()),
        ("loss_tokens", pa.int64()),
        ("cut_in_prompt", pa.bool_()),
        ("split_key", pa.int64()),
        ("source", pa.int32()),
        ("problem", pa.string()),
    ]
)


def prepare_batch(
    batch: pa.Table, *, tokenizer: PreTrainedTokenizerBase, data: DataArgs, source: Source, loss_on: str
) -> pa.Table:
    """Check, render and tokenize one batch of raw rows of one source.

    Args:
        batch: Raw rows holding at least the source's columns.
        tokenizer: The model's tokenizer.
        data: The data config (format, template, max_length, seed).
        source: The source the rows come from (its index, row format and columns).
        loss_on: `completion` or `all` (`train.loss_on`).

    Returns:
        One row per input row: `input_ids` and `labels` (cut to `max_length`, ending with EOS), `length`,
        `full_length` (before the cut), `loss_tokens` (labels in the loss), `cut_in_prompt`, `split_key` (seeded
        hash of the text), `source` (its index) and `problem` ("" for a good row). If any row has a problem,
        nothing in the batch is tokenized: the build fails anyway.
    """
    columns = needed_columns(source.row_format, source.args.columns)
    rows = batch.select(columns).to_pylist()
    problems = [row_problem(row, source.row_format, source.args.columns) for row in rows]
    rendered = [] if any(problems) else _render_rows(rows, tokenizer, data, source, problems)
    if any(problems):
        return _table([], [], [], source.index, problems)
    texts, spans = [text for text, _ in rendered], [row_spans for _, row_spans in rendered]
    encoded = encode_with_labels(tokenizer, texts, spans, data.format == "template", loss_on)
    cut = [truncate(ids, labels, data.max_length) for ids, labels in encoded]
    keys = [split_key(text, data.seed) for text in texts]
    return _table(cut, [len(ids) for ids, _ in encoded], keys, source.index, problems)


def _render_rows(rows, tokenizer, data: DataArgs, source: Source, problems: list[str]) -> list[tuple[str, list[Span]]]:
    """Text and loss spans of every row; a row the chat template refuses gets its message in `problems`."""
    rendered = []
    for number, row in enumerate(rows):
        try:
            rendered.append(_render(row, tokenizer, data, source))
        except ValueError as error:
            problems[number] = str(error)
            rendered.append(("", []))
    return rendered


def _render(row: dict, tokenizer, data: DataArgs, source: Source) -> tuple[str, list[Span]]:
    if source.row_format == "qa":
        question, cot, answer = to_qa(row, source.args.columns)
        if data.format == "template":
            return render_template(question, cot, answer, data.template, tokenizer.eos_token)
        return render_chat(qa_messages(question, cot, answer), tokenizer)
    return render_chat(to_messages(row, source.row_format, source.args.columns), tokenizer)


def _table(cut, full_lengths: list[int], keys: list[int], index: int, problems: list[str]) -> pa.Table:
    if not cut:  # a batch with a bad row: nothing was tokenized
        cut, full_lengths, keys = [([], [])] * len(problems), [0] * len(problems), [0] * len(problems)
    columns = {
        "input_ids": [ids for ids, _ in cut],
        "labels": [labels for _, labels in cut],
        "length": [len(ids) for ids, _ in cut],
        "full_length": full_lengths,
        "loss_tokens": [sum(label != IGNORE for label in labels) for _, labels in cut],
        "cut_in_prompt": [_cut_in_prompt(labels, full) for (_, labels), full in zip(cut, full_lengths, strict=True)],
        "split_key": keys,
        "source": [index] * len(problems),
        "problem": problems,
    }
    return pa.table(columns, schema=PREPARED_SCHEMA)


def _cut_in_prompt(labels: list[int], full_length: int) -> bool:
    """A cut sample whose only label in the loss is the EOS kept at its end: none of its completion is left."""
    return full_length > len(labels) and all(label == IGNORE for label in labels[:-1])


def encode_with_labels(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    spans: list[list[Span]],
    add_special_tokens: bool,
    loss_on: str,
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of texts that end with the EOS text: the text's tokens (with the tokenizer's default
    special tokens, BOS for Mistral, when `add_special_tokens`), then exactly one EOS id.

    Args:
        tokenizer: A fast Hugging Face tokenizer (it reports character offsets) with an EOS token.
        texts: Training texts, each ending with the EOS text.
        spans: Per text, the character ranges whose tokens are in the loss with `loss_on="completion"`.
        add_special_tokens: Let the tokenizer add its special tokens (False when a chat template wrote them).
        loss_on: `completion` (labels -100 outside the spans; the final EOS is in the loss) or `all`.

    Returns:
        One (ids, labels) pair per text; the last id is the EOS id.

    Raises:
        ValueError: With `completion`, if the tokenizer cannot report offsets (a slow tokenizer).
    """
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if tokenizer("a" + eos, add_special_tokens=False)["input_ids"][-1:] != [eos_id]:
        # This tokenizer splits the EOS text into pieces: tokenize without it and append the id.
        texts = [text.removesuffix(eos) for text in texts]
    if loss_on == "all":
        encoded = tokenizer(texts, add_special_tokens=add_special_tokens)
        offsets = [[(0, 0)] * len(ids) for ids in encoded["input_ids"]]
    elif not getattr(tokenizer, "is_fast", False):
        raise ValueError("train.loss_on=completion needs a fast tokenizer (one that reports offsets); set loss_on=all")
    else:
        encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    pairs = []
    for ids, row_offsets, row_spans in zip(encoded["input_ids"], offsets, spans, strict=True):
        ids, row_offsets = list(ids), list(row_offsets)
        while ids and ids[-1] == eos_id:  # one EOS from the text, maybe a second from the tokenizer itself
            ids.pop()
            row_offsets.pop()
        if loss_on == "all":
            labels = list(ids)
        else:
            labels = [
                tid if _in_spans(start, row_spans) else IGNORE for tid, (start, _) in zip(ids, row_offsets, strict=True)
            ]
        pairs.append(([*ids, eos_id], [*labels, eos_id]))
    return pairs


def _in_spans(position: int, spans: list[Span]) -> bool:
    return any(start <= position < end for start, end in spans)


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """`ids` and `labels` cut to `max_length`, each keeping its last item (the EOS) as the last one."""
    if len(ids) <= max_length:
        return ids, labels
    return [*ids[: max_length - 1], ids[-1]], [*labels[: max_length - 1], labels[-1]]


def split_key(text: str, seed: int) -> int:
    """A seeded 63-bit hash of the sample: ordering rows by it is a shuffle that depends only on the seed."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest(), "big") >> 1
