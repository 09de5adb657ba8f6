"""`medray export RUN_DIR --merged OUT_DIR` on the tiny run: the merged model loads with plain transformers and gives
base + adapter's logits, its tokenizer's chat template prompts as the run trained, its generation config names the
EOS, and the model card tells what was trained."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import medray.export
from medray.cli import main
from medray.inference import build_prompt, resolve_run

PROMPT = "A 58-year-old man has crushing chest pain and ST elevation in II, III and aVF."
FLOAT32_TOLERANCE = 1e-5  # merging is exact up to float32 rounding
BFLOAT16_TOLERANCE = 3e-2  # bf16 weights (8-bit mantissa) against the float32 reference


@pytest.fixture(scope="module")
def reference_logits(tiny_run_dir, tiny_mistral_dir):
    """Base + adapter, unmerged, in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_mistral_dir)([PROMPT], return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir)
    model = PeftModel.from_pretrained(base, resolve_run(tiny_run_dir).adapter_dir).eval()
    with torch.no_grad():
        return ids, model(ids).logits


@pytest.fixture(scope="module")
def merged_bf16(tiny_run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    assert main(["export", str(tiny_run_dir), "--merged", str(out)]) == 0
    return out


def _logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain transformers, no peft
    with torch.no_grad():
        return model, model(ids).logits.float()


def test_float32_merge_gives_base_plus_adapter_logits(tiny_run_dir, reference_logits, tmp_path):
    ids, reference = reference_logits
    out = tmp_path / "merged32"
    assert main(["export", str(tiny_run_dir), "--merged", str(out), "--dtype", "float32"]) == 0
    model, logits = _logits(out, ids)
    assert not any(".lora_" in name for name, _ in model.named_parameters())
    assert torch.allclose(logits, reference, atol=FLOAT32_TOLERANCE)


def test_default_export_is_bf16_safetensors_within_bf16_rounding(merged_bf16, reference_logits, tiny_mistral_dir):
    from transformers import AutoModelForCausalLM

    ids, reference = reference_logits
    assert sorted(path.name for path in merged_bf16.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(merged_bf16.glob("*.bin")) and not list(merged_bf16.glob("adapter_*"))
    model, logits = _logits(merged_bf16, ids)
    assert model.dtype == torch.bfloat16
    assert (logits - reference).abs().max() < BFLOAT16_TOLERANCE
    base = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir).eval()
    with torch.no_grad():
        base_gap = (base(ids).logits - reference).abs().max()
    assert base_gap > 5 * BFLOAT16_TOLERANCE  # so the comparison above would catch a missing merge


def test_tokenizer_chat_template_and_eos(merged_bf16, tiny_run_dir):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(merged_bf16)
    cfg = resolve_run(tiny_run_dir).config
    prompt = build_prompt(cfg, PROMPT)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False)
    assert chat.startswith(tokenizer.bos_token) and chat.endswith(prompt)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True, return_dict=False)
    assert list(ids) == tokenizer(prompt)["input_ids"]  # the same tokens the run trained on
    generation = GenerationConfig.from_pretrained(merged_bf16)
    assert generation.eos_token_id == tokenizer.eos_token_id == 2


def test_model_card_names_base_recipe_steps_and_gguf(merged_bf16, tiny_mistral_dir):
    card = (merged_bf16 / "README.md").read_text()
    assert f"`{tiny_mistral_dir}`" in card and "LoRA r=8, alpha=16" in card
    assert "| optimizer steps | 6 |" in card and "GGUF: not written" in card
    assert "No evaluation recorded" in card


def test_model_card_shows_the_runs_evaluation(tiny_run_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["evaluation"] = {
        "eos_stop": {"base": {"stopped": 1, "total": 8}, "tuned": {"stopped": 7, "total": 8}, "max_new_tokens": 64}
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    card = medray.export.model_card(resolve_run(run_dir), tmp_path / "out")
    assert "| base | 1 / 8 | 12 % |" in card and "| tuned | 7 / 8 | 88 % |" in card


def test_export_into_a_folder_that_is_not_empty_fails_before_loading(tiny_run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(medray.export, "load_for_inference", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["export", str(tiny_run_dir), "--merged", str(tmp_path / "taken")]) == 2
    assert main(["export", str(tiny_run_dir), "--merged", str(tmp_path / "new"), "--dtype", "int8"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        f"medray: error: {tmp_path / 'taken'} exists and is not empty; pass a new folder to --merged",
        "medray: error: --dtype int8: choose one of bfloat16, float16, float32",
    ]
