"""GPU tier of medray.metrics and medray.report: on CUDA every training log carries the memory, NVML and MFU fields,
with the reference notebook's arithmetic, and the report fills its GPU rows. Skipped without CUDA.

`MEDRAY_KEEP_REPORT=DIR` copies the run's report.md, loss.png and history.json to DIR (for the benchmark record).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import pad_rows

from medray.config import MedrayConfig
from medray.metrics import GIB, TrainingMetricsCallback, count_params_for_mfu, gpu_peak_flops
from medray.report import write_report

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 30
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model():
    """A random ~0.7B-parameter Mistral in bf16 with LoRA r=16 on all seven projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=32768,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))


def rows(count: int, seed: int) -> list[dict]:
    """Random token rows of 384 to 512 tokens, so batches are padded."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(384, 513, (count,), generator=generator)
    return [{"input_ids": torch.randint(3, 32768, (int(n),), generator=generator).tolist()} for n in lengths]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    from transformers import Trainer, TrainingArguments

    folder = tmp_path_factory.mktemp("gpu_run")
    model = lora_model()
    callback = TrainingMetricsCallback(
        "gpu-metrics", rank=0, world_size=1, n_params_for_mfu=count_params_for_mfu(model), peak_flops=gpu_peak_flops()
    )
    args = TrainingArguments(
        output_dir=str(folder / "out"),
        max_steps=STEPS,
        logging_steps=5,
        eval_strategy="steps",
        eval_steps=10,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=2e-4,
        bf16=True,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows(STEPS * 8, seed=0),
        eval_dataset=rows(16, seed=1),
        data_collator=pad_rows,
        callbacks=[callback],
    )
    output = trainer.train()
    history = trainer.state.log_history
    run_dir = folder / "run"
    run_dir.mkdir()
    summary = {"config": MedrayConfig().to_dict(), "steps": STEPS, "world_size": 1, "wall_time_s": None}
    summary["train_runtime_s"] = output.metrics["train_runtime"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    report = write_report(run_dir)
    if os.environ.get("MEDRAY_KEEP_REPORT"):
        for name in ("report.md", "loss.png", "history.json"):
            shutil.copy(run_dir / name, os.environ["MEDRAY_KEEP_REPORT"])
    return {"history": history, "report": report.read_text()}


def test_gpu_fields_follow_the_reference_arithmetic(gpu_run):
    entries = [entry for entry in gpu_run["history"] if "loss" in entry]
    total_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    assert len(entries) == STEPS // 5
    for entry in entries:
        assert entry["gpu_total_gb"] == pytest.approx(total_gb, abs=1e-3)
        assert entry["gpu_mem_reserved_before_gb"] > 1.0  # the bf16 base model
        assert entry["gpu_peak_reserved_gb"] > entry["gpu_mem_reserved_before_gb"]
        lora = entry["gpu_peak_reserved_gb"] - entry["gpu_mem_reserved_before_gb"]
        assert entry["gpu_lora_mem_gb"] == pytest.approx(lora, abs=2e-3)
        for field in ("gpu_peak_reserved", "gpu_lora_mem", "gpu_mem_reserved_before"):
            assert entry[f"{field}_pct"] == pytest.approx(100 * entry[f"{field}_gb"] / total_gb, abs=0.01)
        assert 0 <= entry["gpu_util_pct"] <= 100 and entry["gpu_power_w"] > 50
        assert entry["tokens_per_s_total"] > 0 and 0 < entry["mfu"] < 1
    peaks = [entry["gpu_peak_reserved_gb"] for entry in entries]
    assert peaks == sorted(peaks)


def test_report_fills_the_gpu_rows(gpu_run):
    last = [entry for entry in gpu_run["history"] if "gpu_peak_reserved_gb" in entry][-1]
    report = gpu_run["report"]
    assert f"| peak reserved GPU memory | {last['gpu_peak_reserved_gb']:.3f} GB (" in report
    assert f"| memory for LoRA training (peak - base model) | {last['gpu_lora_mem_gb']:.3f} GB (" in report
    assert "n/a (CPU run)" not in report
