"""End to end on CPU: a 2-worker Ray Train run on a tiny random Mistral with the real Mistral v0.3 tokenizer.

Asserts behaviour: the step count is exact (no double sharding), eval_loss is reported, the best checkpoint loads as
a PEFT adapter and gives the trained model's logits, LoRA weights changed while base weights did not, and the summary
/ report files exist. Resuming (after a worker, a driver or a whole run failed) is tested in test_reliability.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from worker_probe import EXTENSION, rank_facts

from medray.config import load_config
from medray.driver import planned_steps, run_training

pytestmark = pytest.mark.slow


def tiny_config(tmp_path: Path, model_dir: Path, *overrides: str):
    return load_config(
        "tiny-test",
        [f"model.name={model_dir}", f"run.storage_path={tmp_path}", *overrides],
    )


@pytest.fixture(scope="module")
def two_worker_run(ray_local, tiny_mistral_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runs")
    # One epoch (train.max_steps=-1): the step count is derived from the data, so double sharding would show.
    cfg = tiny_config(
        tmp_path,
        tiny_mistral_dir,
        "train.max_steps=-1",
        "train.num_epochs=1",
        "scaling.num_workers=2",
        "train.eval_steps=2",
        "train.padding=padding_free",  # test_reliability.py's runs keep the default (padded on hf sdpa)
        "run.name=two-workers",
    )
    outcome = run_training(cfg, extensions=[EXTENSION])
    return cfg, outcome


def test_step_count_is_exact_for_two_workers(two_worker_run):
    cfg, outcome = two_worker_run
    summary = outcome.summary
    rows = summary.data["rows_train"]
    expected = (rows // 2) // cfg.train.per_device_batch_size // cfg.train.gradient_accumulation_steps
    assert planned_steps(cfg, rows) == expected >= 3
    assert summary.steps == expected
    assert summary.world_size == 2
    facts = rank_facts(outcome)
    # One model trained by both workers (DDP), not two models trained side by side.
    assert facts[0]["trainer_world_size"] == 2
    assert facts[0]["wrapped_model"] == "DistributedDataParallel"
    assert outcome.result.return_value.batch_layout == summary.batch_layout == "padding_free"
    # Each worker read its own half exactly once: a second sharding would have made it loop over its data.
    assert [rank["train_data_passes"] for rank in facts] == [1, 1]


def test_eval_loss_reported_and_history_written(two_worker_run):
    _, outcome = two_worker_run
    history = json.loads((Path(outcome.run_dir) / "history.json").read_text())
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    assert eval_losses and train_losses
    assert outcome.summary.metrics["best"]["eval_loss"] == pytest.approx(min(eval_losses))
    assert Path(outcome.summary_path).name == "summary.json"
    assert (Path(outcome.run_dir) / "report.md").is_file() and (Path(outcome.run_dir) / "loss.png").is_file()


def test_best_checkpoint_is_a_peft_adapter_with_the_trained_logits(two_worker_run, tiny_mistral_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, outcome = two_worker_run
    checkpoint = Path(outcome.summary.best_checkpoint)
    assert (checkpoint / "adapter_config.json").is_file()
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)  # only LoRA weights: the base is untouched
    assert any(tensor.abs().sum() > 0 for key, tensor in adapter.items() if "lora_B" in key)  # B starts at zero

    base = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir)
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, checkpoint).eval()
    probe = rank_facts(outcome)[0]["probe"]
    with torch.no_grad():
        logits = model(torch.tensor([probe["input_ids"]])).logits[0, -1]
    values, indices = torch.topk(logits, len(probe["top_ids"]))
    assert indices.tolist() == probe["top_ids"]
    assert torch.allclose(values, torch.tensor(probe["top_logits"]), atol=1e-4)
    merged = model.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base_before[k])]
    assert changed and all(".layers." in k for k in changed)  # the merge moved only adapted layers
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in base_before.items())  # the base files never changed
