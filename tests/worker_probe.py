"""A worker extension for the tests: facts only tests check, taken inside the Ray Train workers.

Named in `WorkerPlan.extensions` (`run_training(cfg, extensions=[EXTENSION])`); the workers import this module,
so `tests/` must be on their PYTHONPATH (the `ray_local` fixture puts it there). Every rank returns

    trainer_world_size, wrapped_model   one model trained by all workers (DistributedDataParallel), not N copies
    train_data_passes                   passes this rank's loader started over its shard (1: nothing sharded twice)

and rank 0 also `probe`: the trained model's top next-token logits for a fixed prompt, a fingerprint the saved
adapter must reproduce.
"""

from __future__ import annotations

from typing import Any

EXTENSION = "worker_probe:attach"
PROBE_TEXT = "### Question:\nA 58-year-old man has crushing chest pain and ST elevation in II, III and aVF."
TOP = 20


def attach(context) -> WorkerProbe:
    return WorkerProbe(context)


class WorkerProbe:
    def __init__(self, context):
        self.context = context

    def result(self) -> dict[str, Any]:
        trainer = self.context.trainer
        facts = {
            "trainer_world_size": trainer.args.world_size,
            "wrapped_model": type(trainer.model_wrapped).__name__,
            "train_data_passes": self.context.train_data_passes,
        }
        if self.context.rank == 0:
            facts["probe"] = probe(trainer.model, self.context.tokenizer(PROBE_TEXT)["input_ids"])
        return facts


def probe(model, input_ids: list[int], top: int = TOP) -> dict[str, Any]:
    """The model's top next-token logits after `input_ids`."""
    import torch

    model.eval()
    with torch.no_grad():
        ids = torch.tensor([input_ids], device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits[0, -1].float()
    values, indices = torch.topk(logits, top)
    return {"input_ids": input_ids, "top_ids": indices.tolist(), "top_logits": values.tolist()}


def rank_facts(outcome) -> list[dict[str, Any]]:
    """What every rank returned for this extension, in rank order, from a `TrainOutcome`."""
    return outcome.result.return_value.extensions[EXTENSION]
