"""One model replica of `medray evaluate`: the Ray Data actor that scores batches with the base model and adapters.

The actor loads the run's base model and adapter once (`medray.inference.load_for_inference`) and attaches the other
adapters by name (PEFT multi-adapter), on its GPU (Ray sets `CUDA_VISIBLE_DEVICES` to the one it reserved) or on the
CPU. For each batch and each variant it switches
adapters (`base` runs with the adapters disabled) and scores:
- `medqa` rows (`MedqaQuestion.to_row()`): out come `medray.scoring.Record` rows, by log-likelihood and generation;
- `validation` rows (`input_ids`, `labels`): out come `model`, `nll` (summed) and `tokens` (tokens in the loss).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pandas as pd
import torch

from medray.inference import (
    Generation,
    GenerationSettings,
    build_prompt,
    generate_batch,
    load_for_inference,
    resolve_run,
)
from medray.lm_scoring import choice_logliks, sequence_nll
from medray.medqa import MedqaQuestion
from medray.prompts import uses_tokenizer_specials
from medray.scoring import score_generation, score_loglik

BASE, TUNED = "base", "tuned"


class EvalReplica:
    """Callable class for `Dataset.map_batches(EvalReplica, concurrency=N, ...)`: rows are `task` + JSON `payload`."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        run = resolve_run(spec["run_dir"])
        self.cfg = run.config
        device = torch.device("cuda" if spec["use_gpu"] and torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_for_inference(run, device=device)  # the run's adapter is PEFT's "default"
        self.adapter_names = {TUNED: "default"}
        for name, path in spec["adapters"].items():
            if name != TUNED:
                self.model.load_adapter(path, adapter_name=name)
                self.adapter_names[name] = name
        self.model.eval()
        self.settings = GenerationSettings(max_new_tokens=spec["max_new_tokens"], batch_size=spec["batch_size"])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        payloads = {task: [json.loads(p) for p in group["payload"]] for task, group in batch.groupby("task")}
        questions = [MedqaQuestion.from_row(row) for row in payloads.get("medqa", [])]
        sequences = payloads.get("validation", [])
        rows = []
        for variant in [BASE, *self.spec["adapters"]]:
            with self.variant(variant):
                if sequences:
                    scored = sequence_nll(self.model, sequences, self.spec["batch_size"])
                    rows += [("validation", {"model": variant, "nll": nll, "tokens": n}) for nll, n in scored]
                if questions:
                    records = score_loglik(questions, self, variant)
                    if self.spec["generation"]:
                        records += score_generation(questions, self, self.prompt, variant)
                    rows += [("medqa", record.to_row()) for record in records]
        return pd.DataFrame({"task": [task for task, _ in rows], "payload": [json.dumps(row) for _, row in rows]})

    @contextlib.contextmanager
    def variant(self, name: str):
        """The model as `name`: the base model with the adapters disabled, or one adapter active."""
        if name == BASE:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(self.adapter_names[name])
            yield

    # The scoring interface of medray.scoring (ChoiceModel, GenerationModel) for the active variant.

    def choice_logliks(self, prompts: list[str], choices: list[str]) -> list[list[float]]:
        return choice_logliks(self.model, self.tokenizer, prompts, choices, self.spec["batch_size"])

    def generate(self, prompts: list[str]) -> list[Generation]:
        specials = uses_tokenizer_specials(self.cfg)  # a chat-format prompt already holds BOS
        return generate_batch(self.model, self.tokenizer, prompts, self.settings, add_special_tokens=specials)

    def prompt(self, question: str) -> str:
        return build_prompt(self.cfg, question, self.tokenizer)
