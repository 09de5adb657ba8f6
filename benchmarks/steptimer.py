"""Per-optimizer-step wall time and real-token counts of a transformers / TRL trainer, and their summary.

`make_step_timer` returns a `transformers.TrainerCallback` that stamps the end of every optimizer step
(`torch.cuda.synchronize()`, then `time.perf_counter()`, so the step's GPU work lies inside its interval) and pairs
it with the real tokens of that step's micro-batches. The callback cannot see the batches, so the data path reports
them: it calls `timer.count_tokens(rows)` once per training micro-batch, in the order the trainer consumes them.

    timer = make_step_timer(sync_cuda=True, grad_accum=4)
    trainer.add_callback(timer)            # and the train loader calls timer.count_tokens(rows) per micro-batch
    trainer.train()
    summarize(timer.records, warmup=3)     # {"tokens_per_s": ..., "s_per_step_mean": ..., ...}

Inside medray's Ray Train workers the timer attaches as a worker extension: `build_trainer(cfg, data,
extensions=[EXTENSION], extension_options={"profile_step": ..., "profile_path": ".../profile_rank{rank}.txt"})`;
`attach` adds the callback and the loader hook, and every rank's records come back in
`WorkerResult.extensions[EXTENSION]`.

Tokens are counted from the rows before collation (the sum of their lengths), so padding never counts, whatever
the collator does (padded, padding-free, padded to a multiple). Loaders may run ahead of training; the counts queue
up and every step end takes the next `grad_accum` of them.

Why not `TrainingArguments.include_num_input_tokens_seen="non_padding"` (transformers 5.24,
`Trainer._track_num_input_tokens`): it counts `attention_mask.sum()`, or ids != pad id when there is no mask (the
padding-free case), then gathers and sums the count over all ranks with an `.item()` per micro-batch. So it gives
no per-GPU figure, and it adds a host sync to every micro-batch of the loop being measured.

Each record also carries `graphs`, the number of graphs torch.compile has built so far in the process: a step
whose `graphs` rose recompiled, which explains an outlier step time. One step can be profiled (`profile_step`):
its table of the slowest operators is written to `profile_path`, and its record gets `kernel_s`, the GPU time of
its kernels; well below the step's wall time means the GPU waited for the host.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

EXTENSION = "benchmarks.steptimer:attach"
GIB = 1024**3


def attach(context) -> RankTimer:
    """Worker extension: time this rank's optimizer steps (see `medray.worker.WorkerContext`).

    Options (`WorkerPlan.extension_options`): `profile_step` (optimizer step to profile, or None) and
    `profile_path` (its operator table; `{rank}` is replaced by the rank).
    """
    options = context.plan.extension_options
    path = options.get("profile_path")
    timer = make_step_timer(
        sync_cuda=context.device.type == "cuda",
        grad_accum=context.cfg.train.gradient_accumulation_steps,
        profile_step=options.get("profile_step"),
        profile_path=path.format(rank=context.rank) if path else None,
    )
    context.trainer.add_callback(timer)
    context.on_train_batch(timer.count_tokens)
    return RankTimer(timer, context.rank, context.device)


class RankTimer:
    """One rank's step timer; `result()` is what the rank returns: its step records and peak memory."""

    def __init__(self, timer, rank: int, device):
        self.timer, self.rank, self.device = timer, rank, device

    def result(self) -> dict[str, Any]:
        import torch

        cuda = self.device.type == "cuda"
        return {
            "rank": self.rank,
            "step_times": self.timer.records,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(self.device) / GIB if cuda else None,
            "peak_allocated_gb": torch.cuda.max_memory_allocated(self.device) / GIB if cuda else None,
            "gpu": torch.cuda.get_device_name(self.device) if cuda else "cpu",
        }


def make_step_timer(
    sync_cuda: bool,
    grad_accum: int = 1,
    profile_step: int | None = None,
    profile_path: str | None = None,
):
    """A `transformers.TrainerCallback` recording `{step, t_start, t_end, tokens, graphs}` per optimizer step.

    Args:
        sync_cuda: Call `torch.cuda.synchronize()` before reading the clock (True on GPU).
        grad_accum: Micro-batches per optimizer step (how many token counts one step takes).
        profile_step: Optimizer step to run under `torch.profiler`, or None. Leave it outside the timed steps.
        profile_path: File for the profiled step's operator table.
    """
    from transformers import TrainerCallback  # here, not at import: unsloth must be imported before transformers

    class StepTimer(TrainerCallback):
        """Stamps every optimizer step's end; see `benchmarks.steptimer`."""

        def __init__(self):
            self.records: list[dict[str, Any]] = []
            self.grad_accum = grad_accum
            self._counts: deque[int] = deque()
            self._last_end: float | None = None
            self._profiler = None

        def count_tokens(self, rows) -> int:
            """Queue the real tokens of one training micro-batch (see `count_real_tokens`); returns the count."""
            tokens = count_real_tokens(rows)
            self._counts.append(tokens)
            return tokens

        def on_train_begin(self, args, state, control, **kwargs):
            self._last_end = _now(sync_cuda)

        def on_step_begin(self, args, state, control, **kwargs):
            if profile_step is not None and state.global_step + 1 == profile_step:
                self._profiler = _start_profiler(sync_cuda)

        def on_step_end(self, args, state, control, **kwargs):
            end = _now(sync_cuda)
            record = {
                "step": state.global_step,
                "t_start": self._last_end if self._last_end is not None else end,
                "t_end": end,
                "tokens": self._take_tokens(),
                "graphs": compiled_graphs(),
            }
            self._last_end = end
            if profile_step == state.global_step:
                kernel_s = _stop_profiler(self._profiler, profile_path) if self._profiler is not None else None
                record.update(profiled=True, kernel_s=kernel_s)
                self._profiler = None
                self._last_end = _now(sync_cuda)  # writing the profile must not count against the next step
            self.records.append(record)

        def _take_tokens(self) -> int | None:
            if len(self._counts) < self.grad_accum:
                self._counts.clear()  # nobody counts (or counting broke): no token figure rather than a wrong one
                return None
            return sum(self._counts.popleft() for _ in range(self.grad_accum))

    return StepTimer()


def count_real_tokens(rows) -> int:
    """Real tokens of one micro-batch, taken before collation.

    Accepts a Ray batch (`{"input_ids": array of arrays, "length": array}`, the `length` column is used when present),
    a list of rows (`[{"input_ids": [...]}, ...]`, what a collator receives) or a 2-D array of ids with no padding.
    """
    if isinstance(rows, dict):
        if "length" in rows:
            return int(sum(int(n) for n in rows["length"]))
        return int(sum(len(ids) for ids in rows["input_ids"]))
    if hasattr(rows, "shape"):
        return int(rows.shape[0] * rows.shape[1])
    return int(sum(len(row["input_ids"]) for row in rows))


def compiled_graphs() -> int | None:
    """Graphs torch.compile has built in this process so far; None if torch._dynamo was never imported."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is None:
        return None
    return int(dynamo.counters["stats"]["unique_graphs"])


def summarize(records: list[dict[str, Any]], warmup: int = 3) -> dict[str, Any]:
    """Throughput over the steps after the first `warmup` ones (profiled steps left out).

    Returns:
        `tokens_per_s` (real tokens of the timed steps / their summed wall time), `tokens_per_s_steady` (the median
        step's rate: what the loop runs at without one-off stalls), `s_per_step_mean/median/min/max`, `steps_timed`,
        `tokens_timed`, `elapsed_s`, `new_graphs` (graphs compiled during the timed steps) and `loop_s` (first step's
        start to last step's end, warm-up included). Token figures are None when steps carry no token count.

    Raises:
        ValueError: If no step is left after the warm-up.
    """
    timed = [record for record in records[warmup:] if not record.get("profiled")]
    if not timed:
        raise ValueError(f"{len(records)} step(s) recorded: none left to time after {warmup} warm-up step(s)")
    seconds = [record["t_end"] - record["t_start"] for record in timed]
    elapsed = sum(seconds)
    tokens = [record.get("tokens") for record in timed]
    counted = all(count is not None for count in tokens)
    return {
        "tokens_per_s": sum(tokens) / elapsed if counted else None,
        "tokens_per_s_steady": statistics.median(n / s for n, s in zip(tokens, seconds, strict=True))
        if counted
        else None,
        "s_per_step_mean": elapsed / len(timed),
        "s_per_step_median": statistics.median(seconds),
        "s_per_step_min": min(seconds),
        "s_per_step_max": max(seconds),
        "steps_timed": len(timed),
        "tokens_timed": sum(tokens) if counted else None,
        "elapsed_s": elapsed,
        "new_graphs": _graph_growth(records[warmup - 1] if warmup > 0 else None, timed[-1]),
        "loop_s": records[-1]["t_end"] - records[0]["t_start"],
    }


def step_table(records: list[dict[str, Any]]) -> list[list]:
    """Compact per-step log: `[step, seconds, tokens, graphs]` rows (plus `kernel_s` for a profiled step)."""
    rows = []
    for record in records:
        row = [
            record["step"],
            round(record["t_end"] - record["t_start"], 4),
            record.get("tokens"),
            record.get("graphs"),
        ]
        if record.get("profiled"):
            row.append({"profiled": True, "kernel_s": record.get("kernel_s")})
        rows.append(row)
    return rows


def _graph_growth(before: dict | None, last: dict) -> int | None:
    start = 0 if before is None else before.get("graphs")
    end = last.get("graphs")
    return None if start is None or end is None else end - start


def _now(sync_cuda: bool) -> float:
    if sync_cuda:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def _start_profiler(cuda: bool):
    """Start `torch.profiler` on CPU (and CUDA) activity; None if it cannot start (profiling is optional)."""
    import torch.profiler as profiler

    activities = [profiler.ProfilerActivity.CPU] + ([profiler.ProfilerActivity.CUDA] if cuda else [])
    try:
        handle = profiler.profile(activities=activities)
        handle.__enter__()
    except Exception as error:  # e.g. CUPTI refused in a container: keep training, just unprofiled
        print(f"[steptimer] profiler did not start: {error}", file=sys.stderr)
        return None
    return handle


def _stop_profiler(handle, path: str | None) -> float | None:
    """Stop the profiler, write its operator table to `path`, return the summed GPU kernel time in seconds."""
    try:
        handle.__exit__(None, None, None)
        averages = handle.key_averages()
        kernel_us = sum(getattr(event, "self_device_time_total", 0.0) for event in averages)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            sort_key = "self_device_time_total" if kernel_us else "self_cpu_time_total"
            Path(path).write_text(averages.table(sort_by=sort_key, row_limit=40, max_name_column_width=70))
        return kernel_us / 1e6
    except Exception as error:
        print(f"[steptimer] profiler output failed: {error}", file=sys.stderr)
        return None
