"""Training metrics: throughput, GPU memory, MFU, NVML and RSS in every log entry, live Ray gauges, a progress line.

`TrainingMetricsCallback` goes into the HF / TRL trainer of every Ray Train worker. At each logging step it

1. adds the figures people watch to the log entry (`logs` and `state.log_history[-1]`), so they reach
   `history.json`, TensorBoard and, through `RayTrainReportCallback`, `ray.train.report` (the driver and Tune);
2. sets `ray.util.metrics` gauges named `medray_<field>` tagged `run`, `trial`, `rank` (the Ray dashboard's
   Metrics tab and any Prometheus scraping the node's metrics port, where Ray prefixes them with `ray_`);
3. prints one progress line on rank 0 (what `ray job logs -f` shows).

The fields (GB are 2**30 bytes, as in the reference notebook; GPU fields only when the trainer runs on CUDA):

    train_runtime_s              wall time since training began (evaluations included)
    tokens_per_s_total           non-padding tokens per second over all workers, since the previous log
    tokens_per_s_worker          the same, per worker (total / world size)
    tokens_per_s_avg             all workers, averaged since training began (evaluations excluded)
    mfu                          6 * N * tokens_per_s_worker / peak FLOP/s of one device
    gpu_total_gb                 the device's memory
    gpu_mem_reserved_before_gb   peak reserved memory when training began: the base model
    gpu_peak_reserved_gb         peak reserved memory so far
    gpu_lora_mem_gb              peak - before: what LoRA training added
    gpu_peak_reserved_pct, gpu_lora_mem_pct, gpu_mem_reserved_before_pct   each as % of gpu_total_gb
    gpu_util_pct, gpu_power_w    NVML (nvidia-ml-py), when it is installed
    rss_gb                       resident memory of the worker process

Token counts come from the trainer, which already sums them over ranks: `state.num_input_tokens_seen` when
`include_num_input_tokens_seen="non_padding"` is set, else TRL's `num_tokens` log field. The callback itself runs
no collective operation, so it cannot deadlock ranks that log at different moments.

The class duck-types `transformers.TrainerCallback` (the trainer's CallbackHandler calls event methods by name),
so this module imports neither transformers nor trl: the worker must be free to import unsloth before them.

    callback = TrainingMetricsCallback("medray-run", trial=None, rank=0, world_size=2,
                                       n_params_for_mfu=count_params_for_mfu(model), peak_flops=gpu_peak_flops())
    trainer.callback_handler.callbacks.insert(0, callback)   # first, so TensorBoard sees the fields too
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import psutil
import torch

from medray.console import say

logger = logging.getLogger(__name__)

GIB = 1024**3

GAUGES: dict[str, str] = {
    "step": "Optimizer step of the latest log.",
    "epoch": "Fractional epoch of the latest log.",
    "loss": "Training loss averaged over the last logging window.",
    "eval_loss": "Validation loss of the latest evaluation.",
    "learning_rate": "Learning rate.",
    "grad_norm": "Gradient norm before clipping.",
    "train_runtime_s": "Seconds since training began.",
    "tokens_per_s_total": "Non-padding tokens per second over all workers.",
    "tokens_per_s_worker": "Non-padding tokens per second per worker.",
    "tokens_per_s_avg": "Non-padding tokens per second over all workers, averaged since training began.",
    "mfu": "Model FLOPs utilisation of this worker's device (0-1).",
    "gpu_total_gb": "Total memory of the GPU (GB).",
    "gpu_mem_reserved_before_gb": "Peak reserved GPU memory before training began: the base model (GB).",
    "gpu_mem_reserved_before_pct": "Base-model memory as a % of the GPU's memory.",
    "gpu_peak_reserved_gb": "Peak reserved GPU memory so far (GB).",
    "gpu_peak_reserved_pct": "Peak reserved GPU memory as a % of the GPU's memory.",
    "gpu_lora_mem_gb": "Peak reserved memory added by LoRA training (GB).",
    "gpu_lora_mem_pct": "Memory added by LoRA training as a % of the GPU's memory.",
    "gpu_util_pct": "GPU utilisation from NVML (%).",
    "gpu_power_w": "GPU power draw from NVML (W).",
    "rss_gb": "Resident memory of the worker process (GB).",
}
"""Gauge `medray_<key>` for each key, with its description; set whenever the key is in a log entry."""

TAG_KEYS = ("run", "trial", "rank")

# Dense bf16/fp16 tensor-core peak FLOP/s per device, from NVIDIA's data sheets; matched on the device name.
# The first key found in the name wins, so the specific names come first.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
}


class TrainingMetricsCallback:
    """Adds throughput, memory, MFU, NVML and RSS to every log entry; sets Ray gauges; prints progress on rank 0.

    Args:
        run_name: The run's name (gauge tag `run`).
        trial: The Tune trial id, or None outside a search (gauge tag `trial`, "none" when None).
        rank: This worker's global rank (gauge tag `rank`); rank 0 prints the progress line.
        world_size: Number of workers, to turn the all-rank token rate into a per-worker rate.
        n_params_for_mfu: Parameters N of the model for the 6*N FLOPs-per-token estimate; no MFU when None.
        peak_flops: Peak FLOP/s of one device; no MFU when None (see `gpu_peak_flops`).
        total_steps: Steps of the run for the progress line, when the trainer does not know (`max_steps` <= 0).
    """

    def __init__(
        self,
        run_name: str,
        trial: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        n_params_for_mfu: int | None = None,
        peak_flops: float | None = None,
        total_steps: int | None = None,
    ):
        self.tags = {"run": run_name, "trial": trial or "none", "rank": str(rank)}
        self.rank = rank
        self.world_size = max(1, world_size)
        self.flops_per_token = 6 * n_params_for_mfu if n_params_for_mfu else None
        self.peak_flops = peak_flops
        self.total_steps = total_steps
        self._start_time: float | None = None
        self._device: torch.device | None = None
        self._gauges: dict[str, Any] | None = None

    # HF's CallbackHandler calls every event by name; the events this class does not define do nothing.
    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return _ignore_event
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clocks and the token count; note the memory the base model holds."""
        now = time.perf_counter()
        self._start_time = now
        self._start_step = state.global_step
        self._window = (now, getattr(state, "num_input_tokens_seen", 0) or 0)
        self._eval_seconds = 0.0
        self._run_tokens, self._run_seconds = 0, 0.0
        self._device = args.device if args.device.type == "cuda" else None
        if self._device is not None:
            self._mem_before = torch.cuda.max_memory_reserved(self._device)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the fields to this log entry, export them as gauges, print the progress line on rank 0."""
        if logs is None or self._start_time is None:
            return
        # Trainer.log appends a copy of `logs` to log_history before this event: update that copy as well.
        entry = state.log_history[-1] if state.log_history else {}
        is_this_entry = entry.get("step") == state.global_step and entry.keys() - {"step"} == logs.keys()
        logs.update(self._fields(state, logs))
        if is_this_entry:
            entry.update(logs)
        self._set_gauges({"step": state.global_step, **logs})
        if self.rank == 0:
            total = state.max_steps if state.max_steps > 0 else self.total_steps
            elapsed = time.perf_counter() - self._start_time
            say(progress_line(state.global_step, total, self._start_step, elapsed, logs))

    def on_save(self, args, state, control, **kwargs):
        """One line per checkpoint on rank 0 (Ray Train then persists it and keeps the best by validation loss)."""
        if self.rank == 0:
            total = state.max_steps if state.max_steps > 0 else self.total_steps
            say(f"step {state.global_step}/{total} | checkpoint saved")

    def _fields(self, state, logs: dict[str, Any]) -> dict[str, float]:
        """The figures for one log entry; an evaluation's entry gets none, and its time leaves the token rate."""
        if any(key.startswith("eval_") for key in logs):
            self._eval_seconds += float(logs.get("eval_runtime", 0.0))
            return {}
        now = time.perf_counter()
        fields = {"train_runtime_s": round(now - self._start_time, 2)}
        fields.update(self._throughput(now, _tokens_seen(state, logs)))
        if self._device is not None:
            fields.update(gpu_memory_fields(self._device, self._mem_before))
            fields.update(nvml_fields(self._device))
        fields["rss_gb"] = round(psutil.Process().memory_info().rss / GIB, 3)
        return fields

    def _throughput(self, now: float, tokens: int | None) -> dict[str, float]:
        """Token rates since the previous log (evaluations excluded) and MFU; empty when no tokens were counted."""
        start, start_tokens = self._window
        seconds = now - start - self._eval_seconds
        if tokens is None or tokens <= start_tokens or seconds <= 0:
            return {}
        self._window, self._eval_seconds = (now, tokens), 0.0
        self._run_tokens += tokens - start_tokens
        self._run_seconds += seconds
        total = (tokens - start_tokens) / seconds
        fields = {
            "tokens_per_s_total": round(total, 1),
            "tokens_per_s_worker": round(total / self.world_size, 1),
            "tokens_per_s_avg": round(self._run_tokens / self._run_seconds, 1),
        }
        if self.flops_per_token and self.peak_flops:
            fields["mfu"] = round(self.flops_per_token * total / self.world_size / self.peak_flops, 4)
        return fields

    def _set_gauges(self, values: dict[str, Any]) -> None:
        """Set `medray_<key>` for every known numeric key; only inside a Ray process (a worker or a driver)."""
        import ray

        if not ray.is_initialized():
            return
        if self._gauges is None:
            self._gauges = _make_gauges(self.tags)
        for key, gauge in self._gauges.items():
            value = values.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                gauge.set(float(value))


def _ignore_event(*args, **kwargs):
    """Stands in for the TrainerCallback events this callback does not use."""
    return None


def _make_gauges(tags: dict[str, str]) -> dict[str, Any]:
    """One `ray.util.metrics.Gauge` per entry of GAUGES, with this worker's tags as defaults."""
    from ray.util.metrics import Gauge

    gauges = {}
    for key, description in GAUGES.items():
        gauge = Gauge(f"medray_{key}", description=description, tag_keys=TAG_KEYS)
        gauge.set_default_tags(tags)
        gauges[key] = gauge
    return gauges


def _tokens_seen(state, logs: dict[str, Any]) -> int | None:
    """Non-padding tokens seen so far on all ranks, from HF's counter or TRL's `num_tokens`; None if neither."""
    if getattr(state, "num_input_tokens_seen", 0):
        return int(state.num_input_tokens_seen)
    if "num_tokens" in logs:
        return int(logs["num_tokens"])
    return None


def gpu_memory_fields(device: torch.device, reserved_before: int) -> dict[str, float]:
    """Total, base-model, peak and LoRA-training memory of a CUDA device, in GB and as % of its total.

    Args:
        device: The CUDA device the trainer runs on.
        reserved_before: `torch.cuda.max_memory_reserved` when training began, in bytes.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    peak = torch.cuda.max_memory_reserved(device)
    fields = {"gpu_total_gb": round(total / GIB, 3)}
    for name, value in (("mem_reserved_before", reserved_before), ("peak_reserved", peak)):
        fields[f"gpu_{name}_gb"] = round(value / GIB, 3)
        fields[f"gpu_{name}_pct"] = round(100 * value / total, 3)
    fields["gpu_lora_mem_gb"] = round((peak - reserved_before) / GIB, 3)
    fields["gpu_lora_mem_pct"] = round(100 * (peak - reserved_before) / total, 3)
    return fields


def nvml_fields(device: torch.device) -> dict[str, float]:
    """GPU utilisation (%) and power (W) from NVML; empty when nvidia-ml-py is missing or NVML fails."""
    try:
        return {
            "gpu_util_pct": float(torch.cuda.utilization(device)),
            "gpu_power_w": round(torch.cuda.power_draw(device) / 1000, 1),
        }
    except Exception as error:  # telemetry must never stop a training run
        logger.debug("NVML figures unavailable: %s", error)
        return {}


def progress_line(step: int, total: int | None, start_step: int, elapsed: float, logs: dict[str, Any]) -> str:
    """One line for the job log (`say` adds `[medray] `): `step 40/120 (33%) | loss 1.2340 | ... | ETA 0:01:30`.

    Args:
        step: The current optimizer step.
        total: Steps in the run, or None when unknown (no percentage, no ETA).
        start_step: The step training (re)started from, so a resumed run's ETA uses this session's pace.
        elapsed: Seconds since training (re)started.
        logs: The log entry, with the callback's fields added.
    """
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
    for key in ("loss", "eval_loss", "train_loss"):
        if key in logs:
            parts.append(f"{key} {logs[key]:.4f}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "tokens_per_s_total" in logs:
        parts.append(f"{logs['tokens_per_s_total']:,.0f} tok/s")
    if "gpu_peak_reserved_gb" in logs:
        parts.append(f"peak {logs['gpu_peak_reserved_gb']:.1f} GB")
    parts.append(f"elapsed {_clock(elapsed)}")
    if total and step > start_step and step < total:
        parts.append(f"ETA {_clock(elapsed / (step - start_step) * (total - step))}")
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    return str(datetime.timedelta(seconds=round(seconds)))


def count_params_for_mfu(model: torch.nn.Module) -> int:
    """All parameters of the model (base and LoRA), counting bitsandbytes 4-bit weights unpacked.

    A `Params4bit` tensor stores two 4-bit values per uint8 element, so its `numel()` is half the weight's size.
    """
    total = 0
    for parameter in model.parameters():
        packed = type(parameter).__name__ == "Params4bit"
        total += parameter.numel() * (2 if packed else 1)
    return total


def gpu_peak_flops(device: torch.device | int | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a known NVIDIA device (H200, H100, A100); None for others and on CPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None
