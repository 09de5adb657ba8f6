"""The per-worker training function that Ray Train runs on every worker: LoRA SFT with TRL's SFTTrainer.

Sections read top to bottom: 1 config, 2 model (unsloth is imported here, before trl/transformers/peft),
3 data streamed from Ray, 4 trainer, 5 resume, 6 train, 7 return the history to the driver.

The driver passes `{"medray": MedrayConfig.to_dict(), "plan": WorkerPlan.to_dict()}` (see medray.contracts);
rank 0 returns a `WorkerResult`. Code that measures or tests training (the benchmark's step timer, the test
suite's fingerprint) attaches through the plan's `extensions`, import paths of functions
`attach(context: WorkerContext) -> object | None`: an extension adds trainer callbacks or a per-batch hook, and
the object it returns may define `result()`, whose value from every rank reaches `WorkerResult.extensions`.
A user's run names no extension and runs none of that code.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from medray.batching import RowCollator, groups_by_length, layout_problem, resolve_layout
from medray.config import MedrayConfig, TrainArgs
from medray.console import quiet_worker
from medray.contracts import WorkerPlan, WorkerResult
from medray.cuda_allocator import use_expandable_segments
from medray.model import load_model, resolve_backend, resolve_optimizer, resolve_precision
from medray.ray_streams import RayStreams, as_hf_iterable, ray_collate, streaming_trainer_class
from medray.scratch import rank_dir, remove_rank_scratch, resume_dir
from medray.tracking import setup_worker as setup_tracking

logger = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a worker extension's `attach` receives: the run, this rank, and the built trainer."""

    cfg: MedrayConfig
    plan: WorkerPlan
    rank: int
    world_size: int
    device: torch.device
    tokenizer: Any
    trainer: Any
    """The StreamingSFTTrainer: extensions add callbacks with `trainer.add_callback`."""

    def on_train_batch(self, hook) -> None:
        """Call `hook(rows)` with every training micro-batch's rows (numpy columns), in training order."""
        self.trainer.ray_streams.on_train_batch = hook

    @property
    def train_data_passes(self) -> int:
        """Passes this rank's train loader has started over its shard."""
        return self.trainer.ray_streams.train_passes


def train_loop_per_worker(config: dict[str, Any]) -> WorkerResult | None:
    """Train one LoRA adapter; every worker runs this, rank 0 returns the history. Its local scratch (trainer
    folder, restored checkpoint) is removed on the way out, whatever the outcome."""
    try:
        return _train_loop(config)
    finally:
        remove_rank_scratch(config["plan"]["run_id"], ray.train.get_context().get_world_rank())


def _train_loop(config: dict[str, Any]) -> WorkerResult | None:
    # 1. Config: plain dicts crossed the Ray boundary; rebuild the typed objects.
    cfg = MedrayConfig.from_dict(config["medray"])
    plan = WorkerPlan.from_dict(config["plan"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if not plan.verbose:
        quiet_worker()

    # 2. Model. Imports unsloth (when chosen) before trl / transformers / peft are imported in this process.
    backend = resolve_backend(cfg.model)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        use_expandable_segments()  # what importing Unsloth would set, had CUDA not been initialised already
    model, tokenizer = load_model(cfg, backend, device)

    # 3. Data: this worker's shard of the pre-tokenized splits, streamed from Ray Data (medray.ray_streams).
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("validation") if plan.has_validation else None

    # 4. Trainer. medray collates the batches itself (medray.batching): padding-free or padded, per train.padding.
    trainer = _build_trainer(cfg, plan, rank, model, tokenizer, backend, train_shard, eval_shard)
    _add_metrics_callback(trainer, cfg, plan, rank, world_size, model)
    extensions = _attach_extensions(WorkerContext(cfg, plan, rank, world_size, device, tokenizer, trainer))

    # 5. Resume: a run restarted with the same name (or after a worker failure) continues from its last checkpoint.
    resume_dir = _restore_checkpoint(ray.train.get_checkpoint(), plan.run_id, rank)

    # 6. Train.
    output = trainer.train(resume_from_checkpoint=resume_dir)

    # 7. Rank 0 returns the history; the driver writes summary.json and the report from it.
    node_ids = _node_ids(world_size)  # a collective: every rank takes part
    extension_results = _extension_results(extensions, world_size)  # a collective too, when extensions are named
    if rank != 0:
        return None
    return WorkerResult(
        log_history=trainer.state.log_history,
        global_step=trainer.state.global_step,
        best_metric=trainer.state.best_metric,
        best_step=_best_step(trainer.state),
        train_runtime_s=output.metrics.get("train_runtime"),
        backend=backend,
        resumed_from_step=_checkpoint_step(resume_dir),
        world_size=world_size,
        node_ids=node_ids,
        batch_layout=trainer.batch_layout,
        effective=effective_values(trainer, backend, world_size, device),
        extensions=extension_results,
    )


def effective_values(trainer, backend: str, world_size: int, device: torch.device) -> dict[str, Any]:
    """What the run used where the config leaves a choice (e.g. `adamw_8bit` becomes `adamw_torch` on CPU)."""
    args = trainer.args
    optimizer = getattr(args.optim, "value", args.optim)
    return {
        "backend": backend,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "optimizer": str(optimizer),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "per_device_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": world_size,
        "rows_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "batch_layout": trainer.batch_layout,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
    }


def _build_trainer(cfg, plan: WorkerPlan, rank: int, model, tokenizer, backend, train_shard, eval_shard):
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig

    layout = resolve_layout(cfg.train.padding, backend, cfg.model.attn_implementation)
    problem = layout_problem(layout, backend, cfg.model.attn_implementation)
    if problem:
        raise ValueError(problem)
    arguments = {**sft_arguments(cfg, plan, backend, rank), **_unsloth_layout(layout, backend)}
    # Trackers (run.trackers): their variables and log folders; mirrors to object storage run on rank 0.
    reporting = setup_tracking(plan.tracking, Path(arguments["output_dir"]) / "logs", rank)
    args = SFTConfig(**arguments, report_to=reporting["report_to"], run_name=reporting["run_name"])
    trainer = streaming_trainer_class()(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=as_hf_iterable(train_shard, "train", cfg.data.max_length),
        eval_dataset=as_hf_iterable(eval_shard, "validation", cfg.data.max_length) if eval_shard is not None else None,
        callbacks=[RayTrainReportCallback(), *reporting["callbacks"]],
    )
    if backend == "unsloth" and trainer.args.padding_free != (layout == "padding_free"):
        # The batches stay medray's (packed_seq_lengths keeps rows apart); only Unsloth's own preparation differs.
        logger.warning(
            "Unsloth changed padding_free to %s; medray's batches stay %s (an Unsloth other than 2026.10.9?)",
            trainer.args.padding_free,
            layout,
        )
    collate = RowCollator(layout, tokenizer.pad_token_id, cfg.train.pad_to_multiple_of, backend == "unsloth")
    grouping = groups_by_length(cfg.train.length_grouping, layout)
    trainer.ray_streams = RayStreams(train_shard, eval_shard, cfg.train, ray_collate(collate), args.device, grouping)
    trainer.batch_layout = layout + (", length-grouped" if grouping else "")
    if eval_shard is not None and cfg.train.early_stopping_patience > 0:
        trainer.add_callback(
            EarlyStoppingCallback(
                early_stopping_patience=cfg.train.early_stopping_patience,
                early_stopping_threshold=cfg.train.early_stopping_threshold,
            )
        )
    return trainer


def sft_arguments(cfg: MedrayConfig, plan: WorkerPlan, backend: str, rank: int = 0) -> dict[str, Any]:
    """The SFTConfig values of a run: what the benchmark's single-process variants train with, too."""
    precision = resolve_precision(cfg.train)
    has_validation = plan.has_validation
    # The HF gradient-checkpointing flag is for the hf backend; Unsloth installs its own in get_peft_model.
    checkpointing = cfg.train.gradient_checkpointing and backend == "hf"
    return dict(
        # One local folder per rank: RayTrainReportCallback uploads the newest checkpoint it finds there, and a rank
        # that shared rank 0's folder could upload rank 0's previous adapter before the new one is written.
        output_dir=str(rank_dir(plan.run_id, rank)),
        max_steps=plan.max_steps,
        per_device_train_batch_size=cfg.train.per_device_batch_size,
        per_device_eval_batch_size=cfg.train.eval_batch_size or cfg.train.per_device_batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        learning_rate=cfg.train.learning_rate,
        optim=resolve_optimizer(cfg.train),
        lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_steps=cfg.train.logging_steps,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=cfg.train.eval_steps,
        # Checkpoint at every evaluation so Ray can keep the best adapters by validation loss.
        save_strategy="steps",
        save_steps=cfg.train.eval_steps,
        save_total_limit=cfg.run.checkpoints_to_keep + 1,
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss" if has_validation else None,
        greater_is_better=False if has_validation else None,
        max_length=cfg.data.max_length,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        # Without CUDA, accelerate joins Ray's gloo process group only when told it runs on CPU; otherwise each
        # worker would silently train its own copy of the model.
        use_cpu=not torch.cuda.is_available(),
        accelerator_config={"dispatch_batches": False},
        disable_tqdm=True,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        dataloader_pin_memory=False,
        include_num_input_tokens_seen="non_padding",
        **_batch_layout(cfg.train),
    )


def _batch_layout(train: TrainArgs) -> dict[str, Any]:
    """`train.padding` and `train.pad_to_multiple_of` as SFTConfig values, for a trainer that collates with its own
    collator (the benchmark's bare and peft variants); `auto` and None leave the choice to Unsloth and TRL. The
    worker collates with medray.batching instead and sets `padding_free` from its own layout (`_unsloth_layout`)."""
    layout: dict[str, Any] = {}
    if train.padding != "auto":
        layout["padding_free"] = train.padding == "padding_free"
    if train.pad_to_multiple_of:
        layout["pad_to_multiple_of"] = train.pad_to_multiple_of
    return layout


def _unsloth_layout(layout: str, backend: str) -> dict[str, Any]:
    """The SFTConfig values the worker sets over `_batch_layout`'s: the trainer's collator is unused (medray
    collates), but Unsloth reads `padding_free` to prepare the model for packed rows (varlen attention, rows longer
    than max_length in one packed sequence), so it gets medray's layout and never picks its own. TRL itself gets
    False on the hf backend: its padding-free mode would only refuse a set `max_length`."""
    return {"padding_free": layout == "padding_free" and backend == "unsloth", "pad_to_multiple_of": None}


def _add_metrics_callback(trainer, cfg, plan, rank, world_size, model) -> None:
    from medray.metrics import TrainingMetricsCallback, count_params_for_mfu, gpu_peak_flops

    callback = TrainingMetricsCallback(
        cfg.run.name,
        trial=plan.trial,
        rank=rank,
        world_size=world_size,
        n_params_for_mfu=count_params_for_mfu(model),
        peak_flops=gpu_peak_flops(),
        total_steps=plan.max_steps,
    )
    # First in line, so TensorBoard and Ray's report see the fields it adds. Its progress line replaces HF's
    # PrinterCallback, which would print every log dict into `ray job logs`.
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.callback_handler.callbacks.insert(0, callback)


def _attach_extensions(context: WorkerContext) -> dict[str, Any]:
    """Import and attach every extension the plan names; import path -> what its `attach` returned."""
    attached = {}
    for path in context.plan.extensions:
        module_name, _, function_name = path.partition(":")
        attach = getattr(importlib.import_module(module_name), function_name)
        attached[path] = attach(context)
    return attached


def _extension_results(extensions: dict[str, Any], world_size: int) -> dict[str, list[Any]]:
    """Each extension's `result()` from every rank (rank order); a collective when any extension is attached."""
    if not extensions:
        return {}
    mine = {path: getattr(handle, "result", lambda: None)() for path, handle in extensions.items()}
    gathered = _gather(mine, world_size)
    return {path: [rank_results[path] for rank_results in gathered] for path in extensions}


def _restore_checkpoint(checkpoint, run_id: str, rank: int) -> str | None:
    if checkpoint is None:
        return None
    local = resume_dir(run_id, rank)
    checkpoint.to_directory(str(local))
    return str(local / "checkpoint")


def _checkpoint_step(resume_dir: str | None) -> int | None:
    if resume_dir is None:
        return None
    import json

    return json.loads((Path(resume_dir) / "trainer_state.json").read_text())["global_step"]


def _best_step(state) -> int | None:
    if not state.best_model_checkpoint:
        return None
    return int(os.path.basename(state.best_model_checkpoint).rsplit("-", 1)[-1])


def _node_ids(world_size: int) -> list[str]:
    """Node id of every worker, gathered over the process group (rank order)."""
    return [str(item) for item in _gather(ray.get_runtime_context().get_node_id(), world_size)]


def _gather(value: Any, world_size: int) -> list[Any]:
    """`value` from every rank, in rank order; a collective: every rank must call it."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered
