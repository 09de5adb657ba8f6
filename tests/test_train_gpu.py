"""GPU tier: the Unsloth 4-bit backend inside Ray Train, on 1 and 2 GPUs (skipped without CUDA).

Run on the GPU machine with `bash tests/gpu/run_tests.sh BUNDLE`. A tiny random-weight Mistral with the real v0.3
tokenizer trains for a few steps; the loss falls, every worker sits on its own GPU, and the adapter checkpoint
reloads onto the 4-bit base and predicts what the trained model predicted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import worker_runtime_env
from worker_probe import EXTENSION, rank_facts

from medray.config import load_config
from medray.driver import run_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def gpu_config(tmp_path: Path, model_dir: Path, workers: int):
    return load_config(
        "tiny-test",
        [
            f"model.name={model_dir}",
            "model.backend=unsloth",
            "model.load_in_4bit=true",
            "scaling.use_gpu=true",
            f"scaling.num_workers={workers}",
            "train.max_steps=12",
            "train.eval_steps=6",
            "train.learning_rate=2e-3",
            "train.optim=adamw_8bit",
            "lora.r=16",
            f"run.storage_path={tmp_path}",
            f"run.name=unsloth-{workers}gpu",
        ],
    )


@pytest.fixture(scope="module")
def ray_gpus():
    import ray

    ray.init(address="local", include_dashboard=False, runtime_env=worker_runtime_env())
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_unsloth_backend_trains_under_ray_train(ray_gpus, tiny_mistral_dir, tmp_path, workers):
    if torch.cuda.device_count() < workers:
        pytest.skip(f"needs {workers} GPUs")
    outcome = run_training(gpu_config(tmp_path, tiny_mistral_dir, workers), extensions=[EXTENSION])
    summary = outcome.summary
    assert summary.backend == "unsloth"
    assert summary.steps == 12 and summary.world_size == workers
    facts = rank_facts(outcome)[0]
    assert facts["trainer_world_size"] == workers
    if workers > 1:
        assert facts["wrapped_model"] == "DistributedDataParallel"
    losses = [entry["loss"] for entry in outcome.result.return_value.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    final = summary.metrics["final"]
    assert final["gpu_peak_reserved_gb"] > 0 and 0 < final["gpu_peak_reserved_pct"] < 100
    _assert_adapter_reproduces_probe(Path(summary.best_checkpoint), tiny_mistral_dir, facts["probe"])


def _assert_adapter_reproduces_probe(checkpoint: Path, base_dir: Path, probe: dict) -> None:
    """Reload base (4-bit) + adapter with plain transformers + peft; the top next-token ids must match."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, device_map={"": 0})
    model = PeftModel.from_pretrained(base, checkpoint).eval()
    with torch.no_grad():
        logits = model(torch.tensor([probe["input_ids"]], device="cuda:0")).logits[0, -1].float()
    top = torch.topk(logits, 5).indices.tolist()
    assert top[0] == probe["top_ids"][0]
    assert len(set(top) & set(probe["top_ids"][:5])) >= 4
