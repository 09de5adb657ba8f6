"""Pure prompt formatting: one dataset row -> the text a model trains on, or the prompt it completes.

Two formats (`data.format`):
- `template`: a template holds three fields, `{question}`, `{cot}` and `{response}` (see
  `medray.config.DEFAULT_TEMPLATE`, which puts the reasoning inside `<think>...</think>`). The fields are filled in
  one pass, so braces, LaTeX, or even a literal `{cot}` inside the text are kept as they are.
- `chat`: the tokenizer's own chat template renders the turns (user = question, assistant = `<think>` reasoning
  `</think>` answer, `qa_messages`), so the tuned model answers as it is prompted behind any chat API.

Training text comes with the character spans the loss may cover (`render_template`, `render_chat`); generation and
evaluation build their prompt with `generation_prompt` from the run's own config. No Ray, no torch (a tokenizer is
passed in where the chat template is needed): safe to import anywhere.

    text = format_sample(row["Question"], row["Complex_CoT"], row["Response"], cfg.data.template, tokenizer.eos_token)
    prompt = generation_prompt(cfg, question, tokenizer)   # the run's format; the model writes the rest
    ids = prompt_token_ids(cfg, question, tokenizer)       # the same prompt as token ids, special tokens as trained
"""

from __future__ import annotations

import re
from typing import Any

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


Span = tuple[int, int]
"""A character range [start, end) of a training text whose tokens the loss covers when `train.loss_on=completion`."""


def render_template(question: str, cot: str, response: str, template: str, eos_token: str) -> tuple[str, list[Span]]:
    """The training text of a question/answer row in `template` format, and the span of its completion.

    The completion starts where `format_prompt` ends (with the default template: after `<think>\\n`), at a position
    known from filling the template, never found by searching the text: a question that contains the response
    marker cannot move it.

    Returns:
        (`format_sample(...)`, `[(len(prompt), len(text))]`): reasoning, answer and the final EOS.
    """
    text = format_sample(question, cot, response, template, eos_token)
    return text, [(len(format_prompt(question, template)), len(text))]


def qa_messages(question: str, cot: str, response: str) -> list[dict[str, str]]:
    """A question/answer row as chat turns: user = question, assistant = `<think>` reasoning `</think>` answer (the
    layout of the default template); without reasoning the assistant turn is the answer alone."""
    answer = f"<think>\n{cot}\n</think>\n{response}" if cot else response
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[Span]]:
    """The training text of chat turns rendered by the tokenizer's chat template, and the span of every assistant turn.

    Each assistant span runs from the end of the conversation before it (rendered with the generation prompt, so
    the assistant header is not in the span) to the end of the conversation through it (the template's end-of-turn
    token is). The text ends with exactly one `eos_token`; trailing whitespace after the last turn is dropped.

    Args:
        messages: `[{"role": "system" | "user" | "assistant", "content": ...}]` with at least one assistant turn.
        tokenizer: A Hugging Face tokenizer with a chat template and an EOS token.

    Returns:
        (text, assistant spans).

    Raises:
        ValueError: If the tokenizer has no chat template, the template refuses the turns, or it renders a
            conversation's beginning differently on its own (then no span can be placed).
    """
    check_chat_template(tokenizer)
    text = _apply(tokenizer, messages, add_generation_prompt=False)
    spans: list[Span] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        through = _apply(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) < len(through)):
            raise ValueError(
                "the tokenizer's chat template renders the start of a conversation differently from the whole "
                "(it may drop earlier reasoning), so the assistant turns cannot be located; use data.format=template"
            )
        spans.append((len(before), len(through)))
    text = text.rstrip()
    eos = tokenizer.eos_token
    if not text.endswith(eos):
        text += eos
    spans[-1] = (spans[-1][0], len(text))
    return text, spans


def check_chat_template(tokenizer: Any) -> None:
    """Raise ValueError (saying what to do) if `tokenizer` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"data.format=chat needs the tokenizer's chat template, and {name} has none; "
            "use data.format=template or a model whose tokenizer has a chat template (e.g. an instruct model)"
        )


def _apply(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja's raise_exception: roles out of order, a role the template does not know
        raise ValueError(f"the tokenizer's chat template refused these turns: {error}") from None


def generation_prompt(cfg: Any, question: str, tokenizer: Any = None) -> str:
    """The prompt that generation and evaluation give the model for `question`, in the run's own format.

    `template`: the template filled up to where the reasoning starts (ends with `<think>\\n` by default; the model
    continues with its reasoning, `</think>` and the answer). `chat`: the user turn rendered by the tokenizer's chat
    template with the assistant header (the model writes `<think>` itself, as behind a chat API).

    Args:
        cfg: The run's `MedrayConfig` (e.g. rebuilt from its summary.json "config"), or its `data` section.
        question: The question to ask.
        tokenizer: The model's tokenizer; needed for `chat`.

    Returns:
        The prompt text. Tokenize it with `prompt_token_ids` (or `add_special_tokens=uses_tokenizer_specials(cfg)`).

    Raises:
        ValueError: For `chat` without a tokenizer that has a chat template.
    """
    data = getattr(cfg, "data", cfg)
    if data.format == "template":
        return format_prompt(question, data.template)
    if tokenizer is None:
        raise ValueError("data.format=chat: pass the model's tokenizer, whose chat template builds the prompt")
    check_chat_template(tokenizer)
    return _apply(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)


def uses_tokenizer_specials(cfg: Any) -> bool:
    """Whether texts of this format are tokenized with the tokenizer's own special tokens (BOS): yes for
    `template`; no for `chat`, whose template writes them into the text."""
    return getattr(cfg, "data", cfg).format == "template"


def prompt_token_ids(cfg: Any, question: str, tokenizer: Any) -> list[int]:
    """`generation_prompt` as token ids, with the special tokens the run trained with."""
    text = generation_prompt(cfg, question, tokenizer)
    return list(tokenizer(text, add_special_tokens=uses_tokenizer_specials(cfg))["input_ids"])
