"""Throughput of 4-bit QLoRA SFT at Mistral-7B v0.3 size: medray under Ray Train against bare Unsloth and plain peft.

The model is a random-weight `MistralForCausalLM` with Mistral-7B v0.3's exact config (7,248,023,552 parameters)
and the real v0.3 tokenizer, trained with LoRA r=16 on all seven projections, AdamW 8-bit, bf16, max length 2048.
Three variants, each one process, one record each:

- `medray`: the real medray path, `medray.driver.build_trainer(cfg, data)` and `fit()`: Ray Train workers running
  `medray.worker.train_loop_per_worker` with the unsloth backend, on `--gpus` GPUs (DDP beyond one), the step
  timer attached as a worker extension (`benchmarks.steptimer.attach`);
- `bare`: `medray.model.load_model(cfg, "unsloth")` and a plain TRL `SFTTrainer` over a map-style dataset, no Ray;
- `peft`: `medray.model.load_model(cfg, "hf")` (bitsandbytes NF4, non-reentrant gradient checkpointing), same trainer.

All three get the same config and the worker's own SFT arguments (`medray.worker.sft_arguments`). The rows and the
model come from `benchmarks.workload`. Every optimizer step is stamped by `benchmarks.steptimer`
(CUDA-synchronised); tokens/s = real tokens of the steps after the warm-up / their wall time.
MFU = 6 x parameters x tokens/s per GPU / the measured bf16 matmul peak (8192^3); `benchmarks.records` writes
the JSON record.

    python jobs/benchmark.py --build --model-dir /tmp/m7b --tokenizer $TOK
    python jobs/benchmark.py --variant medray --gpus 2 --lengths full --batch 4 --json docs/benchmarks.json
    python jobs/benchmark.py --cpu --build && python jobs/benchmark.py --cpu --variant medray --json /tmp/b.json

`benchmarks.report` turns the JSON records into docs/benchmarks.md (`--table`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import steptimer
from benchmarks.records import make_record, rows_needed, total_steps
from benchmarks.workload import (
    group_by_length,
    make_rows,
)
from medray.config import MedrayConfig, load_config
from medray.contracts import WorkerPlan

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
PEAK_FILE = "/tmp/medray_bench_peak.json"


@dataclass
class BenchData:
    """What `medray.driver.build_trainer` reads from prepared data: the splits and the row count."""

    train: Any
    validation: Any
    stats: dict[str, Any]


def peak_tflops(args: argparse.Namespace) -> dict[str, Any]:
    """The measured peak, from `--peak-file` when an earlier run wrote it, else measured now in a child process
    (so this process, a Ray driver perhaps, never holds GPU memory)."""
    path = Path(args.peak_file)
    if not path.is_file():
        command = [sys.executable, str(REPO_ROOT / "jobs" / "benchmark.py"), "--measure-peak", "--peak-file", str(path)]
        done = subprocess.run(command + (["--cpu"] if args.cpu else []), cwd=REPO_ROOT)
        if done.returncode != 0:  # e.g. a Ray job's driver on a node without a GPU: no MFU, the rest stands
            print(f"could not measure the matmul peak (exit {done.returncode}); MFU left out", file=sys.stderr)
            return {"tflops": None, "gpu": None, "matmul": None}
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------- config


def run_name(args: argparse.Namespace) -> str:
    """A unique run name: a reused name would make medray resume from that run's checkpoint."""
    stamp = datetime.datetime.now().strftime("%H%M%S%f")
    return f"bench-{args.variant}-{args.lengths}-b{args.batch}x{args.grad_accum}-g{args.gpus}-{stamp}"


def bench_overrides(args: argparse.Namespace) -> list[str]:
    """The medray config of a benchmark run, as `key=value` overrides of the defaults (the reference recipe), with
    the batching knobs as config options: every variant takes its SFT arguments from that config."""
    cuda = not args.cpu
    overrides = [
        f"model.name={args.model_dir}",
        f"model.backend={'unsloth' if cuda else 'hf'}",
        f"model.load_in_4bit={str(cuda).lower()}",
        f"model.dtype={'bfloat16' if cuda else 'float32'}",
        "lora.r=16",
        "lora.alpha=16",
        "lora.dropout=0.0",
        f"data.max_length={args.seq_len}",
        "data.validation_fraction=0.0",
        f"train.per_device_batch_size={args.batch}",
        f"train.gradient_accumulation_steps={args.grad_accum}",
        f"train.max_steps={total_steps(args)}",
        f"train.optim={'adamw_8bit' if cuda else 'adamw_torch'}",
        f"train.precision={'bf16' if cuda else 'fp32'}",
        f"scaling.num_workers={args.gpus}",
        f"scaling.use_gpu={str(cuda).lower()}",
        f"scaling.cpus_per_worker={1 if args.cpu else 4}",
        f"run.name={args.run_name}",
        f"run.storage_path={args.storage}",
    ]
    return overrides + knob_overrides(args)


def knob_overrides(args: argparse.Namespace) -> list[str]:
    """The real-length knobs as medray config options (see the worker change that honours them)."""
    overrides = []
    if args.padding != "auto":
        overrides.append(f"train.padding={args.padding}")
    if args.sort_lengths:
        overrides.append("train.length_grouping=true")
    if args.pad_multiple:
        overrides.append(f"train.pad_to_multiple_of={args.pad_multiple}")
    return overrides


def profile_path(args: argparse.Namespace, rank: int | str = 0) -> str | None:
    """Where the profiled step's operator table goes (next to `--json`)."""
    if not args.profile:
        return None
    folder = Path(args.json).parent if args.json else Path(tempfile.gettempdir())
    return str(folder / f"profile_{args.run_name}_rank{rank}.txt")


# ---------------------------------------------------------------------------------------------------- variants


def run_single(args: argparse.Namespace) -> dict[str, Any]:
    """(b) bare Unsloth or (c) peft: load through medray.model, train with a plain SFTTrainer, no Ray."""
    import torch

    from medray.model import load_model

    cuda = not args.cpu
    cfg = load_config(None, bench_overrides(args))
    backend = "unsloth" if args.variant == "bare" and cuda else "hf"
    started = time.perf_counter()
    model, tokenizer = load_model(cfg, backend, torch.device("cuda", 0) if cuda else None)
    load_s = time.perf_counter() - started
    profile_step = args.steps + 1 if args.profile else None
    timer = steptimer.make_step_timer(cuda, args.grad_accum, profile_step, profile_path(args))
    trainer = _single_trainer(cfg, args, model, tokenizer, backend, timer)
    restore = count_at_collator(trainer, timer)
    trainer.train()
    restore()
    peak_gb = torch.cuda.max_memory_reserved() / GIB if cuda else None
    extra = {
        "backend": backend,
        "load_s": round(load_s, 1),
        "trainer": type(trainer).__mro__[1].__name__,
        # What TRL / Unsloth chose for a pre-tokenized dataset: their collator builds the batches here.
        "batch_layout": "padding_free" if getattr(trainer.args, "padding_free", False) else "padded",
    }
    if args.eval_rows:
        extra["eval"] = measure_eval(trainer, args, cuda)
    return make_record(args, [(timer.records, peak_gb)], peak_tflops(args), extra)


def _single_trainer(cfg: MedrayConfig, args, model, tokenizer, backend: str, timer):
    """A TRL SFTTrainer with the worker's SFT arguments over the rows, read in order (as the worker streams them)."""
    import datasets
    from trl import SFTConfig

    from medray.worker import sft_arguments

    plan = WorkerPlan(run_id=args.run_name, max_steps=total_steps(args), has_validation=False)
    sft = SFTConfig(**sft_arguments(cfg, plan, backend))
    rows = make_rows(rows_needed(args), args.lengths, args.seq_len, args.seed)
    if args.sort_lengths:
        rows = group_by_length(rows, args.batch * args.grad_accum)
    dataset = datasets.Dataset.from_list([{"input_ids": row["input_ids"]} for row in rows])
    return _in_order_trainer_class()(
        model=model, args=sft, processing_class=tokenizer, train_dataset=dataset, callbacks=[timer]
    )


def _in_order_trainer_class():
    """SFTTrainer (Unsloth's, once unsloth is imported) reading rows in order instead of shuffled."""
    from torch.utils.data import SequentialSampler
    from trl import SFTTrainer

    class InOrderSFTTrainer(SFTTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    return InOrderSFTTrainer


def count_at_collator(trainer, timer):
    """Make the trainer's collator report every micro-batch's rows to the timer; returns a function that undoes it.

    The hook goes on the collator's `torch_call` (where shared/gpu/bench_7b_batch.py counted, in step with the
    batches training_step saw), or around the collator itself when it has none.
    """
    collator = trainer.data_collator
    owner, name = (collator, "torch_call") if hasattr(collator, "torch_call") else (trainer, "data_collator")
    inner = getattr(owner, name)

    def counting(examples, *args, **kwargs):
        timer.count_tokens(examples)
        return inner(examples, *args, **kwargs)

    setattr(owner, name, counting)
    return lambda: setattr(owner, name, inner)


def measure_eval(trainer, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Forward-only throughput on `--eval-rows` real-length rows at the training micro-batch (one batch warms up)."""
    import datasets
    import torch

    rows = make_rows(args.eval_rows, "real", args.seq_len, args.seed + 1)
    dataset = datasets.Dataset.from_list([{"input_ids": row["input_ids"]} for row in rows])
    try:
        trainer.evaluate(eval_dataset=dataset.select(range(min(args.batch, len(rows)))))
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = trainer.evaluate(eval_dataset=dataset)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    except Exception as error:  # the training figures are measured already: keep them, note the failure
        return {"rows": len(rows), "error": f"{type(error).__name__}: {error}"[:500]}
    tokens = sum(row["length"] for row in rows)
    return {
        "rows": len(rows),
        "tokens": tokens,
        "s": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "loss": metrics.get("eval_loss"),
    }


def run_medray(args: argparse.Namespace) -> dict[str, Any]:
    """(a) medray: `medray.driver.build_trainer` + `fit()` on Ray Train workers; the workers time their steps."""
    import ray
    import ray.data

    from medray.driver import build_trainer

    cfg = load_config(None, bench_overrides(args))
    started = time.perf_counter()
    started_ray = init_ray(args)
    ray_init_s = time.perf_counter() - started
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = make_rows(rows_needed(args), args.lengths, args.seq_len, args.seed)
    data = BenchData(train=ray.data.from_items(rows), validation=None, stats={"rows_train": len(rows)})
    # Timing is a benchmark concern, not a config option: the step timer attaches to the workers as an extension.
    options = {"profile_step": args.steps + 1 if args.profile else None, "profile_path": profile_path(args, "{rank}")}
    trainer = build_trainer(cfg, data, extensions=[steptimer.EXTENSION], extension_options=options)
    started = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - started
    returned = result.return_value
    workers = sorted(returned.extensions[steptimer.EXTENSION], key=lambda worker: worker["rank"])
    per_rank = [(worker["step_times"], worker.get("peak_reserved_gb")) for worker in workers]
    extra = {"backend": returned.backend, "gpu": workers[0].get("gpu"), "batch_layout": returned.batch_layout}
    record = make_record(args, per_rank, peak_tflops(args), extra)
    loop_s = record["loop_s"]
    record["startup"] = {
        "ray_init_s": round(ray_init_s, 1),
        "fit_s": round(fit_s, 1),
        "train_loop_s": round(loop_s, 1),
        "startup_s": round(ray_init_s + fit_s - loop_s, 1),
    }
    if started_ray:
        ray.shutdown()
    return record


def init_ray(args: argparse.Namespace) -> bool:
    """Join the cluster of a `ray job submit` (or the caller's Ray), else start a local one; True if started here.

    `--env` variables go to every worker through the job's runtime environment (a local cluster also inherits
    this process's environment, where they were set before anything imported unsloth or torch.compile). A local
    cluster's workers get this checkout on their PYTHONPATH, for the step-timer extension.
    """
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": dict(args.env)} if args.env else None
    if os.environ.get("RAY_ADDRESS"):  # a job's workers find `benchmarks` in its working dir
        ray.init(runtime_env=runtime_env)
        return True
    # A local cluster's workers import the step timer (and medray) from this checkout.
    path = os.pathsep.join(item for item in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if item)
    runtime_env = {"env_vars": {**dict(args.env), "PYTHONPATH": path}}
    local = {"num_cpus": 2, "object_store_memory": 1024**3} if args.cpu else {}
    ray.init(address="local", include_dashboard=False, runtime_env=runtime_env, **local)
    return True
