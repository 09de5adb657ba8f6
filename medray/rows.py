"""Row formats of training data: check one raw row and turn it into a question/answer triple or chat turns.

Three formats, named by `row_format` in a data source (`medray.config.SourceArgs`):

- `qa`: one question, its reasoning and its answer in three columns (`columns.question`, `reasoning`, `answer`),
  as in medical-o1 (`Question`, `Complex_CoT`, `Response`);
- `messages`: OpenAI-style turns, `[{"role": "system" | "user" | "assistant", "content": "..."}]`;
- `sharegpt`: `conversations` of `[{"from": "system" | "human" | "gpt", "value": "..."}]`.

`auto` picks the format from a row's fields (`detect_format`). Pure functions, no Ray, no tokenizer.

    problem = row_problem(row, "messages", columns)      # "" for a good row, else what is wrong and what to do
    turns = to_messages(row, "sharegpt", columns)         # [{"role": "user", "content": ...}, ...]
"""

from __future__ import annotations

from typing import Any

from medray.config import ColumnArgs

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
DEFAULT_TURN_COLUMN = {"messages": "messages", "sharegpt": "conversations"}
SET_COLUMNS = "set data.columns (question, reasoning, answer, messages) to the names your data uses"


def turn_column(row_format: str, columns: ColumnArgs) -> str:
    """The column that holds the turns of `messages` / `sharegpt` rows."""
    return columns.messages or DEFAULT_TURN_COLUMN[row_format]


def qa_columns(columns: ColumnArgs) -> list[str]:
    """The text columns of `qa` rows (question, reasoning if any, answer)."""
    return [name for name in (columns.question, columns.reasoning, columns.answer) if name is not None]


def needed_columns(row_format: str, columns: ColumnArgs) -> list[str]:
    """The columns that rows of `row_format` are read from."""
    return qa_columns(columns) if row_format == "qa" else [turn_column(row_format, columns)]


def detect_format(field_names: list[str], columns: ColumnArgs) -> str:
    """`messages`, `sharegpt` or `qa`, from the fields of a row (or the columns of a table).

    A configured `columns.messages` column decides by its name alone only when it is not one of the two defaults.
    """
    names = set(field_names)
    if columns.messages and columns.messages in names:
        return "sharegpt" if columns.messages == "conversations" else "messages"
    if "messages" in names:
        return "messages"
    if "conversations" in names:
        return "sharegpt"
    return "qa"


def row_problem(row: Any, row_format: str, columns: ColumnArgs) -> str:
    """What is wrong with one raw row, or "" if it can be used.

    Args:
        row: A parsed row (should be a mapping).
        row_format: `qa`, `messages` or `sharegpt`.
        columns: The source's column names.

    Returns:
        A message such as `'Response' is empty; fix or remove that row`, or "".
    """
    wanted = needed_columns(row_format, columns)
    if not isinstance(row, dict):
        return f"expected an object with the fields {wanted}, got a {type(row).__name__}; fix or remove that row"
    if row_format == "qa":
        return _qa_problem(row, wanted)
    (name,) = wanted
    if name not in row:
        return f"has no {name!r} field (it has {list(row)}); {SET_COLUMNS}"
    return _turns_problem(row[name], row_format, name)


def _qa_problem(row: dict, columns: list[str]) -> str:
    for name in columns:
        if name not in row:
            return f"has no {name!r} field (it has {list(row)}); {SET_COLUMNS}"
        value = row[name]
        if value is None:
            return f"{name!r} is null; fix or remove that row"
        if not isinstance(value, str):
            return f"{name!r} is a {type(value).__name__}, not text; fix or remove that row"
        if not value.strip():
            return f"{name!r} is empty; fix or remove that row"
    return ""


def _turns_problem(turns: Any, row_format: str, name: str) -> str:
    if not isinstance(turns, list) or not turns:
        return f"{name!r} must be a non-empty list of turns; fix or remove that row"
    role_key, text_key = ("role", "content") if row_format == "messages" else ("from", "value")
    known = ROLES if row_format == "messages" else tuple(SHAREGPT_ROLES)
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            return f"{name!r} turn {number} must be an object with {role_key!r} and {text_key!r}; fix that row"
        if turn[role_key] not in known:
            return (
                f"{name!r} turn {number} has the unknown {role_key} {turn[role_key]!r}; use one of {', '.join(known)}"
            )
        if not isinstance(turn[text_key], str):
            return f"{name!r} turn {number}: {text_key!r} is a {type(turn[text_key]).__name__}, not text; fix that row"
    roles = [_role(turn[role_key], row_format) for turn in turns]
    if "assistant" not in roles:
        return f"{name!r} has no assistant turn, so there is nothing to learn; add one or remove that row"
    if any(not turn[text_key].strip() for turn, role in zip(turns, roles, strict=True) if role == "assistant"):
        return f"{name!r} has an empty assistant turn; fix or remove that row"
    return ""


def _role(value: str, row_format: str) -> str:
    return value if row_format == "messages" else SHAREGPT_ROLES[value]


def to_messages(row: dict, row_format: str, columns: ColumnArgs) -> list[dict[str, str]]:
    """The turns of a checked `messages` or `sharegpt` row as `[{"role": ..., "content": ...}]`."""
    turns = row[turn_column(row_format, columns)]
    if row_format == "messages":
        return [{"role": turn["role"], "content": turn["content"]} for turn in turns]
    return [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in turns]


def to_qa(row: dict, columns: ColumnArgs) -> tuple[str, str, str]:
    """(question, reasoning, answer) of a checked `qa` row; the reasoning is "" without a reasoning column."""
    reasoning = row[columns.reasoning] if columns.reasoning else ""
    return row[columns.question], reasoning, row[columns.answer]
