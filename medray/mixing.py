"""Split every source into train and validation on its own, then mix the sources' training rows by weight.

Each source's usable samples (not dropped as overlong or cut inside the prompt) are split by their seeded hash
(`split_key`): validation takes the `data.validation_fraction` with the largest keys, so every source has validation
rows and the pick depends only on the seed and the text. A source's `weight` then scales its training rows: 0.5
keeps the half with the smallest keys (a seeded pick), 2 takes every row twice, 1.5 every row once plus a seeded
half. Validation rows are never weighted, so the validation loss stays comparable between mixes. With more than
one source, or any weight other than 1, the training rows are shuffled with the seed (Ray Data's
`random_shuffle`), so the sources interleave; one source at weight 1 keeps its file order.

    prepared = split_and_mix(tokenized, info, sources, cfg.data)   # called by medray.data.build_datasets
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import ray.data
from ray.data.expressions import col

from medray.config import DataArgs

if TYPE_CHECKING:
    from medray.data import PreparedData, Source

OUTPUT_COLUMNS = ["input_ids", "labels", "length"]


def split_and_mix(
    prepared: ray.data.Dataset, info: pd.DataFrame, sources: list[Source], data: DataArgs, duplicates: int = 0
) -> PreparedData:
    """The materialized train and validation sets of all sources, and the counts of what happened to the rows.

    Args:
        prepared: Every source's tokenized samples (`medray.samples.PREPARED_SCHEMA`), materialized.
        info: The same rows without token ids (`length`, `full_length`, `loss_tokens`, `cut_in_prompt`,
            `split_key`, `source`), as a DataFrame on the driver.
        sources: The sources, in `data.sources` order.
        data: The data config.

    Raises:
        DataError: If a source has no usable rows, or too few to hold out its validation share.
    """
    from medray.data import DataError, PreparedData

    # Only a cut sample can be cut inside its prompt; with overlong=drop no sample is cut.
    overlong = info["full_length"] > data.max_length
    dropping = data.overlong == "drop"
    cut = info["cut_in_prompt"] & (not dropping)
    usable = ~overlong if dropping else ~cut
    if dropping:
        conditions = [col("full_length") <= data.max_length]
    else:
        conditions = [col("cut_in_prompt") == False]  # noqa: E712 (a Ray Data expression, not a comparison)
    trains, validations, per_source, train_keys_all, validation_keys_all = [], [], [], [], []
    for source in sources:
        mine = info[(info["source"] == source.index) & usable]
        if mine.empty:
            raise DataError(_nothing_left(source, data, info["source"] == source.index))
        where = [*conditions, col("source") == source.index]
        train, validation, train_keys = _split_source(prepared, mine, where, source, data, duplicates)
        train_keys_all.append(train_keys)
        validation_keys_all.append(np.setdiff1d(mine["split_key"].to_numpy(), train_keys))
        train = _weighted(train, train_keys, source.args.weight)
        trains.append(train)
        validations.append(validation)
        per_source.append(
            {
                "name": source.args.label,
                "row_format": source.row_format,
                "weight": source.args.weight,
                "rows_read": int((info["source"] == source.index).sum()),
                "rows_train": train.count(),
                "rows_validation": validation.count() if validation is not None else 0,
            }
        )
    mixed = len(sources) > 1 or any(source.args.weight != 1 for source in sources)
    train = _union(trains)
    if mixed:
        train = train.random_shuffle(seed=data.seed)
    train = train.select_columns(OUTPUT_COLUMNS).materialize()
    validation = None if validations[0] is None else _union(validations).select_columns(OUTPUT_COLUMNS).materialize()
    totals = train.select_columns(["length", "labels"]).to_pandas()
    stats = {
        "rows_read": len(info),
        "rows_train": len(totals),
        "rows_validation": validation.count() if validation is not None else 0,
        "rows_truncated": 0 if dropping else int((overlong & ~cut).sum()),
        "rows_dropped_overlong": int(overlong.sum()) if dropping else 0,
        "rows_dropped_cut_in_prompt": int(cut.sum()),
        "tokens_train": int(totals["length"].sum()),
        "loss_tokens_train": int(sum(int((np.asarray(labels) != -100).sum()) for labels in totals["labels"])),
        "sources": per_source,
        # Split keys hash the sample text: equal keys are the same sample (possible across sources).
        "rows_validation_in_train": int(
            np.isin(np.concatenate(validation_keys_all), np.concatenate(train_keys_all)).sum()
        ),
    }
    return PreparedData(train=train, validation=validation, stats=stats)


def _split_source(
    prepared: ray.data.Dataset, mine: pd.DataFrame, where: list[Any], source: Source, data: DataArgs, duplicates: int
) -> tuple[ray.data.Dataset, ray.data.Dataset | None, np.ndarray]:
    """One source's train and validation rows, and the sorted split keys of its training rows."""
    from medray.data import DataError

    keys = np.sort(mine["split_key"].to_numpy())
    if data.validation_fraction == 0:
        return _subset(prepared, where), None, keys
    dropped = f" ({duplicates} repeated row(s) dropped by data.dedupe)" if duplicates else ""
    held_out = max(1, round(len(mine) * data.validation_fraction))
    if held_out >= len(mine):
        raise DataError(
            f"{source.where}: only {len(mine)} usable row(s){dropped}, too few to hold out data.validation_fraction="
            f"{data.validation_fraction}; add rows or set data.validation_fraction=0"
        )
    threshold = int(keys[len(mine) - held_out])
    if keys[0] >= threshold:  # every row repeats a held-out sample (data.dedupe=false)
        raise DataError(
            f"{source.where}: no training rows: all {len(mine)} rows are copies of the validation rows; use distinct "
            "rows or set data.dedupe=true"
        )
    train = _subset(prepared, [*where, col("split_key") < threshold])
    validation = _subset(prepared, [*where, col("split_key") >= threshold])
    return train, validation, keys[keys < threshold]


def _weighted(train: ray.data.Dataset, keys: np.ndarray, weight: float) -> ray.data.Dataset:
    """`weight` x the rows of `train`: whole copies, plus the rows with the smallest split keys for the fraction."""
    if weight == 1:
        return train
    target = max(1, round(weight * len(keys)))
    copies, rest = divmod(target, len(keys))
    parts = [train] * copies
    if rest:
        parts.append(train.filter(expr=col("split_key") < int(keys[rest])).materialize())
    return _union(parts).materialize()


def _union(parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _subset(prepared: ray.data.Dataset, conditions: list[Any]) -> ray.data.Dataset:
    """The rows that meet every condition, materialized."""
    rows = prepared
    for condition in conditions:
        rows = rows.filter(expr=condition)
    return rows.materialize()


def _nothing_left(source: Source, data: DataArgs, of_source: pd.Series) -> str:
    if data.overlong == "drop":
        why = f"all are longer than data.max_length={data.max_length} tokens"
        fix = "raise data.max_length or set data.overlong=truncate"
    else:
        why = f"data.max_length={data.max_length} cuts every one before its answer starts"
        fix = "raise data.max_length"
    return f"{source.where}: no usable rows left ({int(of_source.sum())} read): {why}; {fix}"
