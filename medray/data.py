"""Ray Data side of training: read, check, render, tokenize and split the rows of every source -> `PreparedData`.

A run reads one source (`data.path`, or else the hub: `data.hub_id`, `hub_config`, `hub_split`) or several
(`data.sources`), each a JSON list, JSONL or Parquet file or a folder of one kind (`pkg:sample_data/NAME` names a
file shipped in medray), or a hub dataset. Rows are in one of three formats (`medray.rows`): question/answer
columns (`data.columns`), OpenAI `messages`, or ShareGPT `conversations`; other columns are ignored.

`build_datasets` runs on the driver before the trainer starts and returns materialized datasets, so bad data fails
early, with a `DataError` that names the file, the row and what to do:
- local JSON/JSONL files are pre-scanned line by line on the driver (streaming), because Ray's own reader gives opaque
  errors for a bad line; a folder whose files hold different row formats is refused;
- Parquet and hub rows are checked inside `map_batches`; if a Parquet row fails, the driver then streams that file to
  name the row number.

Rendering and tokenization (`medray.samples.prepare_batch`) run in `map_batches`: every sample carries `input_ids`
and `labels` (-100 where `train.loss_on` keeps the loss off), cut to `data.max_length` (keeping the EOS) or dropped,
as `data.overlong` says; a sample cut before its completion starts is dropped. Each source is split on its own
(`medray.mixing`): validation takes a seeded hash pick of its samples, the same for a seed whatever the cluster
size, block layout or row order; several sources are then mixed by weight and shuffled with the seed.

    prepared = build_datasets(cfg, tokenizer)   # prepared.train / prepared.validation rows: input_ids, labels, length
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.expressions import col

from medray.config import MedrayConfig, SourceArgs
from medray.prompts import check_chat_template
from medray.rows import SET_COLUMNS, detect_format, needed_columns, row_problem
from medray.samples import prepare_batch
from medray.sources import resolve_data_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

JSON_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIX = ".parquet"
BATCH_SIZE = 256
logger = logging.getLogger(__name__)
TURN_TYPES = {
    "messages": pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
    "sharegpt": pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])),
}


class DataError(ValueError):
    """Bad training data; the message names the file, the row and what to do."""


@dataclass
class Source:
    """One source of a run, as read: where its rows come from and in which format."""

    index: int
    args: SourceArgs
    row_format: str
    """`qa`, `messages` or `sharegpt` (an `auto` source's detected format)."""
    where: str
    """The file, folder or hub dataset, for messages."""
    files: list[Path] = field(default_factory=list)
    """The local files that hold its rows (none for a hub dataset)."""


@dataclass
class PreparedData:
    """The tokenized, materialized splits and what happened to the rows on the way."""

    train: ray.data.Dataset
    """Rows with `input_ids` (list of int, BOS..EOS), `labels` (the ids, -100 outside the loss) and `length`."""
    validation: ray.data.Dataset | None
    """Same columns; None when `data.validation_fraction` is 0."""
    stats: dict[str, Any]
    """`rows_read` (after `max_rows`), `rows_duplicate` (dropped by `data.dedupe`), `rows_train`, `rows_validation`,
    `rows_truncated`, `rows_dropped_overlong`, `rows_dropped_cut_in_prompt`, `tokens_train`, `loss_tokens_train`,
    and `sources`: per source its `name`, `row_format`, `weight`, `rows_read`, `rows_train` and `rows_validation`."""


def build_datasets(cfg: MedrayConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Read, check, render, tokenize, split and mix the training data; raise on bad data before training starts.

    Args:
        cfg: The run's config; `cfg.data` and `cfg.train.loss_on` are used.
        tokenizer: The model's Hugging Face tokenizer (it needs an EOS token; a chat template for `data.format=chat`).

    Returns:
        The materialized train and validation datasets and their `stats`.

    Raises:
        DataError: If the data is missing, malformed or unusable; the message says where and what to do.
    """
    from medray.mixing import split_and_mix

    data = cfg.data
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so samples cannot end with one; use a tokenizer that has one")
    if data.format == "chat":
        try:
            check_chat_template(tokenizer)
        except ValueError as error:
            raise DataError(str(error)) from None
    sources, tables = [], []
    for index, args in enumerate(data.resolved_sources()):
        source, rows = _read_source(index, args)
        if source.row_format != "qa" and data.format == "template":
            raise DataError(f"{source.where} holds {source.row_format} rows, which need data.format=chat")
        kwargs = {"tokenizer": tokenizer, "data": data, "source": source, "loss_on": cfg.train.loss_on}
        sources.append(source)
        tables.append(rows.map_batches(prepare_batch, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=BATCH_SIZE))
    prepared = (tables[0].union(*tables[1:]) if len(tables) > 1 else tables[0]).materialize()
    # The per-row bookkeeping is small (no token ids), so checks, counts and the split are worked out on the driver.
    columns = ["length", "full_length", "loss_tokens", "cut_in_prompt", "split_key", "source", "problem"]
    info = prepared.select_columns(columns).to_pandas()
    _raise_first_problem(info, sources)
    prepared, info, duplicates = _dedupe(prepared, info) if data.dedupe else (prepared, info, 0)
    result = split_and_mix(prepared, info, sources, data, duplicates)
    result.stats["rows_read"] += duplicates
    result.stats["rows_duplicate"] = duplicates
    return result


def _dedupe(prepared: ray.data.Dataset, info: pd.DataFrame) -> tuple[ray.data.Dataset, pd.DataFrame, int]:
    """Keep one copy of every repeated sample (in any source). Copies have the same text, so the same split key (a
    seeded 63-bit hash): rows with a unique key pass through, one row per repeated key is picked on the driver."""
    repeated = info["split_key"].duplicated(keep="first")
    duplicates = int(repeated.sum())
    if not duplicates:
        return prepared, info, 0
    keys = info.loc[repeated, "split_key"].unique().tolist()
    copies = pa.concat_tables(ray.get(prepared.filter(expr=col("split_key").is_in(keys)).to_arrow_refs()))
    first = ~copies.column("split_key").to_pandas().duplicated(keep="first")
    singles = prepared.filter(expr=col("split_key").not_in(keys))
    deduped = singles.union(ray.data.from_arrow(copies.filter(pa.array(first.to_numpy())))).materialize()
    return deduped, info[~repeated], duplicates


# --- reading -------------------------------------------------------------------------------------------------------


def _read_source(index: int, args: SourceArgs) -> tuple[Source, ray.data.Dataset]:
    """A source's raw rows (first `max_rows` only, in file order) and what was learned reading it."""
    if args.path is None:
        return _read_hub(index, args)
    try:
        path = resolve_data_path(args.path)
    except FileNotFoundError as error:
        raise DataError(str(error)) from None
    files = _list_files(path)
    row_format = args.row_format if args.row_format != "auto" else _detect_files(files, args, path)
    source = Source(index, args, row_format, str(path))
    source.files = _precheck(files, source)
    return source, _read_files(source)


def _list_files(path: Path) -> list[Path]:
    """The data files at `path` (the file itself, or the folder's .json/.jsonl/.parquet files, sorted)."""
    if path.is_file():
        if not path.name.endswith((*JSON_SUFFIXES, PARQUET_SUFFIX)):
            raise DataError(f"{path}: unsupported file type; data.path must name .json, .jsonl or .parquet files")
        return [path]
    found = sorted(item for item in path.rglob("*") if item.is_file() and not item.name.startswith("."))
    files = [item for item in found if item.suffix in (*JSON_SUFFIXES, PARQUET_SUFFIX)]
    skipped = [str(item.relative_to(path)) for item in found if item not in files]
    if skipped:
        logger.warning(
            "data.path %s: skipped %d file(s) that are not .json, .jsonl or .parquet: %s",
            path,
            len(skipped),
            ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
        )
    if not files:
        raise DataError(f"{path} holds no .json, .jsonl or .parquet files; point data.path at your data")
    if len({item.suffix == PARQUET_SUFFIX for item in files}) > 1:
        raise DataError(f"{path} mixes JSON and Parquet files; keep one kind per folder")
    return files


def _detect_files(files: list[Path], args: SourceArgs, path: Path) -> str:
    """The row format of an `auto` source, from the first row of each file; files that differ are an error."""
    found: dict[str, Path] = {}
    for file in files:
        if file.suffix == PARQUET_SUFFIX:
            names = pq.read_schema(file).names
        else:
            first = next((row for _, row in _iter_rows(file, [])), None)
            names = list(first) if isinstance(first, dict) else []
        found.setdefault(detect_format(names, args.columns), file)
    if len(found) > 1:
        listing = ", ".join(f"{file.name} holds {kind} rows" for kind, file in found.items())
        raise DataError(
            f"{path} mixes row formats ({listing}); keep one format per folder, or make each its own data.sources entry"
        )
    return next(iter(found), "qa")


def _read_files(source: Source) -> ray.data.Dataset:
    # `local://` pins the reads to this node: the files were found here, other nodes may not have them.
    paths = [f"local://{path.resolve()}" for path in source.files]
    columns = needed_columns(source.row_format, source.args.columns)
    if source.files[0].suffix == PARQUET_SUFFIX:
        rows = ray.data.read_parquet(paths).select_columns(columns)
    else:
        # Read the needed columns with fixed types and skip the rest, so odd extra columns cannot break the read.
        kind = TURN_TYPES.get(source.row_format, pa.string())
        schema = pa.schema([(name, kind) for name in columns])
        options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        rows = ray.data.read_json(paths, parse_options=options)
    # The first N rows are only the first N if Ray keeps the file order.
    rows.context.execution_options.preserve_order = True
    return rows if source.args.max_rows is None else rows.limit(source.args.max_rows)


def _read_hub(index: int, args: SourceArgs) -> tuple[Source, ray.data.Dataset]:
    import datasets

    where = f"hub dataset {args.hub_id} (config {args.hub_config}, split {args.hub_split})"
    try:
        table = datasets.load_dataset(args.hub_id, args.hub_config, split=args.hub_split)
    except Exception as error:  # offline, unreachable, unknown id or config: all end the same way
        raise DataError(
            f"could not load the {where}: {error}\n"
            "Without access to the Hugging Face hub, set data.path to local JSON, JSONL or Parquet files "
            "(e.g. data.path=/path/to/medical_o1_sft.json)."
        ) from error
    row_format = args.row_format
    if row_format == "auto":
        row_format = detect_format(table.column_names, args.columns)
    columns = needed_columns(row_format, args.columns)
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        raise DataError(f"{where} has no column(s) {missing} (it has {table.column_names}); {SET_COLUMNS}")
    if args.max_rows is not None:
        table = table.select(range(min(args.max_rows, len(table))))
    return Source(index, args, row_format, where), ray.data.from_huggingface(table.select_columns(columns))


# --- checks on the driver ------------------------------------------------------------------------------------------


def _precheck(files: list[Path], source: Source, scan_parquet: bool = False) -> list[Path]:
    """Check the files that hold the source's first `max_rows` rows (all rows without it) and return those files.

    JSON and JSONL files are scanned row by row (streaming); Parquet files only have their schema and row count
    checked unless `scan_parquet`, which is used to locate a bad row that `map_batches` found.
    """
    used, remaining = [], source.args.max_rows
    columns = needed_columns(source.row_format, source.args.columns)
    for path in files:
        if remaining is not None and remaining <= 0:
            break
        if path.suffix == PARQUET_SUFFIX and not scan_parquet:
            count = _check_parquet_metadata(path, columns)
        else:
            count = _scan_file(path, source, remaining)
        used.append(path)
        remaining = None if remaining is None else remaining - count
    return used


def _scan_file(path: Path, source: Source, limit: int | None) -> int:
    """Check the first `limit` rows of one file (all without it); return how many were checked."""
    count = 0
    for where, row in _iter_rows(path, needed_columns(source.row_format, source.args.columns)):
        if limit is not None and count >= limit:
            break
        problem = row_problem(row, source.row_format, source.args.columns)
        if problem:
            raise DataError(f"{path}, {where}: {problem}")
        count += 1
    if count == 0:
        raise DataError(f"{path} is empty (no rows); remove it or point data.path at a file with data")
    return count


def _iter_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, Any]]:
    """Yield (`line N` / `item N` / `row N`, row) for every row of a local file, streaming where the format allows;
    Parquet rows hold `columns` only."""
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
    except UnicodeDecodeError:
        raise DataError(f"{path}: {_first_non_utf8(path)} is not UTF-8; save the file as UTF-8 JSON or JSONL") from None


def _first_non_utf8(path: Path) -> str:
    """`byte N (line L, 0xXX)` of the first byte that is not UTF-8 (lines are safe units: UTF-8 never splits '\\n')."""
    offset = 0
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"byte {offset + error.start} (line {number}, 0x{line[error.start]:02x})"
            offset += len(line)
    return "a byte"


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


def _raise_first_problem(info: pd.DataFrame, sources: list[Source]) -> None:
    """Raise a DataError for the first row that `prepare_batch` flagged, located as precisely as possible."""
    flagged = info[info["problem"] != ""]
    if flagged.empty:
        return
    source = sources[int(flagged["source"].iloc[0])]
    if source.files:
        _precheck(source.files, source, scan_parquet=True)  # raises for a bad row, naming the file and row number
    raise DataError(f"{source.where}, a row: {flagged['problem'].iloc[0]}")
