"""MedQA-USMLE 4-option questions: read and check a local JSONL file (or the hub dataset), and build the prompts.

Three row layouts are understood, whichever the file uses (all rows of a file are checked, streaming, before any model
is loaded, and a bad row is a `MedqaError` naming the file and the line):

- `question`, `options` = {"A": text, "B": ..., "C": ..., "D": ...}, `answer_idx` = "A".."D" (the MedQA release,
  `GBaker/MedQA-USMLE-4-options`, and `../shared/data/medqa-usmle-4opt`);
- `question`, `options` = [text, text, text, text], `answer_idx` = 0..3 or "A".."D";
- `sent1`, `ending0`..`ending3`, `label` = 0..3 (`GBaker/MedQA-USMLE-4-options-hf`, lm-evaluation-harness's source).

The question id is `realidx`, else `id`, else the row's line number.

    questions = read_medqa("../shared/data/medqa-usmle-4opt/medqa_usmle_4options_test_first300.jsonl", limit=50)
    loglik_prompt(questions[0])        # "Question: ...\\nA. ...\\n...\\nD. ...\\nAnswer:" (lm-eval medqa_4options)
    generation_question(questions[0])  # the question with its options, for the run's own template
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LETTERS = ("A", "B", "C", "D")
HUB_SPLIT = "test"
LAYOUTS = (
    "question + options {A..D} + answer_idx letter; question + options [4 texts] + answer_idx 0-3 or A-D; "
    "sent1 + ending0..ending3 + label 0-3"
)


class MedqaError(ValueError):
    """A MedQA file or dataset that cannot be scored; the message names the file, the row and what to do."""


@dataclass(frozen=True)
class MedqaQuestion:
    """One 4-option question."""

    id: str
    """`realidx`, `id`, or the row's line number."""
    question: str
    """The question stem."""
    options: tuple[str, str, str, str]
    """The texts of options A, B, C, D."""
    gold: str
    """The correct letter, A-D."""

    def to_row(self) -> dict[str, Any]:
        """A plain dict (what a Ray Data row holds)."""
        return {**asdict(self), "options": list(self.options)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> MedqaQuestion:
        return cls(id=str(row["id"]), question=row["question"], options=tuple(row["options"]), gold=row["gold"])


def read_medqa(source: str | Path, limit: int | None = None) -> list[MedqaQuestion]:
    """The questions of a local JSONL file, or of a hub dataset id (its `test` split) when the path does not exist.

    Args:
        source: A `.jsonl` file (one question per line) or a Hugging Face dataset id such as
            `GBaker/MedQA-USMLE-4-options`.
        limit: Keep the first N questions (every row is still checked).

    Returns:
        The questions, in file order.

    Raises:
        MedqaError: If the file is missing or empty, or a row has an unknown layout, a missing or out-of-range
            answer, or empty text.
    """
    path = Path(source).expanduser()
    if path.is_file():
        rows = _file_rows(path)
    elif path.exists():
        raise MedqaError(f"--medqa {source}: a folder; pass one .jsonl file (one question per line)")
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        rows = _hub_rows(str(source))
    else:
        raise MedqaError(f"--medqa {source}: no such file; pass a MedQA .jsonl file or a hub dataset id")
    questions = [parse_row(row, where) for where, row in rows]
    if not questions:
        raise MedqaError(f"{source} holds no questions: the benchmark would be empty; pass a file with rows")
    return questions if limit is None else questions[:limit]


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise MedqaError(f"{where}: not valid JSON ({error.msg}); each line must be one question") from None


def _hub_rows(hub_id: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        table = datasets.load_dataset(hub_id, split=HUB_SPLIT)
    except Exception as error:  # offline, unknown id, no test split: all end the same way
        raise MedqaError(
            f"could not load the hub dataset {hub_id} (split {HUB_SPLIT}): {error}\n"
            "Without the Hugging Face hub, pass a local MedQA .jsonl file, e.g. "
            "--medqa ../shared/data/medqa-usmle-4opt/medqa_usmle_4options_test_first300.jsonl"
        ) from error
    for number, row in enumerate(table, 1):
        yield f"{hub_id} ({HUB_SPLIT}), row {number}", row


def parse_row(row: Any, where: str) -> MedqaQuestion:
    """One row in any of the three layouts -> a `MedqaQuestion`; a `MedqaError` naming `where` otherwise."""
    if not isinstance(row, dict):
        raise MedqaError(f"{where}: expected a JSON object, got a {type(row).__name__}")
    if "sent1" in row and "ending0" in row:
        question, options, answer_key = row["sent1"], [row.get(f"ending{i}") for i in range(4)], "label"
    elif "question" in row and "options" in row:
        question, options, answer_key = row["question"], _options(row["options"], where), "answer_idx"
    else:
        raise MedqaError(f"{where}: unknown options layout (fields {sorted(row)}); expected one of: {LAYOUTS}")
    if answer_key not in row or row[answer_key] is None:
        raise MedqaError(f"{where}: no answer index ({answer_key!r} is missing); add the correct option's letter")
    answer = _letter(row[answer_key], where, answer_key)
    if not isinstance(question, str) or not question.strip():
        raise MedqaError(f"{where}: the question is empty or not text; fix or remove that row")
    for letter, text in zip(LETTERS, options, strict=True):
        if not isinstance(text, str) or not text.strip():
            raise MedqaError(f"{where}: option {letter} is empty or not text; fix or remove that row")
    number = row.get("realidx", row.get("id"))
    question_id = str(number) if number is not None else where.rsplit(" ", 1)[-1]
    return MedqaQuestion(id=question_id, question=question.strip(), options=tuple(options), gold=answer)


def _options(options: Any, where: str) -> list[Any]:
    if isinstance(options, dict) and sorted(options) == list(LETTERS):
        return [options[letter] for letter in LETTERS]
    if isinstance(options, list) and len(options) == len(LETTERS):
        return options
    shape = sorted(options) if isinstance(options, dict) else f"{type(options).__name__} of {_size(options)}"
    raise MedqaError(
        f"{where}: unknown options layout ({shape}); medray scores 4-option questions: options must be "
        "{A, B, C, D} or a list of 4 texts"
    )


def _size(value: Any) -> str:
    return str(len(value)) if hasattr(value, "__len__") else "?"


def _letter(value: Any, where: str, key: str) -> str:
    """An answer index (letter A-D or integer 0-3) -> its letter."""
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return value.strip().upper()
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(LETTERS):
        return LETTERS[value]
    raise MedqaError(f"{where}: answer index {key}={value!r} is out of range; it must be A-D or 0-3")


def options_text(question: MedqaQuestion) -> str:
    """`A. text\\nB. text\\nC. text\\nD. text\\n`."""
    return "".join(f"{letter}. {text}\n" for letter, text in zip(LETTERS, question.options, strict=True))


def loglik_prompt(question: MedqaQuestion) -> str:
    """The zero-shot prompt of lm-evaluation-harness's `medqa_4options`; the choices are " A" .. " D"."""
    return f"Question: {question.question}\n{options_text(question)}Answer:"


def loglik_choices() -> list[str]:
    """The continuations scored after `loglik_prompt` (lm-eval's target delimiter " " + the letter)."""
    return [f" {letter}" for letter in LETTERS]


def generation_question(question: MedqaQuestion) -> str:
    """The `{question}` text given to the run's template: the stem, the options, and how to answer."""
    return (
        f"{question.question}\n\n{options_text(question)}\nAnswer with the letter of the correct option (A, B, C or D)."
    )
