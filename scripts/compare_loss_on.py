"""Compare `train.loss_on=completion` with `train.loss_on=all`: same data, same steps, same seed, then the validation
loss of each trained adapter (and of the untrained model) on the same held-out rows, measured three ways.

    python scripts/compare_loss_on.py --config cpu-demo --steps 30 \
        data.path=/work/shared/data/medical-o1/huatuogpt_o1_demo_data.jsonl

It trains one run per setting with the public entry point (`medray.driver.run_training`), then scores the last
checkpoint of each on the validation split of the completion build (the split depends only on the text and seed,
so both runs held out the same rows): mean token loss on the completion (reasoning, answer, EOS), on the final
answer alone (after `</think>`), and on every token. Prints a Markdown table and writes it (with the commands) as
JSON next to the runs. A measurement script, not part of the product: it only calls medray's public functions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medray.config import load_config
from medray.contracts import read_summary
from medray.presets import resolve_preset
from medray.samples import IGNORE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu-demo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-max-length", type=int, default=1024)
    parser.add_argument("--storage", default="/tmp/medray-loss-on")
    parser.add_argument("--runs", default="untrained,completion,all", help="which of untrained, completion, all")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import ray

    from medray.driver import prepare_data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    common = [
        *args.overrides,
        f"train.max_steps={args.steps}",
        f"train.eval_steps={args.steps}",
        "train.early_stopping_patience=0",
        f"run.storage_path={args.storage}",
    ]
    preset = resolve_preset(args.config)
    scoring = load_config(preset, [*common, "train.loss_on=completion", f"data.max_length={args.eval_max_length}"])
    validation = prepare_data(scoring).validation.take_all()
    runs = args.runs.split(",")
    results = {"command_overrides": common, "validation_rows": len(validation), "runs": {}}
    tokenizer, base = _load_base(scoring)
    output = Path(args.storage) / f"compare_loss_on-{'-'.join(runs)}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    for name in runs:
        if name == "untrained":
            results["runs"][name] = _score(base, tokenizer, validation)
        else:
            results["runs"][name] = _train_and_score(preset, common, name, args.storage, scoring, tokenizer, validation)
        output.write_text(json.dumps(results, indent=1))  # after every run, so a stopped comparison keeps its figures
    print(_table(results))


def _train_and_score(preset, common, mode, storage, scoring, tokenizer, validation) -> dict:
    """Train with `train.loss_on=mode` (or reuse a run that finished in `storage`), then score its last adapter."""
    from medray.driver import run_training

    cfg = load_config(preset, [*common, f"train.loss_on={mode}", f"run.name=loss-on-{mode}"])
    started = time.time()
    finished = Path(storage) / cfg.run.name / "summary.json"
    reused = finished.is_file()
    summary = read_summary(finished) if reused else run_training(cfg).summary
    scores = _score(_with_adapter(scoring, summary.latest_checkpoint + "/checkpoint"), tokenizer, validation)
    scores["train_wall_s"] = None if reused else round(time.time() - started, 1)
    scores["eval_loss_in_run"] = summary.metrics["final"].get("eval_loss")
    scores["loss_tokens_train"] = summary.data.get("loss_tokens_train")
    return scores


def _load_base(cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medray.sources import resolve_model_source

    folder = resolve_model_source(cfg.model.name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return AutoTokenizer.from_pretrained(folder), model.eval()


def _with_adapter(cfg, checkpoint: str):
    from peft import PeftModel

    _, base = _load_base(cfg)
    return PeftModel.from_pretrained(base, checkpoint).eval()


def _score(model, tokenizer, rows) -> dict:
    """Mean next-token loss over the completion, the final answer and every token of the validation rows."""
    think_end = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    sums = {"completion": [0.0, 0], "answer": [0.0, 0], "all": [0.0, 0]}
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([list(row["input_ids"])])
            labels = list(row["labels"])
            logits = model(input_ids=ids).logits[0, :-1]
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            answer_from = _after(list(row["input_ids"]), think_end)
            for position, loss in enumerate(losses.tolist(), start=1):  # loss of predicting token `position`
                sums["all"][0] += loss
                sums["all"][1] += 1
                if labels[position] != IGNORE:
                    sums["completion"][0] += loss
                    sums["completion"][1] += 1
                if answer_from is not None and position >= answer_from:
                    sums["answer"][0] += loss
                    sums["answer"][1] += 1
    return {f"loss_{name}": round(total / max(count, 1), 4) for name, (total, count) in sums.items()} | {
        f"tokens_{name}": count for name, (_, count) in sums.items()
    }


def _after(ids: list[int], pattern: list[int]) -> int | None:
    """The position just after the last `pattern` in `ids` (the answer starts after `</think>` and its newline)."""
    for start in range(len(ids) - len(pattern), -1, -1):
        if ids[start : start + len(pattern)] == pattern:
            return start + len(pattern) + 1
    return None


def _table(results: dict) -> str:
    lines = [
        "| model | loss on completion | loss on final answer | loss on all tokens | train wall s |",
        "|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        lines.append(
            f"| {name} | {run['loss_completion']} | {run['loss_answer']} | {run['loss_all']} | "
            f"{run.get('train_wall_s', '-')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
