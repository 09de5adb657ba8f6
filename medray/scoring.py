"""Scoring multiple-choice answers: option log-likelihood, answer extraction from generated text, accuracy with a
95 % Wilson interval. A "model" here is anything with the two small methods below, so the scorer can be tested with
oracle and fixed-letter models, and `medray.evaluate_replica` plugs the real one in.

    records = score_loglik(questions, model, variant="tuned")              # model.choice_logliks(prompts, choices)
    records += score_generation(questions, model, build_prompt, "tuned")   # model.generate(prompts)
    accuracy_summary(records)   # {"questions", "correct", "accuracy", "ci95", "unparsable", "unparsable_share"}
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from medray.inference import THINK_CLOSE, split_reasoning
from medray.medqa import LETTERS, MedqaQuestion, generation_question, loglik_choices, loglik_prompt

Z_95 = 1.959963984540054
# Letters are upper case only, so "the answer is a beta blocker" or "A 45-year-old..." name no option.
_STATED = re.compile(r"(?i:answer)\s*(?:is\s*:?|:)?\s*(?i:option\s*)?[(*\[]*([A-D])\b")
_LEADING = re.compile(r"^[\s*#>(\[]*(?i:option\s*)?([A-D])(?:[).:\]*]|\s*$|\s*\n)")
_MARKED = re.compile(r"\(([A-D])\)|\b([A-D])[).:]")


class ChoiceModel(Protocol):
    def choice_logliks(self, prompts: list[str], choices: list[str]) -> list[list[float]]:
        """For every prompt, the summed log-probability of each choice's tokens following it."""


class GenerationModel(Protocol):
    def generate(self, prompts: list[str]) -> list[Any]:
        """One greedy continuation per prompt: objects with `text`, `new_tokens` and `stopped_at_eos`
        (`medray.inference.Generation`)."""


@dataclass
class Record:
    """One question scored by one model one way: a row of the evaluation's records Parquet."""

    question_id: str
    model: str
    method: str
    """`loglik` or `generation`."""
    gold: str
    predicted: str | None
    """The picked letter; None when the generated answer names no option."""
    correct: bool
    seconds: float
    """This question's share of its batch's wall time."""
    new_tokens: int = 0
    generated: str = ""
    think_closed: bool = False
    """Generation: the text holds `</think>`, so the answer was read after it."""
    stopped_at_eos: bool = False
    logliks: list[float] = field(default_factory=list)
    """Log-likelihood: the summed log-probability of " A" .. " D"."""

    def to_row(self) -> dict[str, Any]:
        return dict(self.__dict__)


def score_loglik(questions: list[MedqaQuestion], model: ChoiceModel, variant: str) -> list[Record]:
    """Pick, for each question, the option whose letter the model finds most likely after the lm-eval prompt."""

    def read(question: MedqaQuestion, scores: list[float]) -> tuple[str | None, dict[str, Any]]:
        predicted = LETTERS[max(range(len(LETTERS)), key=lambda i: scores[i])]
        return predicted, {"logliks": [float(score) for score in scores]}

    return _score(
        questions,
        variant,
        "loglik",
        lambda: model.choice_logliks([loglik_prompt(q) for q in questions], loglik_choices()),
        read,
    )


def score_generation(
    questions: list[MedqaQuestion], model: GenerationModel, build_prompt: Callable[[str], str], variant: str
) -> list[Record]:
    """Ask each question in the run's prompt format (`build_prompt`), read the letter from the answer after
    `</think>`."""

    def read(question: MedqaQuestion, output: Any) -> tuple[str | None, dict[str, Any]]:
        fields = {
            "new_tokens": output.new_tokens,
            "generated": output.text,
            "think_closed": THINK_CLOSE in output.text,
            "stopped_at_eos": output.stopped_at_eos,
        }
        return extract_answer(output.text, question.options), fields

    return _score(
        questions,
        variant,
        "generation",
        lambda: model.generate([build_prompt(generation_question(q)) for q in questions]),
        read,
    )


def _score(
    questions: list[MedqaQuestion],
    variant: str,
    method: str,
    run: Callable[[], list[Any]],
    read: Callable[[MedqaQuestion, Any], tuple[str | None, dict[str, Any]]],
) -> list[Record]:
    """One `Record` per question: `run` scores every question in one call, timed and shared out evenly; `read`
    turns a question's output into the picked letter and the method's own fields."""
    started = time.perf_counter()
    outputs = run()
    seconds = (time.perf_counter() - started) / max(1, len(questions))
    records = []
    for question, output in zip(questions, outputs, strict=True):
        predicted, fields = read(question, output)
        records.append(
            Record(
                question_id=question.id,
                model=variant,
                method=method,
                gold=question.gold,
                predicted=predicted,
                correct=predicted == question.gold,
                seconds=seconds,
                **fields,
            )
        )
    return records


def extract_answer(text: str, options: tuple[str, ...] | list[str] = ()) -> str | None:
    """The option letter a generated answer gives, or None if it names none (or several).

    The answer is the text after `</think>` (`medray.inference.split_reasoning`), or the whole text if the model
    never closed its reasoning.
    In order: a stated answer ("The answer is B", "Answer: (C)"), a letter leading the answer ("B. Aspirin",
    "(D)"), exactly one option's text quoted, exactly one marked letter ("(A)", "C.").

    Args:
        text: The generated text.
        options: The option texts A-D, to recognise an answer that quotes one instead of naming its letter.

    Returns:
        "A" .. "D", or None when the answer cannot be parsed.
    """
    answer = split_reasoning(text)[1] if THINK_CLOSE in text else text.strip()
    if not answer:
        return None
    for pattern in (_STATED, _LEADING):
        match = pattern.search(answer)
        if match:
            return match.group(1)
    lowered = answer.lower()
    quoted = {letter for letter, option in zip(LETTERS, options, strict=False) if option.lower() in lowered}
    if len(quoted) == 1:
        return quoted.pop()
    marked = {a or b for a, b in _MARKED.findall(answer)}
    return marked.pop() if len(marked) == 1 else None


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); (0, 1) when `total` is 0."""
    if total == 0:
        return 0.0, 1.0
    share = successes / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_summary(records: list[Record]) -> dict[str, Any]:
    """Accuracy of a set of records (one model, one method) with its 95 % Wilson interval and the unparsable share."""
    total = len(records)
    correct = sum(record.correct for record in records)
    unparsable = sum(record.predicted is None for record in records)
    low, high = wilson_interval(correct, total)
    return {
        "questions": total,
        "correct": correct,
        "accuracy": correct / total if total else 0.0,
        "ci95": [round(low, 4), round(high, 4)],
        "unparsable": unparsable,
        "unparsable_share": unparsable / total if total else 0.0,
    }
