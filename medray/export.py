"""`medray export RUN_DIR --merged OUT_DIR`: the base model with the run's adapter merged into it, for serving.

OUT_DIR holds 16-bit safetensors (bf16 by default), the tokenizer, a chat template that formats a user message with
the run's own training template (so `apply_chat_template` and chat endpoints prompt the model as it was trained),
`generation_config.json` with the EOS the model learned to stop on, and a model card (`README.md`). Plain
`transformers` loads it (`AutoModelForCausalLM.from_pretrained(OUT_DIR)`), and so do vLLM and TGI.

- CPU or a transformers + peft run: the base is loaded as the run trained on it; a 4-bit (bitsandbytes) base is
  dequantized first; then peft's `merge_and_unload` folds the adapter into the weights, in float32 on CPU.
- CUDA and an unsloth run: Unsloth's `save_pretrained_merged(..., save_method="merged_16bit")`. It folds the
  adapter into the base's original 16-bit weights, not into the dequantized 4-bit ones (unsloth_zoo's
  `saving_utils._merge_lora`; Falcon-H1 is its one exception): it reads the base's 16-bit shards from the model folder,
  or, for a pre-quantized base such as `unsloth/mistral-7b-instruct-v0.3-bnb-4bit`, downloads the original 16-bit
  model from the hub (online only). So on CUDA the merged model equals the 16-bit base + adapter, and differs from
  the 4-bit base + adapter that trained by the quantization error. Run on one H200 (2026-12-03, random 7B-shape
  weights saved in bf16, LoRA B random; `tests/gpu/export_check.py`): 13.5 GB in 3 shards in 49 s; its logits are
  within 0.48 (mean 0.073, logit scale 6.5) of the bf16 base + adapter's, next-token agreement 85.7 % (bf16 rounding
  of the merged weights over 32 random layers), and far from the 4-bit base + adapter's (6.26; agreement 4.8 %).
  Off CUDA, or to merge into the dequantized 4-bit weights, pass `device="cpu"` (peft path).

GGUF: no package installs a Hugging Face -> GGUF converter (the `gguf` package, llama.cpp's gguf-py, reads and writes
GGUF files but does not convert checkpoints), so medray writes none. llama.cpp's own `convert_hf_to_gguf.py`
converts OUT_DIR offline (see `GGUF_NOTE`).

    out = export_merged(resolve_run("~/medray_results/medray-demo"), "~/medray-demo-merged")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from medray.contracts import RunSummary
from medray.inference import (
    InferenceError,
    RunArtifacts,
    inference_backend,
    inference_device,
    load_for_inference,
    read_run_summary,
)
from medray.prompts import format_prompt

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GGUF_NOTE = (
    "GGUF: not written. No package on PyPI installs a Hugging Face -> GGUF converter: the `gguf` package (llama.cpp's "
    "gguf-py) reads and writes GGUF files but does not convert checkpoints. llama.cpp's own `convert_hf_to_gguf.py` "
    "(in a llama.cpp checkout, or in llama-cpp-python's source distribution under `vendor/llama.cpp/`, which does "
    "not install it) converts this folder offline: `PYTHONPATH=gguf-py python convert_hf_to_gguf.py OUT_DIR "
    "--outtype f16`. Checked with llama-cpp-python 0.3.36's copy on a merged tiny Mistral: transformers' GGUF "
    "loader gave the merged model's logits (max difference 2.4e-7)."
)


def export_merged(
    run: RunArtifacts, out_dir: str | Path, *, dtype: str = "bfloat16", device: str | None = None
) -> Path:
    """Merge the run's adapter into its base model and save a standalone model folder.

    Args:
        run: From `medray.inference.resolve_run`.
        out_dir: A new or empty folder.
        dtype: `bfloat16` (default), `float16`, or `float32` for the saved weights.
        device: Where to merge; default CUDA when present, else CPU.

    Returns:
        `out_dir`, holding the model, tokenizer, chat template, generation config and README.md.

    Raises:
        InferenceError: If `out_dir` is a file or a folder that is not empty, or `dtype` is unknown (before loading).
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir())):
        raise InferenceError(f"{out_dir} exists and is not empty; pass a new folder to --merged")
    if dtype not in DTYPES:
        raise InferenceError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    device = inference_device(device)
    unsloth = inference_backend(run.config, device) == "unsloth"
    model, tokenizer = load_for_inference(run, with_adapter=unsloth, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.padding_side = "right"  # what a server expects by default; medray's own generation sets left
    if run.config.data.format == "template":  # a chat run trained on the tokenizer's own chat template: keep it
        tokenizer.chat_template = matching_chat_template(tokenizer, run.config.data.template)
    if unsloth:  # Unsloth dequantizes the 4-bit base and merges in 16-bit itself
        model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
        _set_generation_config(out_dir, tokenizer)
    else:
        merged = merge_adapter(model, run.adapter_dir, DTYPES[dtype])
        _set_eos(merged.generation_config, tokenizer)
        merged.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    (out_dir / "README.md").write_text(model_card(run, out_dir))
    return out_dir


def merge_adapter(base, adapter_dir: Path, dtype: torch.dtype):
    """A plain transformers model: `base` with the LoRA deltas of `adapter_dir` added to its weights, in `dtype`.

    A 4-bit (or 8-bit) base is dequantized before the adapter is attached: merging into quantized weights would
    round the deltas away again.
    """
    from peft import PeftModel

    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        base = base.dequantize()
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.to(dtype)


def _set_eos(generation_config, tokenizer) -> None:
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        generation_config.bos_token_id = tokenizer.bos_token_id


def _set_generation_config(out_dir: Path, tokenizer) -> None:
    """Make the saved `generation_config.json` name the tokenizer's EOS (Unsloth saves the base model's)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(out_dir))
    except OSError:
        config = GenerationConfig()
    _set_eos(config, tokenizer)
    config.save_pretrained(str(out_dir))


def matching_chat_template(tokenizer, template: str) -> str:
    """The chat template whose tokens are exactly the tokens of the training prompt.

    `apply_chat_template` tokenizes without adding special tokens, so BOS must come from the template; and a
    sentencepiece tokenizer that puts a space in front of the text does not do so after an in-text BOS, so that
    space may have to be written out. Both forms are tried on a sample question; the first that matches is kept.
    """
    question = "What causes chest pain?"
    expected = tokenizer(format_prompt(question, template))["input_ids"]
    bos = tokenizer.bos_token_id is not None and expected[:1] == [tokenizer.bos_token_id]
    candidates = [chat_template(template, bos, lead) for lead in ("", " ")] if bos else [chat_template(template, False)]
    for candidate in candidates:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], chat_template=candidate, tokenize=True, return_dict=False
        )
        if list(ids) == expected:
            return candidate
    logger.warning("the chat template does not reproduce the training prompt's tokens exactly; check OUT_DIR")
    return candidates[0]


def chat_template(template: str, bos: bool, lead: str = "") -> str:
    """A Jinja chat template that prompts the model as it was trained: each user message becomes the training
    template filled up to the reasoning (`format_prompt`), each assistant message its completion plus EOS.

    `add_generation_prompt` changes nothing: every user turn already ends where the model's answer starts. `bos`
    starts the text with the BOS token, followed by `lead` (see `matching_chat_template`).
    """
    marker = "\x00QUESTION\x00"
    before, after = format_prompt(marker, template).split(marker)
    raw = lambda text: "{% raw %}" + text + "{% endraw %}"  # noqa: E731  (the template text is literal)
    return (
        ("{{ bos_token }}" + lead if bos else "")
        + "{% for message in messages %}"
        + "{% if message['role'] == 'user' %}"
        + raw(before)
        + "{{ message['content'] }}"
        + raw(after)
        + "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}"
        + "{% endfor %}"
    )


# --- the model card ------------------------------------------------------------------------------------------------


def model_card(run: RunArtifacts, out_dir: Path) -> str:
    """README.md of the merged model: base, data, recipe, steps, losses, evaluation, usage."""
    from medray.report import markdown_table

    cfg = run.config
    summary = read_run_summary(run.run_dir) if run.run_dir else RunSummary()
    data = summary.data or {}
    final, best = summary.metrics.get("final") or {}, summary.metrics.get("best") or {}
    source = ", ".join(args.label for args in cfg.data.resolved_sources())
    batch = cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps * cfg.scaling.num_workers
    facts = [
        ["base model", f"`{cfg.model.name}`"],
        ["adapter", f"`{run.adapter_dir}`"],
        [
            "data",
            f"`{source}`: {data.get('rows_train', '?')} training rows, {data.get('rows_validation', '?')} held out",
        ],
        [
            "recipe",
            f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout} on "
            f"{', '.join(cfg.lora.target_modules)}; lr {cfg.train.learning_rate} ({cfg.train.lr_scheduler}), "
            f"{cfg.train.optim}, effective batch {batch}, max length {cfg.data.max_length}, "
            f"model.load_in_4bit={cfg.model.load_in_4bit}, backend {summary.backend or cfg.model.backend}",
        ],
        ["optimizer steps", str(summary.steps if summary.steps is not None else "?")],
        ["final training loss", _number(final.get("loss"))],
        ["final validation loss", _number(final.get("eval_loss"))],
        [
            "best validation loss",
            f"{_number(best.get('eval_loss'))} (step {summary.best_step if summary.best_step is not None else '?'})",
        ],
    ]
    sections = [
        f"# {out_dir.name}",
        f"`{cfg.model.name}` fine-tuned with medray (LoRA SFT for medical reasoning) and merged into one model.",
        markdown_table(["", ""], facts),
        "## Evaluation",
        evaluation_section(summary.evaluation or {}),
        "## Prompt format",
        prompt_format(cfg),
        "## Use",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'model = AutoModelForCausalLM.from_pretrained("{out_dir}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{out_dir}")\n'
        'ids = tokenizer.apply_chat_template([{"role": "user", "content": "A question"}], return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=512)[0]))\n```",
        f"Serving: `vllm serve {out_dir}`.",
        "## GGUF",
        GGUF_NOTE,
    ]
    return "\n\n".join(sections) + "\n"


def prompt_format(cfg) -> str:
    """How the model was prompted in training, and so how to prompt it."""
    if cfg.data.format == "chat":
        return "The model was trained on its tokenizer's own chat template (saved with it): use `apply_chat_template`."
    return (
        "The model was trained on this template; the saved chat template applies it to a user message, and the "
        "model writes its reasoning, `</think>`, then the answer, and ends with EOS:\n\n"
        "```\n" + format_prompt("{question}", cfg.data.template) + "\n```"
    )


def evaluation_section(evaluation: dict[str, Any]) -> str:
    """The run's evaluation results (`summary.json` `evaluation`), or a line saying there are none."""
    from medray.report import eos_stop_table, markdown_table

    if not evaluation:
        return "No evaluation recorded for this run (`medray evaluate RUN_DIR`, `medray generate RUN_DIR --eos-check`)."
    parts = []
    if evaluation.get("eos_stop"):
        parts.append(eos_stop_table(evaluation["eos_stop"]))
    others = {key: value for key, value in evaluation.items() if key != "eos_stop"}
    if others:
        rows = [[key, json.dumps(value)[:300]] for key, value in others.items()]
        parts.append(markdown_table(["benchmark", "result (summary.json)"], rows))
    return "\n\n".join(parts)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"
