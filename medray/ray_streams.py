"""The trainer's data, streamed from this worker's Ray Data shards: DataLoaders that nothing shards again, one
optimizer step's rows per Ray batch cut into micro-batches, and the SFTTrainer subclass that uses them.

    trainer = streaming_trainer_class()(model=model, args=args, train_dataset=as_hf_iterable(shard, "train", 2048), ...)
    trainer.ray_streams = RayStreams(train_shard, eval_shard, cfg.train, ray_collate(collate), args.device, True)
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from medray.config import TrainArgs


def ray_collate(collate):
    """A Ray collate callable: a batch of rows (columns of numpy arrays) -> `collate`'s tensors."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class RayCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> dict:
            return collate(batch)

    return RayCollate()


class RayStreams:
    """DataLoaders over this worker's Ray shards: already split per worker, so nothing shards them again."""

    def __init__(self, train_shard, eval_shard, train: TrainArgs, collate, device: torch.device, length_grouping: bool):
        self.train_shard, self.eval_shard = train_shard, eval_shard
        self.batch_size, self.collate = train.per_device_batch_size, collate
        self.eval_batch_size = train.eval_batch_size or train.per_device_batch_size
        # Batches go to the worker's device here, as accelerate's prepared DataLoaders do: Unsloth gathers token
        # counts across ranks from the batch before the trainer moves it, and NCCL refuses CPU tensors.
        self.device = device
        self.step_rows = train.per_device_batch_size * train.gradient_accumulation_steps
        self.length_grouping = length_grouping
        self.on_train_batch = None  # called with every training micro-batch's rows, in training order
        self.train_passes = 0
        self._eval_batches: list | None = None

    def train_loader(self):
        # One endless stream across epochs: the trainer stops at max_steps, so the step count is exact. Each Ray
        # batch holds one optimizer step's rows, cut here into micro-batches; a partial step at the end of a pass is
        # dropped, never mixed with the next pass. Collating here, not in Ray's threads, keeps the training order.
        def batches():
            for passes in itertools.count(1):
                self.train_passes = passes
                for rows in self.train_shard.iter_batches(
                    batch_size=self.step_rows, batch_format="numpy", drop_last=True, prefetch_batches=2
                ):
                    for micro_batch in micro_batches(rows, self.batch_size, self.length_grouping):
                        if self.on_train_batch is not None:
                            self.on_train_batch(micro_batch)
                        yield _to_device(self.collate(micro_batch), self.device)

        return torch.utils.data.DataLoader(_IterableOf(batches), batch_size=None)

    def eval_loader(self):
        # The validation shard is small and the same at every evaluation: read it from Ray once, then reuse it.
        # Padded micro-batches are cut from the rows sorted by length (`length_grouping`), as in training.
        if self._eval_batches is None:
            rows = _all_rows(self.eval_shard.iter_batches(batch_size=None, batch_format="numpy"))
            batches = micro_batches(rows, self.eval_batch_size, self.length_grouping) if rows else []
            self._eval_batches = [_to_device(self.collate(batch), self.device) for batch in batches]
        return torch.utils.data.DataLoader(_IterableOf(lambda: iter(self._eval_batches)), batch_size=None)


def micro_batches(rows: dict[str, Any], batch_size: int, by_length: bool):
    """Cut one optimizer step's rows (numpy columns) into micro-batches of `batch_size`, longest rows first when
    `by_length`: the step keeps its rows, and the rows of each micro-batch differ less in length."""
    count = len(rows["input_ids"])
    lengths = rows["length"] if "length" in rows else [len(ids) for ids in rows["input_ids"]]
    order = np.argsort(-np.asarray(lengths), kind="stable") if by_length else np.arange(count)
    for start in range(0, count, batch_size):
        index = order[start : start + batch_size]
        yield {name: column[index] for name, column in rows.items()}


def _all_rows(blocks) -> dict[str, np.ndarray]:
    """Numpy batches -> one batch of all their rows (object columns, so rows of any length concatenate)."""
    columns: dict[str, list] = {}
    for block in blocks:
        for name, column in block.items():
            columns.setdefault(name, []).extend(column)
    return {name: _object_array(values) for name, values in columns.items()}


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):
        array[index] = value
    return array


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


class _IterableOf(torch.utils.data.IterableDataset):
    def __init__(self, make_iterator):
        super().__init__()
        self.make_iterator = make_iterator

    def __iter__(self):
        return iter(self.make_iterator())


def streaming_trainer_class():
    """SFTTrainer (Unsloth's patched one when unsloth was imported) fed by Ray shards instead of HF DataLoaders."""
    from trl import SFTTrainer

    class StreamingSFTTrainer(SFTTrainer):
        ray_streams: RayStreams

        def get_train_dataloader(self):
            return self.ray_streams.train_loader()

        def get_eval_dataloader(self, eval_dataset=None):
            return self.ray_streams.eval_loader()

    return StreamingSFTTrainer


def as_hf_iterable(shard, split: str, max_length: int):
    """A `datasets.IterableDataset` view of a Ray shard: what TRL's type checks (and its first-row peek) expect.
    The batches the trainer consumes come from `RayStreams`, which reads the same shard.

    Built with a fixed fingerprint: `IterableDataset.from_generator` (datasets 5.2) has no `fingerprint` argument
    and hashes the generator and its arguments with dill, which pickles the whole Ray shard (its plan, actor
    handles, user functions) and disassembles every function on the way with `dis.dis` into stdout: seconds per
    split, and under Ray Train's print patch hundreds of lines of bytecode in the job log.

    The view carries Unsloth's claim that its rows are cut to `max_length` (`_unsloth_truncated_to`, read by
    Unsloth 2026.10.9's SFTTrainer), which medray's data preparation guarantees; without it Unsloth turns
    `padding_free` off for any pre-tokenized dataset ("Turning padding-free batching off, since your dataset is
    already tokenized").
    """
    from datasets.io.generator import GeneratorDatasetInputStream

    stream = GeneratorDatasetInputStream(
        generator=_shard_rows, gen_kwargs={"shard": shard}, streaming=True, fingerprint=f"medray-ray-shard-{split}"
    )
    view = stream.read()
    view._unsloth_truncated_to = max_length
    return view


def _shard_rows(shard):
    yield from shard.iter_rows()
