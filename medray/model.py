"""Base model + LoRA adapter, on one of two backends. The ONLY module that imports unsloth.

- `unsloth`: `FastLanguageModel` in 4-bit with Unsloth's gradient checkpointing (CUDA only). Unsloth patches
  transformers, trl and peft when it is imported, so it must come first in the process: `load_model` imports it
  before anything from those libraries, and nothing in medray imports them at module level on the worker path.
- `hf`: transformers + peft, with bitsandbytes 4-bit NF4 when CUDA is present (QLoRA); plain fp32 on CPU.

    backend = resolve_backend(cfg.model)            # "unsloth" on CUDA with unsloth installed, else "hf"
    model, tokenizer = load_model(cfg, backend)     # a PEFT model with only the LoRA weights trainable
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import torch

from medray.config import LoraArgs, MedrayConfig, ModelArgs, TrainArgs
from medray.sources import resolve_model_source

logger = logging.getLogger(__name__)


def resolve_backend(model_args: ModelArgs) -> str:
    """`auto` becomes `unsloth` on CUDA when unsloth is installed, `hf` otherwise; `unsloth` without CUDA fails."""
    cuda = torch.cuda.is_available()
    if model_args.backend == "unsloth" and not cuda:
        raise RuntimeError(
            "model.backend=unsloth needs a CUDA GPU (Unsloth raises on import without one); "
            "use model.backend=hf (or auto) on CPU"
        )
    if model_args.backend != "auto":
        return model_args.backend
    return "unsloth" if cuda and importlib.util.find_spec("unsloth") else "hf"


def resolve_precision(train_args: TrainArgs) -> str:
    """`auto` -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if train_args.precision != "auto":
        return train_args.precision
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def compute_dtype(cfg: MedrayConfig) -> torch.dtype:
    """The dtype the base model's weights are computed in."""
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(cfg.train), torch.float32)


def resolve_optimizer(train_args: TrainArgs) -> str:
    """bitsandbytes' 8-bit AdamW needs CUDA; on CPU it becomes plain AdamW (same maths, fp32 state)."""
    if "8bit" in train_args.optim and not torch.cuda.is_available():
        logger.warning("optimizer %s needs CUDA; using adamw_torch on CPU", train_args.optim)
        return "adamw_torch"
    return train_args.optim


def load_tokenizer(model_args: ModelArgs):
    """The model's tokenizer, with a pad token (Mistral v0.3 has none: `<unk>` is used, never EOS)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(model_args.tokenizer or model_args.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=model_args.trust_remote_code, revision=model_args.revision
        )
    except OSError as error:
        raise RuntimeError(
            f"could not load the tokenizer of model.name={model_args.name!r}: {error}\n"
            "If the Hugging Face hub is unreachable (HF_HUB_OFFLINE=1 or no network), point model.name "
            "(or model.tokenizer) at a local folder, or use the offline preset: --config cpu-demo"
        ) from None
    _ensure_pad_token(tokenizer)
    if tokenizer.eos_token is None:
        raise RuntimeError(f"the tokenizer of {model_args.name!r} has no EOS token; medray appends EOS to every sample")
    return tokenizer


def load_model(cfg: MedrayConfig, backend: str, device: torch.device | None = None):
    """Load the base model with a fresh LoRA adapter on `device`. Returns (peft_model, tokenizer)."""
    if backend == "unsloth":
        return _load_unsloth(cfg, device)
    return _load_hf(cfg, device)


def _load_unsloth(cfg: MedrayConfig, device: torch.device | None):
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  (must precede transformers / trl / peft)
    from unsloth import FastLanguageModel

    _install_unsloth_iterable_shim()
    # Unsloth derives the device from LOCAL_RANK, which Ray sets per node; name it explicitly anyway so a worker
    # on a second node never lands on the wrong GPU.
    device_index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=resolve_model_source(cfg.model.name), device_map={"": device_index}, **_unsloth_loading(cfg)
    )
    model = FastLanguageModel.get_peft_model(
        model,
        **_lora_arguments(cfg.lora),
        use_gradient_checkpointing="unsloth" if cfg.train.gradient_checkpointing else False,
        random_state=cfg.train.seed,
    )
    _ensure_pad_token(tokenizer)
    return model, tokenizer


def load_unsloth_for_inference(cfg: MedrayConfig, adapter_dir: str | None, device: torch.device):
    """Base model (+ the adapter at `adapter_dir`) in Unsloth's fast inference mode, as the run trained it (CUDA).

    Unsloth loads an adapter folder itself (it reads the base model from `adapter_config.json`).
    """
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  (must precede transformers / trl / peft)
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=adapter_dir or resolve_model_source(cfg.model.name),
        device_map={"": device.index or 0},
        **_unsloth_loading(cfg),
    )
    FastLanguageModel.for_inference(model)
    _ensure_pad_token(tokenizer)
    return model, tokenizer


def _unsloth_loading(cfg: MedrayConfig) -> dict[str, Any]:
    """`FastLanguageModel.from_pretrained`'s arguments for training and inference alike, but the model and device."""
    return dict(
        max_seq_length=cfg.data.max_length,
        dtype=None if cfg.model.dtype == "auto" else compute_dtype(cfg),
        load_in_4bit=cfg.model.load_in_4bit,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )


def _lora_arguments(lora: LoraArgs) -> dict[str, Any]:
    """The `lora` section in PEFT's names, which `LoraConfig` and Unsloth's `get_peft_model` both take."""
    return dict(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, bias=lora.bias
    )


def _install_unsloth_iterable_shim() -> None:
    """Unsloth 2026.10.9's generated SFTTrainer calls `_iterable_batch_size` without importing it."""
    import builtins

    try:
        from unsloth_zoo.dataset_utils import _iterable_batch_size
    except ImportError:
        return
    builtins._iterable_batch_size = _iterable_batch_size


def _load_hf(cfg: MedrayConfig, device: torch.device | None):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(cfg.train.seed)
    model = load_base_model(cfg, device)
    if cfg.model.load_in_4bit and torch.cuda.is_available():  # QLoRA, as load_base_model quantized it
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = LoraConfig(**_lora_arguments(cfg.lora), task_type="CAUSAL_LM")
    return get_peft_model(model, lora), load_tokenizer(cfg.model)


def load_base_model(cfg: MedrayConfig, device: torch.device | None = None):
    """The base model with transformers, as the hf backend trains on it: 4-bit NF4 (bitsandbytes) when
    `model.load_in_4bit` and CUDA is present, else in the compute dtype; on `device` when it is a GPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(cfg)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
        use_safetensors=True,
    )
    if cfg.model.load_in_4bit and torch.cuda.is_available():
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if device is not None and device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    return AutoModelForCausalLM.from_pretrained(resolve_model_source(cfg.model.name), **kwargs)


def _ensure_pad_token(tokenizer) -> None:
    """Mistral v0.3 has no pad token: pad with `<unk>` (never trained on: labels are -100 there), else EOS."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
