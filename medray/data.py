"""Ray Data side of training: read, validate, format, tokenize and split the rows -> `PreparedData`.

Rows come from `data.path` (a JSON list, JSONL or Parquet file, or a folder of one kind; `pkg:sample_data/NAME`
names a file shipped in medray) or else from the hub (`data.hub_id`, `hub_config`, `hub_split`). Each row needs the
three text columns named by `data.question_column`, `cot_column` and `response_column`; other columns are ignored.

`build_datasets` runs on the driver before the trainer starts and returns materialized datasets, so bad data fails
early, with a `DataError` that names the file, the row and what to do:
- local JSON/JSONL files are pre-scanned line by line on the driver (streaming), because Ray's own reader gives opaque
  errors for a bad line;
- Parquet and hub rows are checked inside `map_batches`; if a Parquet row fails, the driver then streams that file to
  name the row number.

Formatting (`medray.prompts.format_sample`) and tokenization run in `map_batches`. Each sample is the tokenizer's
default special tokens (BOS for Mistral) + the text + exactly one EOS id, cut to `data.max_length` (keeping the EOS)
or dropped, as `data.overlong` says. The validation split is picked by a seeded hash of each sample's text, so it is
the same for a seed whatever the cluster size, block layout or row order.

    prepared = build_datasets(cfg, tokenizer)   # prepared.train / prepared.validation rows: input_ids, length
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.expressions import col

from medray.config import DataArgs, MedrayConfig
from medray.prompts import format_sample
from medray.sources import resolve_data_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

JSON_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIX = ".parquet"
OUTPUT_COLUMNS = ["input_ids", "length"]
BATCH_SIZE = 256
PREPARED_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("length", pa.int64()),
        ("full_length", pa.int64()),
        ("split_key", pa.int64()),
        ("problem", pa.string()),
    ]
)
SET_COLUMNS = "set data.question_column, data.cot_column and data.response_column to the names your data uses"


class DataError(ValueError):
    """Bad training data; the message names the file, the row and what to do."""


@dataclass
class PreparedData:
    """The tokenized, materialized splits and what happened to the rows on the way."""

    train: ray.data.Dataset
    """Rows with `input_ids` (list of int, BOS..EOS) and `length`."""
    validation: ray.data.Dataset | None
    """Same columns; None when `data.validation_fraction` is 0."""
    stats: dict[str, int]
    """`rows_read` (after `max_rows`), `rows_train`, `rows_validation`, `rows_truncated`, `rows_dropped_overlong`,
    `tokens_train`."""


def build_datasets(cfg: MedrayConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Read, check, format, tokenize and split the training data; raise on bad data before any training starts.

    Args:
        cfg: The run's config; only `cfg.data` is used.
        tokenizer: The model's Hugging Face tokenizer (it needs an EOS token).

    Returns:
        The materialized train and validation datasets and their `stats`.

    Raises:
        DataError: If the data is missing, malformed or unusable; the message says where and what to do.
    """
    data = cfg.data
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so samples cannot end with one; use a tokenizer that has one")
    rows, files, source = _read_rows(data)
    prepared = rows.map_batches(
        prepare_batch,
        fn_kwargs={"tokenizer": tokenizer, "data": data},
        batch_format="pyarrow",
        batch_size=BATCH_SIZE,
    ).materialize()
    # The per-row bookkeeping is small (no token ids), so checks, counts and the split are worked out on the driver.
    info = prepared.select_columns(["length", "full_length", "split_key", "problem"]).to_pandas()
    _raise_first_problem(info["problem"], files, data, source)
    overlong = int((info["full_length"] > data.max_length).sum())
    kept = info[info["full_length"] <= data.max_length] if data.overlong == "drop" else info
    train, validation, train_info = _split(prepared, kept, data)
    stats = {
        "rows_read": len(info),
        "rows_train": train.count(),
        "rows_validation": validation.count() if validation is not None else 0,
        "rows_truncated": overlong if data.overlong == "truncate" else 0,
        "rows_dropped_overlong": overlong if data.overlong == "drop" else 0,
        "tokens_train": int(train_info["length"].sum()),
    }
    return PreparedData(train=train, validation=validation, stats=stats)


# --- reading -------------------------------------------------------------------------------------------------------


def _read_rows(data: DataArgs) -> tuple[ray.data.Dataset, list[Path], str]:
    """The raw rows (first `max_rows` only, in file order), the local files they come from, and a name for messages."""
    if data.path is None:
        source = f"hub dataset {data.hub_id} (config {data.hub_config}, split {data.hub_split})"
        return _read_hub(data), [], source
    try:
        path = resolve_data_path(data.path)
    except FileNotFoundError as error:
        raise DataError(str(error)) from None
    files = _precheck(_list_files(path), data)
    return _read_files(files, data), files, str(path)


def _columns(data: DataArgs) -> list[str]:
    return [data.question_column, data.cot_column, data.response_column]


def _list_files(path: Path) -> list[Path]:
    """The data files at `path` (the file itself, or the folder's .json/.jsonl/.parquet files, sorted)."""
    if path.is_file():
        if not path.name.endswith((*JSON_SUFFIXES, PARQUET_SUFFIX)):
            raise DataError(f"{path}: unsupported file type; data.path must name .json, .jsonl or .parquet files")
        return [path]
    files = sorted(
        item
        for item in path.rglob("*")
        if item.is_file() and item.suffix in (*JSON_SUFFIXES, PARQUET_SUFFIX) and not item.name.startswith(".")
    )
    if not files:
        raise DataError(f"{path} holds no .json, .jsonl or .parquet files; point data.path at your data")
    if len({item.suffix == PARQUET_SUFFIX for item in files}) > 1:
        raise DataError(f"{path} mixes JSON and Parquet files; keep one kind per folder")
    return files


def _read_files(files: list[Path], data: DataArgs) -> ray.data.Dataset:
    # `local://` pins the reads to this node: the files were found here, other nodes may not have them.
    paths, columns = [f"local://{path.resolve()}" for path in files], _columns(data)
    if files[0].suffix == PARQUET_SUFFIX:
        rows = ray.data.read_parquet(paths).select_columns(columns)
    else:
        # Read the three columns as text and skip the rest, so odd extra columns cannot break the read.
        schema = pa.schema([(name, pa.string()) for name in columns])
        options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        rows = ray.data.read_json(paths, parse_options=options)
    # The first N rows are only the first N if Ray keeps the file order.
    rows.context.execution_options.preserve_order = True
    return rows if data.max_rows is None else rows.limit(data.max_rows)


def _read_hub(data: DataArgs) -> ray.data.Dataset:
    import datasets

    where = f"{data.hub_id} (config {data.hub_config}, split {data.hub_split})"
    try:
        table = datasets.load_dataset(data.hub_id, data.hub_config, split=data.hub_split)
    except Exception as error:  # offline, unreachable, unknown id or config: all end the same way
        raise DataError(
            f"could not load the hub dataset {where}: {error}\n"
            "Without access to the Hugging Face hub, set data.path to local JSON, JSONL or Parquet files "
            "(e.g. data.path=/path/to/medical_o1_sft.json)."
        ) from error
    missing = [name for name in _columns(data) if name not in table.column_names]
    if missing:
        raise DataError(f"hub dataset {where} has no column(s) {missing} (it has {table.column_names}); {SET_COLUMNS}")
    if data.max_rows is not None:
        table = table.select(range(min(data.max_rows, len(table))))
    return ray.data.from_huggingface(table.select_columns(_columns(data)))


# --- checks on the driver ------------------------------------------------------------------------------------------


def _precheck(files: list[Path], data: DataArgs, scan_parquet: bool = False) -> list[Path]:
    """Check the files that hold the first `data.max_rows` rows (all rows without it) and return those files.

    JSON and JSONL files are scanned row by row (streaming); Parquet files only have their schema and row count
    checked unless `scan_parquet`, which is used to locate a bad row that `map_batches` found.
    """
    used, remaining = [], data.max_rows
    for path in files:
        if remaining is not None and remaining <= 0:
            break
        if path.suffix == PARQUET_SUFFIX and not scan_parquet:
            count = _check_parquet_metadata(path, _columns(data))
        else:
            count = _scan_file(path, _columns(data), remaining)
        used.append(path)
        remaining = None if remaining is None else remaining - count
    return used


def _scan_file(path: Path, columns: list[str], limit: int | None) -> int:
    """Check the first `limit` rows of one file (all without it); return how many were checked."""
    count = 0
    for where, row in _iter_rows(path, columns):
        if limit is not None and count >= limit:
            break
        problem = row_problem(row, columns)
        if problem:
            raise DataError(f"{path}, {where}: {problem}")
        count += 1
    if count == 0:
        raise DataError(f"{path} is empty (no rows); remove it or point data.path at a file with data")
    return count


def _iter_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, Any]]:
    """Yield (`line N` / `item N` / `row N`, row) for every row of a local file, streaming where the format allows."""
    if path.suffix == PARQUET_SUFFIX:
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_SIZE, columns=columns):
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row
        return
    try:
        with path.open(encoding="utf-8") as file:
            if file.read(4096).lstrip().startswith("["):
                file.seek(0)
                yield from ((f"item {number}", row) for number, row in enumerate(_load_json_list(path, file), 1))
                return
            file.seek(0)
            for number, line in enumerate(file, 1):
                if line.strip():
                    yield f"line {number}", _parse_line(path, number, line)
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}); save it as UTF-8 JSON or JSONL") from None


def _parse_line(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}); every line of a JSONL "
            "file must be one JSON object: fix or remove that line"
        ) from None


def _load_json_list(path: Path, file: Any) -> list[Any]:
    try:
        items = json.load(file)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); a .json file must "
            "hold one list of objects, or one object per line"
        ) from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list of objects, got a {type(items).__name__}")
    return items


def _check_parquet_metadata(path: Path, columns: list[str]) -> int:
    """Check a Parquet file's schema from its footer (no rows are read); return its row count."""
    try:
        metadata = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path} is not a readable Parquet file ({error}); rewrite it or remove it") from None
    names = metadata.schema.to_arrow_schema().names
    missing = [name for name in columns if name not in names]
    if missing:
        raise DataError(f"{path} has no column(s) {missing} (it has {names}); {SET_COLUMNS}")
    if metadata.num_rows == 0:
        raise DataError(f"{path} is empty (no rows); remove it or point data.path at a file with data")
    return metadata.num_rows


def row_problem(row: Any, columns: list[str]) -> str:
    """What is wrong with one row, and what to do; "" if it is fine.

    Args:
        row: A parsed row (should be a mapping).
        columns: The question, reasoning and response column names.

    Returns:
        A message such as `'Response' is empty; fix or remove that row`, or "".
    """
    if not isinstance(row, dict):
        return f"expected an object with the fields {columns}, got a {type(row).__name__}; fix or remove that row"
    for name in columns:
        if name not in row:
            return f"has no {name!r} field (it has {list(row)}); {SET_COLUMNS}"
        value = row[name]
        if value is None:
            return f"{name!r} is null; fix or remove that row"
        if not isinstance(value, str):
            return f"{name!r} is a {type(value).__name__}, not text; fix or remove that row"
        if not value.strip():
            return f"{name!r} is empty; fix or remove that row"
    return ""


def _raise_first_problem(problems: pd.Series, files: list[Path], data: DataArgs, source: str) -> None:
    """Raise a DataError for the first row that `prepare_batch` flagged, located as precisely as possible."""
    flagged = problems[problems != ""]
    if flagged.empty:
        return
    if files:
        _precheck(files, data, scan_parquet=True)  # raises, naming the file and the row number
    raise DataError(f"{source}, a row: {flagged.iloc[0]}")


# --- formatting and tokenization (runs in Ray tasks) ---------------------------------------------------------------


def prepare_batch(batch: pa.Table, *, tokenizer: PreTrainedTokenizerBase, data: DataArgs) -> pa.Table:
    """Check, format and tokenize one batch of raw rows (the `map_batches` function).

    Args:
        batch: Raw rows holding at least the three text columns.
        tokenizer: The model's tokenizer.
        data: The data config (column names, template, max_length, seed).

    Returns:
        One row per input row: `input_ids` (cut to `max_length`, ending with EOS), `length`, `full_length` (before
        the cut), `split_key` (seeded hash of the text) and `problem` ("" for a good row). If any row has a problem,
        nothing in the batch is tokenized: the build fails anyway.
    """
    columns = _columns(data)
    rows = batch.select(columns).to_pylist()
    problems = [row_problem(row, columns) for row in rows]
    if any(problems):
        return _prepared_table([[] for _ in rows], [0] * len(rows), [0] * len(rows), problems)
    question, cot, response = columns
    texts = [format_sample(row[question], row[cot], row[response], data.template, tokenizer.eos_token) for row in rows]
    encoded = encode(tokenizer, texts)
    keys = [_split_key(text, data.seed) for text in texts]
    return _prepared_table([truncate(ids, data.max_length) for ids in encoded], [len(ids) for ids in encoded], keys)


def _prepared_table(
    input_ids: list[list[int]], full_lengths: list[int], keys: list[int], problems: list[str] | None = None
) -> pa.Table:
    columns = {
        "input_ids": input_ids,
        "length": [len(ids) for ids in input_ids],
        "full_length": full_lengths,
        "split_key": keys,
        "problem": problems or [""] * len(input_ids),
    }
    return pa.table(columns, schema=PREPARED_SCHEMA)


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of texts that end with the EOS text: default special tokens (BOS where the tokenizer adds one),
    then the text, then exactly one EOS id.

    Args:
        tokenizer: A Hugging Face tokenizer with an EOS token.
        texts: Outputs of `format_sample`.

    Returns:
        One list of ids per text, whose last id is the EOS id.
    """
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if tokenizer("a" + eos, add_special_tokens=False)["input_ids"][-1:] != [eos_id]:
        # This tokenizer splits the EOS text into pieces: tokenize without it and append the id.
        texts = [text.removesuffix(eos) for text in texts]
    encoded = []
    for ids in tokenizer(texts)["input_ids"]:
        while ids and ids[-1] == eos_id:  # one EOS from the text, maybe a second from the tokenizer itself
            ids = ids[:-1]
        encoded.append([*ids, eos_id])
    return encoded


def truncate(ids: list[int], max_length: int) -> list[int]:
    """`ids` cut to `max_length`, keeping its last id (the EOS) as the last one."""
    return ids if len(ids) <= max_length else [*ids[: max_length - 1], ids[-1]]


def _split_key(text: str, seed: int) -> int:
    """A seeded 63-bit hash of the sample: ordering rows by it is a shuffle that depends only on the seed."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest(), "big") >> 1


# --- splitting -----------------------------------------------------------------------------------------------------


def _split(
    prepared: ray.data.Dataset, kept: pd.DataFrame, data: DataArgs
) -> tuple[ray.data.Dataset, ray.data.Dataset | None, pd.DataFrame]:
    """Materialized train and validation sets (`input_ids`, `length`), and the bookkeeping rows of the train set.

    `kept` holds the `full_length` and `split_key` of the rows to use. Validation takes the `validation_fraction` of
    them with the largest split keys, which is a seeded random pick.
    """
    if kept.empty:
        raise DataError(
            f"no rows left: all are longer than data.max_length={data.max_length} tokens and data.overlong=drop; "
            "raise data.max_length or set data.overlong=truncate"
        )
    conditions = [col("full_length") <= data.max_length] if data.overlong == "drop" else []
    if data.validation_fraction == 0:
        return _subset(prepared, conditions), None, kept
    held_out = max(1, round(len(kept) * data.validation_fraction))
    if held_out >= len(kept):
        raise DataError(
            f"only {len(kept)} usable row(s): too few to hold out data.validation_fraction="
            f"{data.validation_fraction}; add rows or set data.validation_fraction=0"
        )
    threshold = int(np.sort(kept["split_key"].to_numpy())[len(kept) - held_out])
    train = _subset(prepared, [*conditions, col("split_key") < threshold])
    validation = _subset(prepared, [*conditions, col("split_key") >= threshold])
    return train, validation, kept[kept["split_key"] < threshold]


def _subset(prepared: ray.data.Dataset, conditions: list[Any]) -> ray.data.Dataset:
    """The rows that meet every condition, with the output columns only, materialized."""
    rows = prepared
    for condition in conditions:
        rows = rows.filter(expr=condition)
    return rows.select_columns(OUTPUT_COLUMNS).materialize()
