"""Pure prompt formatting: one dataset row -> the text a model trains on, or the prompt it completes.

A template holds three fields, `{question}`, `{cot}` and `{response}` (see `medray.config.DEFAULT_TEMPLATE`, which
puts the reasoning inside `<think>...</think>`). The fields are filled in one pass, so braces, LaTeX, or even a
literal `{cot}` inside the text are kept as they are. No Ray, no torch: safe to import anywhere.

    text = format_sample(row["Question"], row["Complex_CoT"], row["Response"], cfg.data.template, tokenizer.eos_token)
    prompt = format_prompt(question, cfg.data.template)  # ends with "<think>\\n"; the model writes the rest
"""

from __future__ import annotations

import re

_FIELD = re.compile(r"\{(question|cot|response)\}")


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace every `{question}`, `{cot}` and `{response}` in `template` with its value.

    Unlike `str.format`, other braces in the template are left alone and the inserted text is never scanned again,
    so a question that contains `{response}` or `\\frac{a}{b}` comes out unchanged.

    Args:
        template: Text holding any of the three fields.
        values: The text of each field to fill; a field not in `values` stays as it is.

    Returns:
        The filled template.
    """
    return _FIELD.sub(lambda match: values.get(match.group(1), match.group(0)), template)


def format_sample(question: str, cot: str, response: str, template: str, eos_token: str) -> str:
    """The training text of one row: the filled template, ending with exactly one `eos_token`.

    Args:
        question: The question (any non-empty string).
        cot: The chain of thought, placed where the template has `{cot}` (inside `<think>...</think>` by default).
        response: The final answer. A copy of `eos_token` already at its end is not repeated.
        template: Prompt template with the fields `{question}`, `{cot}` and `{response}`.
        eos_token: The tokenizer's end-of-sequence text, e.g. `</s>`.

    Returns:
        The text to tokenize; the model learns to stop by predicting the final `eos_token`.

    Raises:
        ValueError: If `eos_token` is empty.
    """
    if not eos_token:
        raise ValueError("eos_token is empty: the tokenizer needs an EOS token so the model learns where to stop")
    text = fill_template(template, {"question": question, "cot": cot, "response": response})
    while text.endswith(eos_token):
        text = text[: -len(eos_token)]
    return text + eos_token


def format_prompt(question: str, template: str) -> str:
    """The generation prompt for `question`: the template filled up to where the reasoning starts.

    With the default template this ends with `### Response:\\n<think>\\n`, so the model continues with its reasoning,
    `</think>` and the answer.

    Args:
        question: The question to ask.
        template: Prompt template with the fields `{question}`, `{cot}` and `{response}`, `{question}` before `{cot}`.

    Returns:
        The prompt text (no EOS).

    Raises:
        ValueError: If the template has no `{cot}` field or `{question}` does not come before it.
    """
    head, found, _ = template.partition("{cot}")
    if not found or "{question}" not in head:
        raise ValueError("the template must contain {question} followed later by {cot}; got " + repr(template[:200]))
    return fill_template(head, {"question": question})
