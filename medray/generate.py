"""`medray generate`: ask a finished run's model questions, one streamed to the terminal or a JSONL file in batches,
and the EOS check that shows the tuned model learned to stop.

    medray generate ~/medray_results/medray-demo "What does ST elevation in II, III and aVF mean?"
    medray generate ~/medray_results/medray-demo --questions questions.jsonl --output answers.jsonl
    medray generate ~/medray_results/medray-demo --eos-check     # base vs tuned on the held-out rows -> summary.json

A questions file holds one JSON object per line with a `Question` (the run's `data.columns.question`); other fields
are ignored except `id`, which is copied to the output. Each output line holds the question, the `reasoning` and the
`answer` (split at `</think>`), `new_tokens`, `stopped_at_eos` and `seconds`. Every row is checked before any model
is loaded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

from medray.inference import (
    Generation,
    GenerationSettings,
    InferenceError,
    RunArtifacts,
    build_prompt,
    generate_batch,
    load_for_inference,
    read_run_summary,
)
from medray.prompts import uses_tokenizer_specials

logger = logging.getLogger(__name__)

EOS_CHECK_ROWS = 32
"""Held-out rows the EOS check generates for at most (base and tuned each)."""


def read_questions(path: str | Path, column: str = "Question") -> list[dict[str, Any]]:
    """The rows of a questions file (JSONL, one object per line), each checked; blank lines are skipped.

    Raises:
        InferenceError: If the file is missing or empty, or a line is not a JSON object with a non-empty `column`
            string; the message names the file and the line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InferenceError(f"questions file {path} does not exist; pass a JSONL file with one {column!r} per line")
    rows = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InferenceError(f"{path}, line {number}: not valid JSON ({error.msg}); fix or remove it") from None
            if not isinstance(row, dict):
                raise InferenceError(f"{path}, line {number}: expected a JSON object with {column!r}, got {row!r:.80}")
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                found = "missing" if value is None else f"{value!r:.80}"
                raise InferenceError(f"{path}, line {number}: {column!r} must be a non-empty string ({found})")
            rows.append(row)
    if not rows:
        raise InferenceError(f"questions file {path} holds no rows")
    return rows


def answer_question(run: RunArtifacts, question: str, settings: GenerationSettings, out: TextIO) -> Generation:
    """Generate one answer, streaming its tokens to `out`; returns it with its timings."""
    from transformers import TextStreamer

    model, tokenizer = load_for_inference(run)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    # TextStreamer prints to stdout; the CLI passes sys.stdout, tests read it from capsys.
    prompt = build_prompt(run.config, question, tokenizer)
    specials = uses_tokenizer_specials(run.config)
    [generation] = generate_batch(model, tokenizer, [prompt], settings, streamer, add_special_tokens=specials)
    out.write(speed_line(generation) + "\n")
    return generation


def speed_line(generation: Generation) -> str:
    """`N tokens in T s | first token after F s | D tokens/s after it | stopped at EOS`."""
    decode_s = generation.seconds - generation.first_token_s
    rate = (generation.new_tokens - 1) / decode_s if generation.new_tokens > 1 and decode_s > 0 else float("nan")
    ending = "stopped at EOS" if generation.stopped_at_eos else "hit max_new_tokens"
    return (
        f"{generation.new_tokens} tokens in {generation.seconds:.2f} s | first token after "
        f"{generation.first_token_s:.2f} s | {rate:.1f} tokens/s after it | {ending}"
    )


def answer_file(
    run: RunArtifacts, rows: list[dict[str, Any]], output: str | Path, settings: GenerationSettings
) -> dict[str, Any]:
    """Answer every row (batched), writing one JSON line per row to `output` as batches finish.

    Returns:
        Totals: `rows`, `stopped_at_eos`, `new_tokens`, `seconds`, `tokens_per_s`.
    """
    column, specials = run.config.data.columns.question, uses_tokenizer_specials(run.config)
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_for_inference(run)
    started, done, stopped, tokens = time.perf_counter(), 0, 0, 0
    with output.open("w", encoding="utf-8") as file:
        for start in range(0, len(rows), settings.batch_size):
            batch = rows[start : start + settings.batch_size]
            prompts = [build_prompt(run.config, row[column], tokenizer) for row in batch]
            generations = generate_batch(model, tokenizer, prompts, settings, add_special_tokens=specials)
            for number, (row, generation) in enumerate(zip(batch, generations, strict=True), start + 1):
                file.write(json.dumps(output_record(number, row, column, generation), ensure_ascii=False) + "\n")
                stopped += generation.stopped_at_eos
                tokens += generation.new_tokens
            file.flush()
            done += len(batch)
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (len(rows) - done)
            print(f"generated {done}/{len(rows)} | {tokens / elapsed:.1f} tokens/s | ETA {eta:.0f} s", flush=True)
    seconds = time.perf_counter() - started
    return {
        "rows": len(rows),
        "stopped_at_eos": stopped,
        "new_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2),
    }


def output_record(number: int, row: dict[str, Any], column: str, generation: Generation) -> dict[str, Any]:
    """One output line: `row` (1-based), the row's `id` if it has one, the question and the generation's fields."""
    record = {"row": number, **({"id": row["id"]} if "id" in row else {}), "question": row[column]}
    fields = asdict(generation)
    return record | {key: fields[key] for key in fields if key not in ("prompt", "text")}


# --- the EOS check -------------------------------------------------------------------------------------------------


def eos_stop_check(run: RunArtifacts, settings: GenerationSettings, limit: int = EOS_CHECK_ROWS) -> dict[str, Any]:
    """How often the base model and the tuned model end with EOS before `max_new_tokens`, on the run's held-out rows.

    The prompts are the held-out samples' own prompt tokens (rebuilt as in training, with Ray Data), so every row
    format and `data.format` gets exactly what the model trained on. One model is loaded; the base model's answers
    come from it with the adapter disabled, with the same greedy settings.

    Returns:
        `{"base": {"stopped": n, "total": m, ...}, "tuned": {...}, "max_new_tokens": k, "rows": "held-out"}`, as
        stored under `evaluation.eos_stop` of `summary.json`.
    """
    prompts = held_out_prompts(run, limit)
    model, tokenizer = load_for_inference(run)
    tuned = generate_batch(model, tokenizer, prompts, settings)
    with model.disable_adapter():
        base = generate_batch(model, tokenizer, prompts, settings)
    return {"base": _stops(base), "tuned": _stops(tuned), "max_new_tokens": settings.max_new_tokens, "rows": "held-out"}


def held_out_prompts(run: RunArtifacts, limit: int) -> list[list[int]]:
    """The prompt token ids of the first `limit` rows of the run's validation split: each sample's tokens before its
    completion starts (where its labels stop being -100).

    Raises:
        InferenceError: For a run outside a run folder, without a validation split, or trained with
            `train.loss_on=all` (its labels do not mark where the prompt ends).
    """
    cfg = run.config
    if run.run_dir is None:
        raise InferenceError(
            f"{run.adapter_dir} is not inside a run folder; the EOS check needs the run's held-out rows"
        )
    if cfg.data.validation_fraction == 0:
        raise InferenceError(f"{run.run_dir} was trained with data.validation_fraction=0: no rows were held out")
    if cfg.train.loss_on != "completion":
        raise InferenceError(
            f"{run.run_dir} was trained with train.loss_on={cfg.train.loss_on}: its samples do not mark where the "
            "prompt ends; ask held-out questions with --questions instead"
        )
    from medray.driver import prepare_data

    prompts = []
    for row in prepare_data(cfg).validation.take(limit):
        labels = list(row["labels"])
        start = next((i for i, label in enumerate(labels) if label != -100), len(labels))
        prompts.append([int(token) for token in row["input_ids"][:start]])
    return prompts


def _stops(generations: list[Generation]) -> dict[str, Any]:
    tokens = sorted(item.new_tokens for item in generations if item.stopped_at_eos)
    return {
        "stopped": len(tokens),
        "total": len(generations),
        "median_tokens_when_stopped": tokens[len(tokens) // 2] if tokens else None,
    }


def record_evaluation(run_dir: Path, key: str, value: dict[str, Any]) -> Path:
    """Put `value` under `evaluation[key]` of the run's `summary.json` and write the report again."""
    from medray.report import write_report

    summary = read_run_summary(run_dir)
    summary.evaluation = {**(summary.evaluation or {}), key: value}
    summary.to_json(run_dir / "summary.json")
    return write_report(run_dir)


def settings_for(run: RunArtifacts, **overrides: Any) -> GenerationSettings:
    """Generation settings for a run: `max_new_tokens` defaults to the run's `data.max_length` (its longest sample)."""
    given = {key: value for key, value in overrides.items() if value is not None}
    return replace(GenerationSettings(max_new_tokens=run.config.data.max_length), **given)
