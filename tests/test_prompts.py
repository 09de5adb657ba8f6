"""medray.prompts: the training text and the generation prompt, including text that would break str.format."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medray.config import DEFAULT_TEMPLATE
from medray.prompts import fill_template, format_prompt, format_sample

EOS = "</s>"
# Any non-empty text, biased towards what breaks naive formatting: braces, template fields, think tags, the EOS text.
tricky = st.lists(
    st.one_of(
        st.text(min_size=1),
        st.sampled_from(
            ["{", "}", "{cot}", "{question}", "{response}", "{0}", "<think>", "</think>", EOS, "\\frac{a}{b}"]
        ),
    ),
    min_size=1,
    max_size=6,
).map("".join)


def test_sample_has_fields_in_order_and_one_eos():
    text = format_sample("Why fever?", "Infection is likely.", "Give antipyretics.", DEFAULT_TEMPLATE, EOS)
    assert text.endswith(
        "### Question:\nWhy fever?\n\n### Response:\n<think>\nInfection is likely.\n</think>\nGive antipyretics.</s>"
    )
    assert text.count(EOS) == 1
    assert text.startswith(DEFAULT_TEMPLATE[: DEFAULT_TEMPLATE.index("{question}")])


def test_braces_and_field_names_in_text_are_kept():
    text = format_sample("Is {cot} x?", "$\\frac{1}{2}$ and {response}", "{0} {}", DEFAULT_TEMPLATE, EOS)
    assert "### Question:\nIs {cot} x?\n" in text
    assert "<think>\n$\\frac{1}{2}$ and {response}\n</think>\n{0} {}</s>" in text


def test_eos_already_at_the_end_of_the_response_is_not_repeated():
    assert format_sample("q", "c", "answer</s>", "{question}|{cot}|{response}", EOS) == "q|c|answer</s>"


def test_empty_eos_is_refused():
    with pytest.raises(ValueError, match="EOS"):
        format_sample("q", "c", "r", DEFAULT_TEMPLATE, "")


def test_template_braces_that_are_not_fields_stay():
    assert fill_template("{x} {question} {{y}}", {"question": "Q"}) == "{x} Q {{y}}"


def test_prompt_ends_where_the_reasoning_starts():
    prompt = format_prompt("Why {fever}?", DEFAULT_TEMPLATE)
    assert prompt.endswith("### Question:\nWhy {fever}?\n\n### Response:\n<think>\n")
    sample = format_sample("Why {fever}?", "c", "r", DEFAULT_TEMPLATE, EOS)
    assert sample.startswith(prompt)


def test_prompt_needs_question_before_cot():
    with pytest.raises(ValueError, match="followed later by"):
        format_prompt("q", "{cot} then {question} {response}")


@given(question=tricky, cot=tricky, response=tricky, eos=st.sampled_from([EOS, "<|im_end|>", "<|endoftext|>"]))
def test_any_text_is_placed_verbatim_with_one_final_eos(question, cot, response, eos):
    template = "Q:{question}\n<think>\n{cot}\n</think>\n{response}"
    text = format_sample(question, cot, response, template, eos)
    body = f"Q:{question}\n<think>\n{cot}\n</think>\n{response}"
    while body.endswith(eos):
        body = body[: -len(eos)]
    assert text == body + eos
    assert not text[: -len(eos)].endswith(eos)
    assert format_sample(question, cot, response, template, eos).startswith(format_prompt(question, template))
