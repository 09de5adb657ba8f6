"""Loading a finished run for inference (tiny random Mistral + a non-zero adapter): finding the adapter and base,
errors for bad folders before anything loads, the training template as prompt, left-padded batched generation, EOS
bookkeeping and the `</think>` split."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from medray.inference import (
    GenerationSettings,
    InferenceError,
    build_prompt,
    generate_batch,
    load_for_inference,
    resolve_run,
    split_reasoning,
)
from medray.prompts import format_sample

QUESTIONS = ["What causes chest pain?", "A 60-year-old woman has jaundice, fever and pain in the right upper quadrant."]


@pytest.fixture(scope="module")
def loaded(tiny_run_dir):
    run = resolve_run(tiny_run_dir)
    model, tokenizer = load_for_inference(run, device="cpu")
    return run, model, tokenizer


def test_resolve_run_finds_best_checkpoint_and_base(tiny_run_dir, tiny_mistral_dir):
    run = resolve_run(tiny_run_dir)
    summary = json.loads((tiny_run_dir / "summary.json").read_text())
    assert str(run.adapter_dir) == summary["best_checkpoint"]
    assert run.base_model == str(tiny_mistral_dir) and run.run_dir == tiny_run_dir
    assert run.config.data.max_length == 256  # the run's own config (tiny-test preset), not the defaults
    from_adapter = resolve_run(run.adapter_dir)  # an adapter folder inside a run uses the run's config
    assert from_adapter.run_dir == tiny_run_dir and from_adapter.config == run.config


def test_a_moved_run_folder_still_finds_its_adapter(tiny_run_dir, tmp_path):
    moved = tmp_path / "copied-run"
    shutil.copytree(tiny_run_dir, moved)
    run = resolve_run(moved)
    assert run.adapter_dir == moved / "checkpoint_000001" / "checkpoint"


def test_bare_adapter_takes_its_base_from_adapter_config(tiny_run_dir, tiny_mistral_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run_dir / "checkpoint_000001" / "checkpoint", adapter)
    run = resolve_run(adapter)
    assert run.run_dir is None and run.base_model == str(tiny_mistral_dir)
    assert "{question}" in run.config.data.template  # the default template


def test_run_without_adapter_is_one_clear_error(tiny_run_dir, tmp_path):
    run_dir = tmp_path / "no-adapter"
    run_dir.mkdir()
    shutil.copy(tiny_run_dir / "summary.json", run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["best_checkpoint"] = str(tmp_path / "elsewhere" / "checkpoint_000009" / "checkpoint")
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InferenceError, match=f"{run_dir} holds no adapter"):
        resolve_run(run_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InferenceError, match="empty holds neither summary.json nor adapter_config.json"):
        resolve_run(tmp_path / "empty")
    with pytest.raises(InferenceError, match="elsewhere is not a folder"):
        resolve_run(tmp_path / "elsewhere")


def test_adapter_whose_base_model_is_missing_is_one_clear_error(tiny_run_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run_dir / "checkpoint_000001" / "checkpoint", adapter)
    values = json.loads((adapter / "adapter_config.json").read_text())
    values["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (adapter / "adapter_config.json").write_text(json.dumps(values))
    with pytest.raises(InferenceError, match=f"the base model {tmp_path / 'deleted-base'} is missing"):
        resolve_run(adapter)


def test_uncached_hub_base_while_offline_is_one_clear_error(monkeypatch, tiny_run_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run_dir / "checkpoint_000001" / "checkpoint", adapter)
    values = json.loads((adapter / "adapter_config.json").read_text())
    values["base_model_name_or_path"] = "nobody-here/no-such-model-7b"
    (adapter / "adapter_config.json").write_text(json.dumps(values))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InferenceError, match="not in the local Hugging Face cache"):
        resolve_run(adapter)


def test_prompt_is_the_training_text_up_to_the_reasoning(tiny_run_dir):
    cfg = resolve_run(tiny_run_dir).config
    prompt = build_prompt(cfg, QUESTIONS[0])
    sample = format_sample(QUESTIONS[0], "Think it through.", "Angina.", cfg.data.template, "</s>")
    assert sample.startswith(prompt) and prompt.endswith("<think>\n")
    assert sample[len(prompt) :] == "Think it through.\n</think>\nAngina.</s>"


@pytest.mark.parametrize(
    ("text", "reasoning", "answer"),
    [
        ("ST elevation.\n</think>\nInferior STEMI.", "ST elevation.", "Inferior STEMI."),
        ("<think>\nstep 1\n</think>\n\nB", "step 1", "B"),
        ("still thinking when it ran out", "still thinking when it ran out", ""),
        ("a</think>b</think>c", "a", "b</think>c"),
    ],
)
def test_split_reasoning(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)


def test_adapter_changes_outputs_and_disable_adapter_gives_the_base(loaded, tiny_mistral_dir):
    from transformers import AutoModelForCausalLM

    _, model, tokenizer = loaded
    ids = tokenizer([QUESTIONS[0]], return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir).eval()
    with torch.no_grad():
        tuned_logits = model(ids).logits
        with model.disable_adapter():
            disabled_logits = model(ids).logits
        base_logits = base(ids).logits
    assert torch.allclose(disabled_logits, base_logits, atol=1e-5)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)


def test_batched_left_padded_generation_matches_one_at_a_time(loaded):
    run, model, tokenizer = loaded
    prompts = [build_prompt(run.config, question) for question in QUESTIONS]
    settings = GenerationSettings(max_new_tokens=8)
    together = generate_batch(model, tokenizer, prompts, settings)
    alone = generate_batch(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8, batch_size=1))
    assert [item.text for item in together] == [item.text for item in alone]
    assert all(item.new_tokens == 8 and not item.stopped_at_eos for item in together)
    assert [item.prompt for item in together] == prompts
    as_ids = generate_batch(model, tokenizer, [tokenizer(prompt)["input_ids"] for prompt in prompts], settings)
    assert [item.text for item in as_ids] == [item.text for item in together]  # pre-tokenized prompts, same answers


def test_eos_ends_a_completion_and_is_counted(loaded):
    run, model, tokenizer = loaded
    prompts = [build_prompt(run.config, question) for question in QUESTIONS]
    free = generate_batch(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8))
    first_ids = [greedy_ids(model, tokenizer, prompt, 8) for prompt in prompts]
    # Make the 4th token the first prompt generates the EOS: that prompt must stop there, the other run on.
    stop_id = next(i for i in first_ids[0][3:] if i not in first_ids[1] and i not in first_ids[0][:3])
    position = first_ids[0].index(stop_id)
    original = tokenizer.eos_token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop_id)
    try:
        stopped, running = generate_batch(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8))
    finally:
        tokenizer.eos_token = original
    assert stopped.stopped_at_eos and stopped.new_tokens == position + 1
    assert stopped.text == tokenizer.decode(first_ids[0][:position], skip_special_tokens=True)
    assert not running.stopped_at_eos and running.new_tokens == 8 and running.text == free[1].text


def test_bad_generation_settings_are_named():
    with pytest.raises(InferenceError, match=r"max_new_tokens must be at least 1 \(got 0\); top_p must be in"):
        GenerationSettings(max_new_tokens=0, top_p=1.5)


def greedy_ids(model, tokenizer, prompt: str, count: int) -> list[int]:
    ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=count, do_sample=False, eos_token_id=None)
    return out[0, ids.shape[1] :].tolist()
