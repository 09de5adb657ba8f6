"""GPU tier: padding-free micro-batches under Unsloth in bf16 (skipped without CUDA).

The tiny random Mistral loaded through medray's Unsloth path (4-bit base, bf16 compute, LoRA): a padding-free
micro-batch from medray's collator has the padded batch's loss, no row sees another row's tokens, and the worker's
own trainer keeps Unsloth's padding-free mode (Unsloth never prints that it turned it off) and trains on it.
Run with `bash tests/gpu/run_tests.sh BUNDLE`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medray.batching import IGNORE_INDEX, RowCollator
from medray.config import load_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def unsloth_config(model_dir, tmp_path, *overrides: str):
    return load_config(
        "tiny-test",
        [
            f"model.name={model_dir}",
            "model.backend=unsloth",
            "model.load_in_4bit=true",
            "model.dtype=bfloat16",
            "lora.r=16",
            "lora.dropout=0.0",
            "train.precision=bf16",
            "train.optim=adamw_8bit",
            "scaling.use_gpu=true",
            f"run.storage_path={tmp_path}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def unsloth_model(tiny_mistral_dir, tmp_path_factory):
    from medray.model import load_model

    cfg = unsloth_config(tiny_mistral_dir, tmp_path_factory.mktemp("runs"), "train.padding=padding_free")
    model, tokenizer = load_model(cfg, "unsloth", torch.device("cuda", 0))
    return cfg, model, tokenizer


def rows_of(tokenizer) -> list[np.ndarray]:
    texts = ["Chest pain radiating to the left arm.", "Fever, cough and night sweats for three weeks " * 6, "Rash."]
    return [np.asarray(tokenizer(text)["input_ids"]) for text in texts]


def on_gpu(batch: dict) -> dict:
    return {key: value.to("cuda:0") for key, value in batch.items()}


def run(model, batch: dict):
    """A training-mode forward (the trainer's path: Unsloth's packed attention, no KV cache), without gradients."""
    model.train()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return model(**on_gpu(batch), use_cache=False)


def test_padding_free_loss_equals_padded_loss_under_unsloth(unsloth_model):
    _, model, tokenizer = unsloth_model
    rows = {"input_ids": rows_of(tokenizer)}
    rows["labels"] = [np.where(np.arange(len(ids)) < 3, IGNORE_INDEX, ids) for ids in rows["input_ids"]]
    padded = run(model, RowCollator("padded", tokenizer.pad_token_id)(rows)).loss.float().item()
    free = run(model, RowCollator("padding_free", tokenizer.pad_token_id, packed_seq_lengths=True)(rows))
    assert free.loss.float().item() == pytest.approx(padded, rel=1e-2)  # bf16 activations, other kernels


def test_no_row_attends_across_a_boundary_under_unsloth(unsloth_model, monkeypatch):
    # Unsloth returns empty logits during training-mode forwards unless asked (it fuses the loss instead).
    monkeypatch.setenv("UNSLOTH_RETURN_LOGITS", "1")
    _, model, tokenizer = unsloth_model
    first, second, third = rows_of(tokenizer)
    collate = RowCollator("padding_free", tokenizer.pad_token_id, packed_seq_lengths=True)
    logits = run(model, collate({"input_ids": [first, second, third]})).logits[0].float()
    changed = second.copy()
    changed[1:] = (changed[1:] + 1000) % 32000
    perturbed = run(model, collate({"input_ids": [first, changed, third]})).logits[0].float()
    n1, n2 = len(first), len(second)
    control = (perturbed[n1 + 1 : n1 + n2] - logits[n1 + 1 : n1 + n2]).abs().max().item()
    assert control > 0
    assert (perturbed[:n1] - logits[:n1]).abs().max().item() <= 0.02 * control  # row 1 untouched
    assert (perturbed[n1 + n2 :] - logits[n1 + n2 :]).abs().max().item() <= 0.02 * control  # row 3 untouched
    alone = run(model, {"input_ids": torch.from_numpy(third)[None]}).logits[0].float()
    assert (logits[n1 + n2 :] - alone).abs().max().item() <= 0.05 * control  # row 3 as if it ran alone


def test_the_workers_trainer_stays_padding_free_and_trains(unsloth_model, tmp_path, capfd):
    import ray.data

    from medray.contracts import WorkerPlan
    from medray.worker import _build_trainer

    cfg, model, tokenizer = unsloth_model
    rows = [{"input_ids": ids.tolist(), "length": len(ids)} for ids in rows_of(tokenizer) * 8]
    shard = ray.data.from_items(rows).iterator()
    plan = WorkerPlan(run_id="padding-free-gpu", max_steps=3, has_validation=False)
    trainer = _build_trainer(cfg, plan, 0, model, tokenizer, "unsloth", shard, None)
    printed = capfd.readouterr().out
    assert "Turning padding-free batching off" not in printed
    assert trainer.args.padding_free is True and trainer.batch_layout == "padding_free"
    first = next(iter(trainer.get_train_dataloader()))
    assert first["input_ids"].shape[0] == 1 and first["packed_seq_lengths"].numel() == cfg.train.per_device_batch_size
    from ray.train.huggingface.transformers import RayTrainReportCallback

    trainer.remove_callback(RayTrainReportCallback)  # it reports to Ray Train, which this test runs without
    output = trainer.train()
    assert trainer.state.global_step == 3 and np.isfinite(output.training_loss)


def test_auto_pads_and_groups_by_length_without_a_varlen_kernel(unsloth_model, tiny_mistral_dir, tmp_path):
    """`train.padding=auto` on Unsloth: padding-free only with flash-attn or xformers installed; padded (and grouped by
    length) on an image with neither, where Unsloth would attend packed rows through a dense mask."""
    import ray.data

    from medray.batching import varlen_attention_installed
    from medray.contracts import WorkerPlan
    from medray.worker import _build_trainer

    _, model, tokenizer = unsloth_model
    cfg = unsloth_config(tiny_mistral_dir, tmp_path)
    shard = ray.data.from_items(
        [{"input_ids": ids.tolist(), "length": len(ids)} for ids in rows_of(tokenizer)]
    ).iterator()
    plan = WorkerPlan(run_id="auto-layout-gpu", max_steps=1, has_validation=False)
    trainer = _build_trainer(cfg, plan, 0, model, tokenizer, "unsloth", shard, None)
    expected = "padding_free" if varlen_attention_installed() else "padded, length-grouped"
    assert trainer.batch_layout == expected
    assert trainer.args.padding_free is (expected == "padding_free")
