"""Throughput of 4-bit QLoRA SFT at Mistral-7B v0.3 size: medray under Ray Train against bare Unsloth and plain peft.

The model is a random-weight `MistralForCausalLM` with Mistral-7B v0.3's exact config (7,248,023,552 parameters)
and the real v0.3 tokenizer, trained with LoRA r=16 on all seven projections, AdamW 8-bit, bf16, max length 2048.
Three variants, each one process, one record each:

- `medray`: the real medray path, `medray.driver.build_trainer(cfg, data)` and `fit()`: Ray Train workers running
  `medray.worker.train_loop_per_worker` with the unsloth backend, on `--gpus` GPUs (DDP beyond one);
- `bare`: `medray.model.load_model(cfg, "unsloth")` and a plain TRL `SFTTrainer` over a map-style dataset, no Ray;
- `peft`: `medray.model.load_model(cfg, "hf")` (bitsandbytes NF4, non-reentrant gradient checkpointing), same trainer.

All three get the same config and the worker's own SFT arguments. Rows are `full` (exactly max-length random ids,
BOS first) or `real` (lengths drawn like the real data: Normal(892, 177) clipped to [300, 1423], seed 0). Every
optimizer step is stamped by `medray.steptimer` (CUDA-synchronised); tokens/s = real tokens of the steps after the
warm-up / their wall time. MFU = 6 x parameters x tokens/s per GPU / the measured bf16 matmul peak (8192^3).

    python jobs/benchmark.py --build --model-dir /tmp/m7b --tokenizer $TOK
    python jobs/benchmark.py --variant medray --gpus 2 --lengths full --batch 4 --json docs/benchmarks.json
    python jobs/benchmark.py --cpu --build && python jobs/benchmark.py --cpu --variant medray --json /tmp/b.json

`medray.bench_report` turns the JSON records into docs/benchmarks.md (`--table`).
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medray.config import MedrayConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3

MISTRAL_7B_V03 = dict(
    vocab_size=32768,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    sliding_window=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
)
"""Mistral-7B v0.3's config.json, the numbers that matter."""
TINY_MISTRAL = dict(
    MISTRAL_7B_V03,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)
"""The CPU dry run's 2-layer model (the test suite's shape)."""

FULL_LENGTH = 2048
REAL_LENGTHS = {"mean": 892, "sd": 177, "low": 300, "high": 1423}
"""Token lengths of medical-o1 `en` rows under the v0.3 tokenizer (mean 892, p90 1119, max 1423), at max length 2048."""
VARIANTS = {
    "medray": "(a) medray: Ray Train worker, unsloth backend",
    "bare": "(b) bare Unsloth + TRL, no Ray",
    "peft": "(c) transformers + peft + bitsandbytes, gradient checkpointing",
}
VERSIONED = ["torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "ray", "bitsandbytes", "datasets"]
PEAK_FILE = "/tmp/medray_bench_peak.json"


@dataclass
class BenchData:
    """What `medray.driver.build_trainer` reads from prepared data: the splits and the row count."""

    train: Any
    validation: Any
    stats: dict[str, Any]


# ---------------------------------------------------------------------------------------------------- rows


def row_lengths(n_rows: int, lengths: str, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """`full`: every row `seq_len` tokens; `real`: the real data's shape, scaled by `seq_len / 2048`."""
    if lengths == "full":
        return np.full(n_rows, seq_len, dtype=np.int64)
    scale = seq_len / FULL_LENGTH
    drawn = rng.normal(REAL_LENGTHS["mean"] * scale, REAL_LENGTHS["sd"] * scale, size=n_rows)
    low, high = round(REAL_LENGTHS["low"] * scale), round(REAL_LENGTHS["high"] * scale)
    return np.clip(np.rint(drawn), low, high).astype(np.int64)


def make_rows(n_rows: int, lengths: str, seq_len: int, seed: int = 0) -> list[dict[str, Any]]:
    """Pre-tokenized rows `{"input_ids", "length"}` of random ids 1000-31999 after BOS (1); never the pad id 0.

    The draws follow shared/gpu/bench_7b_batch.py (one generator: lengths first, then each row's ids), so `real`
    rows are the ones behind the 6,911 / 9,316 tokens/s of bare Unsloth.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for length in row_lengths(n_rows, lengths, seq_len, rng):
        ids = rng.integers(1000, 32000, size=int(length), dtype=np.int64)
        ids[0] = 1
        rows.append({"input_ids": ids.tolist(), "length": int(length)})
    return rows


def length_stats(lengths) -> dict[str, float]:
    """n, mean, median, p90, min and max of a list of row lengths."""
    values = np.asarray(list(lengths), dtype=np.float64)
    return {
        "n": int(values.size),
        "mean": round(float(values.mean()), 1),
        "median": round(float(np.median(values)), 1),
        "p90": round(float(np.percentile(values, 90)), 1),
        "min": int(values.min()),
        "max": int(values.max()),
    }


def group_by_length(rows: list[dict], step_rows: int) -> list[dict]:
    """Sort each run of `step_rows` rows (one optimizer step's) by length, longest first; steps keep their rows."""
    grouped = []
    for start in range(0, len(rows), step_rows):
        grouped.extend(sorted(rows[start : start + step_rows], key=lambda row: -row["length"]))
    return grouped


# ---------------------------------------------------------------------------------------------------- model


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Mistral-style decoder from its config: embeddings, layers, final norm, untied LM head."""
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    layer = attention + 3 * hidden * config["intermediate_size"] + 2 * hidden
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return embeddings + config["num_hidden_layers"] * layer + hidden


def load_tokenizer_source(source: str | Path):
    """A tokenizer folder, or Mistral's sentencepiece `tokenizer.model` converted (transformers 5 reads a folder
    holding only that file as the full 32,768-piece tokenizer); `<unk>` becomes the pad token."""
    from transformers import AutoTokenizer, LlamaTokenizer

    path = Path(source).expanduser()
    if path.is_file():
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy(path, Path(folder) / "tokenizer.model")
            tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=False, add_bos_token=True, add_eos_token=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def default_tokenizer_source() -> Path:
    """The v0.3 sentencepiece model shipped in `mistral-common` (the CPU dry run's tokenizer)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


def build_model_dir(folder: str | Path, tokenizer_source: str | Path, cpu: bool) -> dict[str, Any]:
    """Save a random-weight Mistral (7B v0.3 shape, or the tiny one on CPU) with its tokenizer as safetensors.

    The 7B weights are initialised in bf16 directly on GPU 0 (0.2 s) and saved in 5 GB shards (~15 s).
    """
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    started = time.perf_counter()
    tokenizer = load_tokenizer_source(tokenizer_source)
    shape = TINY_MISTRAL if cpu else MISTRAL_7B_V03
    torch.manual_seed(0)
    with torch.device("cpu" if cpu else "cuda"):
        model = MistralForCausalLM._from_config(MistralConfig(**shape), dtype=torch.float32 if cpu else torch.bfloat16)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(str(folder))
    if Path(tokenizer_source).is_file():  # the sentencepiece model goes beside it, as shared/gpu's builder did
        shutil.copy(tokenizer_source, Path(folder) / "tokenizer.model")
    return {
        "dir": str(folder),
        "params": parameters,
        "vocab": len(tokenizer),
        "s": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------------------------------------------- peak FLOP/s


def measure_peak_tflops(cuda: bool) -> dict[str, Any]:
    """Dense matmul TFLOP/s: bf16 8192^3 timed with CUDA events on GPU; fp32 1024^3 on CPU (dry runs only)."""
    import torch

    size, dtype, device, repeats = (8192, torch.bfloat16, "cuda", 20) if cuda else (1024, torch.float32, "cpu", 5)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        seconds = time.perf_counter() - started
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    tflops = 2 * size**3 * repeats / seconds / 1e12
    return {"tflops": round(tflops, 1 if cuda else 4), "gpu": device_name, "matmul": f"{size}^3"}


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


def total_steps(args: argparse.Namespace) -> int:
    """Optimizer steps to run: the timed ones, plus one profiled step after them with `--profile`."""
    return args.steps + (1 if args.profile else 0)


def rows_needed(args: argparse.Namespace) -> int:
    """Rows for every step on every GPU, plus two steps' worth so no loader wraps around."""
    return args.batch * args.grad_accum * args.gpus * (total_steps(args) + 2)


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
    from medray.steptimer import make_step_timer

    cuda = not args.cpu
    cfg = load_config(None, bench_overrides(args))
    backend = "unsloth" if args.variant == "bare" and cuda else "hf"
    started = time.perf_counter()
    model, tokenizer = load_model(cfg, backend, torch.device("cuda", 0) if cuda else None)
    load_s = time.perf_counter() - started
    timer = make_step_timer(cuda, args.grad_accum, args.steps + 1 if args.profile else None, profile_path(args))
    trainer = _single_trainer(cfg, args, model, tokenizer, backend, timer)
    restore = count_at_collator(trainer, timer)
    trainer.train()
    restore()
    peak_gb = torch.cuda.max_memory_reserved() / GIB if cuda else None
    extra = {"backend": backend, "load_s": round(load_s, 1), "trainer": type(trainer).__mro__[1].__name__}
    if args.eval_rows:
        extra["eval"] = measure_eval(trainer, args, cuda)
    return make_record(args, [(timer.records, peak_gb)], extra)


def _single_trainer(cfg: MedrayConfig, args, model, tokenizer, backend: str, timer):
    """A TRL SFTTrainer with the worker's SFT arguments over the rows, read in order (as the worker streams them)."""
    import datasets
    from trl import SFTConfig

    from medray.worker import _sft_arguments

    plan = {
        "max_steps": total_steps(args),
        "has_validation": False,
        "run_id": args.run_name,
        "rank": 0,
        "tensorboard_dir": None,
    }
    sft = SFTConfig(**_sft_arguments(cfg, plan, backend))
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
    trainer = build_trainer(cfg, data)
    # Timing is a benchmark concern, not a config option: it rides in the plan the driver hands the workers.
    trainer.train_loop_config["plan"].update(
        time_steps=True,
        profile_step=args.steps + 1 if args.profile else None,
        profile_path=profile_path(args, "{rank}"),
    )
    started = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - started
    workers = (result.return_value or {}).get("workers")
    if not workers:
        raise RuntimeError(
            "the medray worker returned no per-rank step timings (`workers`); it needs the step-timer change "
            "proposed with medray/steptimer.py (plan['time_steps'])"
        )
    workers = sorted(workers, key=lambda worker: worker["rank"])
    per_rank = [(worker["step_times"], worker.get("peak_reserved_gb")) for worker in workers]
    record = make_record(args, per_rank, {"backend": result.return_value.get("backend"), "gpu": workers[0].get("gpu")})
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
    this process's environment, where they were set before anything imported unsloth or torch.compile).
    """
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": dict(args.env)} if args.env else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)
        return True
    local = {"num_cpus": 2, "object_store_memory": 1024**3} if args.cpu else {}
    ray.init(address="local", include_dashboard=False, runtime_env=runtime_env, **local)
    return True


# ---------------------------------------------------------------------------------------------------- records


def make_record(args: argparse.Namespace, per_rank: list[tuple[list, float | None]], extra: dict) -> dict[str, Any]:
    """One JSON record from each rank's step records and peak reserved memory (rank order)."""
    from medray.steptimer import step_table, summarize

    summaries = [summarize(records, args.warmup) for records, _ in per_rank]
    first = summaries[0]
    rates = [summary["tokens_per_s"] for summary in summaries]
    per_gpu = sum(rates) / len(rates) if None not in rates else None
    peaks = [peak for _, peak in per_rank if peak is not None]
    peak = peak_tflops(args)
    n_params = count_parameters(json.loads((Path(args.model_dir) / "config.json").read_text()))
    record = {
        "name": record_name(args),
        "variant": args.variant,
        "gpus": args.gpus,
        "batch": args.batch,
        "grad_accum": args.grad_accum,
        "lengths": args.lengths,
        "seq_len": args.seq_len,
        "tokens_per_s_per_gpu": _round(per_gpu, 1),
        "tokens_per_s_total": _round(sum(rates), 1) if per_gpu is not None else None,
        "tokens_per_s_steady": _round(first["tokens_per_s_steady"], 1),
        "peak_reserved_gb": round(max(peaks), 2) if peaks else None,
        "mfu": _round(6 * n_params * per_gpu / (peak["tflops"] * 1e12), 4) if per_gpu and peak["tflops"] else None,
        "s_per_step": round(first["s_per_step_mean"], 4),
        "s_per_step_min": round(first["s_per_step_min"], 4),
        "s_per_step_max": round(first["s_per_step_max"], 4),
        "steps_timed": first["steps_timed"],
        "warmup": args.warmup,
        "tokens_timed": first["tokens_timed"],
        "new_graphs_timed": first["new_graphs"],
        "loop_s": round(first["loop_s"], 2),
        "warmup_extra_s": _round(_warmup_extra_s(per_rank[0][0], args.warmup, first["tokens_per_s"]), 2),
        "knobs": knobs(args),
        "row_lengths": length_stats(make_row_lengths(args)),
        "n_params": n_params,
        "peak_tflops": peak["tflops"],
        "date": datetime.date.today().isoformat(),
        "gpu": peak["gpu"],
        "versions": versions(),
        "command": args.command,
        "per_rank": [
            {"rank": rank, "tokens_per_s": _round(summary["tokens_per_s"], 1), "peak_reserved_gb": _round(gb, 2)}
            for rank, (summary, (_, gb)) in enumerate(zip(summaries, per_rank, strict=True))
        ],
        "steps": step_table(per_rank[0][0]),
    }
    record.update(extra)
    return record


def record_name(args: argparse.Namespace) -> str:
    """`(a) medray: ..., 2 GPUs` and the like."""
    if args.variant != "medray":
        return VARIANTS[args.variant]
    return f"{VARIANTS[args.variant]}, {args.gpus} GPU" + ("s" if args.gpus > 1 else "")


def make_row_lengths(args: argparse.Namespace) -> np.ndarray:
    """The lengths of the rows a run drew (same seed and count as the run)."""
    return row_lengths(rows_needed(args), args.lengths, args.seq_len, np.random.default_rng(args.seed))


def _warmup_extra_s(records: list[dict], warmup: int, rate: float | None) -> float | None:
    """Seconds the warm-up steps took beyond their tokens at the timed rate: first-step compiles and allocations."""
    if not rate or warmup == 0 or any(record.get("tokens") is None for record in records[:warmup]):
        return None
    seconds = records[warmup - 1]["t_end"] - records[0]["t_start"]
    return seconds - sum(record["tokens"] for record in records[:warmup]) / rate


def knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The real-length knobs of a run, as recorded (defaults included, so records compare)."""
    return {
        "padding": args.padding,
        "sort_lengths": args.sort_lengths,
        "pad_multiple": args.pad_multiple,
        "env": dict(args.env),
        "profile": args.profile,
    }


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that set the figures."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append `record` to the JSON list at `path` (created if missing); safe for runs finishing at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else []
        records.append(record)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(records, indent=1) + "\n")
        os.replace(temporary, path)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_argument_group("modes (default: run one --variant)")
    mode.add_argument("--build", action="store_true", help="build --model-dir (random weights) and exit")
    mode.add_argument("--measure-peak", action="store_true", help="measure the matmul peak into --peak-file")
    mode.add_argument("--table", action="store_true", help="render --md from the records in --json")
    mode.add_argument("--merge", nargs="+", metavar="FILE", help="append the records of these JSON files to --json")
    run = parser.add_argument_group("run")
    run.add_argument("--variant", choices=sorted(VARIANTS), default="medray")
    run.add_argument("--gpus", type=int, default=1, help="Ray Train workers, one GPU each (medray only)")
    run.add_argument("--lengths", choices=["full", "real"], default="full")
    run.add_argument("--batch", type=int, default=4, help="per-device micro-batch (rows)")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--steps", type=int, default=None, help="optimizer steps (default 18; 4 with --cpu)")
    run.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; 1 with --cpu)")
    run.add_argument("--seq-len", type=int, default=None, help="max length (default 2048; 128 with --cpu)")
    run.add_argument("--model-dir", default=None, help="default /tmp/m7b (/tmp/medray_bench_tiny with --cpu)")
    run.add_argument(
        "--tokenizer",
        "--tokenizer-dir",
        dest="tokenizer",
        default=None,
        help="for --build: a tokenizer folder or Mistral's tokenizer.model (default: mistral-common's)",
    )
    run.add_argument("--json", default=None, help="append the record to this JSON list")
    run.add_argument("--cpu", action="store_true", help="CPU dry run: tiny model, hf backend, fp32")
    run.add_argument("--eval-rows", type=int, default=0, help="bare/peft: also time evaluation on N real rows")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--storage", default="/tmp/medray_bench", help="run.storage_path of medray runs")
    run.add_argument("--peak-file", default=PEAK_FILE, help="measured peak, reused by later runs")
    knob = parser.add_argument_group("real-length knobs (recorded in the JSON)")
    knob.add_argument(
        "--padding",
        choices=["auto", "padding_free", "padded"],
        default="auto",
        help="unsloth batch layout: padding-free rows (eager layers) or padded (compiled layers)",
    )
    knob.add_argument("--sort-lengths", action="store_true", help="sort each optimizer step's rows by length")
    knob.add_argument("--pad-multiple", type=int, default=None, help="pad micro-batches to a multiple of K tokens")
    knob.add_argument(
        "--env",
        action="append",
        default=[],
        type=_env_pair,
        metavar="KEY=VALUE",
        help="environment for the trainer processes, e.g. UNSLOTH_COMPILE_DISABLE=1 (repeatable)",
    )
    knob.add_argument(
        "--profile",
        action="store_true",
        help="run one more step under torch.profiler (untimed); its op table goes next to --json",
    )
    table = parser.add_argument_group("table")
    table.add_argument("--md", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    table.add_argument(
        "--extra-startup-s",
        type=float,
        default=0.0,
        help="projection: start-up the benchmark does not see (data preparation), in seconds",
    )
    return parser


def _env_pair(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"--env {text!r}: expected KEY=VALUE, e.g. UNSLOTH_COMPILE_DISABLE=1")
    return key, value


def resolve_defaults(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Fill the defaults that depend on `--cpu`, and check the combination."""
    args.steps = args.steps if args.steps is not None else (4 if args.cpu else 18)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3)
    args.seq_len = args.seq_len or (128 if args.cpu else FULL_LENGTH)
    args.model_dir = args.model_dir or ("/tmp/medray_bench_tiny" if args.cpu else "/tmp/m7b")
    args.json = args.json or (str(REPO_ROOT / "docs" / "benchmarks.json") if args.table or args.merge else None)
    args.command = "python jobs/benchmark.py " + shlex.join(argv)
    if args.variant != "medray" and args.gpus != 1:
        raise SystemExit(f"--gpus {args.gpus}: only the medray variant runs on more than one GPU")
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}")
    args.run_name = run_name(args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of jobs/benchmark.py; prints `RESULT {...}` for a run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_defaults(build_parser().parse_args(argv), argv)
    if args.table:
        from medray.bench_report import summary_text, write_report

        print(summary_text(args.json, extra_startup_s=args.extra_startup_s))
        print(f"wrote {write_report(args.json, args.md, extra_startup_s=args.extra_startup_s)}")
        return 0
    if args.merge:
        for source in args.merge:
            for record in json.loads(Path(source).read_text()):
                append_record(args.json, record)
        print(f"appended the records of {', '.join(args.merge)} to {args.json}")
        return 0
    if args.measure_peak:
        Path(args.peak_file).write_text(json.dumps(measure_peak_tflops(cuda=not args.cpu)))
        print(f"peak {Path(args.peak_file).read_text()}")
        return 0
    if args.build:
        source = args.tokenizer or default_tokenizer_source()
        print("BUILT", json.dumps(build_model_dir(args.model_dir, source, cpu=args.cpu)), flush=True)
        return 0
    os.environ.update(dict(args.env))  # before anything imports unsloth, torch.compile or Ray
    record = run_medray(args) if args.variant == "medray" else run_single(args)
    if args.json:
        append_record(args.json, record)
    short = {key: value for key, value in record.items() if key not in ("versions", "steps", "command")}
    print("RESULT", json.dumps(short), flush=True)
    print("STEPS", json.dumps(record["steps"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
