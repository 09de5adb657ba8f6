"""The MedQA scorer, validated with models whose accuracy is known in advance (oracle, fixed letter, shuffled key),
answer extraction, the Wilson interval, and the MedQA reader's checks on bad files."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import MEDQA_TEST

from medray.config import DEFAULT_TEMPLATE
from medray.inference import Generation, split_reasoning
from medray.medqa import LETTERS, MedqaError, MedqaQuestion, loglik_prompt, parse_row, read_medqa
from medray.prompts import format_prompt
from medray.scoring import (
    accuracy_summary,
    extract_answer,
    score_generation,
    score_loglik,
    wilson_interval,
)


def generation(text: str, new_tokens: int = 12, stopped: bool = True) -> Generation:
    reasoning, answer = split_reasoning(text)
    return Generation("prompt", text, reasoning, answer, new_tokens, stopped, seconds=0.1, first_token_s=0.01)


def template_prompt(question: str) -> str:
    return format_prompt(question, DEFAULT_TEMPLATE)


def synthetic_questions(count: int, seed: int) -> list[MedqaQuestion]:
    generator = random.Random(seed)
    return [
        MedqaQuestion(
            id=str(i),
            question=f"Question {i}: which drug?",
            options=tuple(f"drug {i}-{letter}" for letter in LETTERS),
            gold=generator.choice(LETTERS),
        )
        for i in range(count)
    ]


class AnswerKeyModel:
    """A fake model at the scoring interface that answers every question with the letter its key gives."""

    def __init__(self, questions: list[MedqaQuestion], key: list[str]):
        self.by_prompt = {loglik_prompt(q): letter for q, letter in zip(questions, key, strict=True)}
        self.by_question = {q.question: letter for q, letter in zip(questions, key, strict=True)}

    def choice_logliks(self, prompts: list[str], choices: list[str]) -> list[list[float]]:
        assert choices == [" A", " B", " C", " D"]
        return [[0.0 if letter == self.by_prompt[p] else -4.0 for letter in LETTERS] for p in prompts]

    def generate(self, prompts: list[str]) -> list[Generation]:
        outputs = []
        for prompt in prompts:
            assert prompt.endswith("<think>\n")  # the run's template, up to where the reasoning starts
            letter = next(v for question, v in self.by_question.items() if question in prompt)
            outputs.append(generation(f"Let me think.\n</think>\nThe answer is {letter}."))
        return outputs


def both_ways(questions, model) -> tuple[dict, dict]:
    loglik = score_loglik(questions, model, "fake")
    generation = score_generation(questions, model, template_prompt, "fake")
    return accuracy_summary(loglik), accuracy_summary(generation)


@pytest.fixture(scope="module")
def questions() -> list[MedqaQuestion]:
    return synthetic_questions(2000, seed=7)


def test_oracle_scores_100_percent(questions):
    for summary in both_ways(questions, AnswerKeyModel(questions, [q.gold for q in questions])):
        assert summary["correct"] == summary["questions"] == 2000
        assert summary["accuracy"] == 1.0 and summary["unparsable"] == 0
        assert summary["ci95"][1] == 1.0 and summary["ci95"][0] > 0.99


@pytest.mark.parametrize("letter", LETTERS)
def test_fixed_letter_scores_that_letters_share(questions, letter):
    share = sum(q.gold == letter for q in questions) / len(questions)
    for summary in both_ways(questions, AnswerKeyModel(questions, [letter] * len(questions))):
        assert summary["accuracy"] == pytest.approx(share)


def test_fixed_letter_on_the_real_medqa_rows():
    if not MEDQA_TEST.is_file():
        pytest.skip(f"{MEDQA_TEST} is missing: set MEDRAY_SHARED_DATA")
    real = read_medqa(MEDQA_TEST)
    model = AnswerKeyModel(real, ["A"] * len(real))
    assert accuracy_summary(score_loglik(real, model, "fake"))["correct"] == 85  # 85 of the 300 golds are A


def test_shuffled_answer_key_scores_about_25_percent(questions):
    key = [q.gold for q in questions]
    random.Random(11).shuffle(key)
    for summary in both_ways(questions, AnswerKeyModel(questions, key)):
        # Chance is 25 %: 4 standard errors either side (p < 1e-4 of failing by luck; the seed fixes it anyway).
        assert abs(summary["accuracy"] - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(questions))
        low, high = summary["ci95"]
        assert low < 0.25 < high


def test_records_carry_gold_prediction_and_text(questions):
    sample = questions[:3]
    records = score_generation(sample, AnswerKeyModel(sample, ["B"] * 3), template_prompt, "tuned")
    assert [(r.question_id, r.model, r.method, r.predicted) for r in records] == [
        (q.id, "tuned", "generation", "B") for q in sample
    ]
    assert all(r.think_closed and r.stopped_at_eos and r.new_tokens == 12 for r in records)
    assert records[0].generated.endswith("The answer is B.")
    assert records[0].correct == (sample[0].gold == "B")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("reasoning</think>\nThe answer is B.", "B"),
        ("reasoning</think>\nAnswer: (C) aspirin", "C"),
        ("r</think>\n**D**", "D"),
        ("r</think>\nB. Heparin", "B"),
        ("I think it is (A) or maybe (B)</think>\nThe correct answer is option D", "D"),  # only after </think>
        ("r</think>\nAspirin is right.", "A"),  # quotes one option's text
        ("r</think>\nThe answer is a beta blocker", None),  # "a" is not an option letter
        ("r</think>\nA 45-year-old man needs rest.", None),
        ("r</think>\nEither (A) or (C)", None),  # two options: unparsable
        ("r</think>\n", None),
        ("no closing tag, answer is C", "C"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text, ("Aspirin", "Heparin", "Warfarin", "Clopidogrel")) == expected


def test_unparsable_answers_are_counted(questions):
    class Rambling:
        def generate(self, prompts):
            return [generation("I am not sure.", 5, stopped=False) for _ in prompts]

    summary = accuracy_summary(score_generation(questions[:10], Rambling(), template_prompt, "base"))
    assert summary["unparsable"] == 10 and summary["unparsable_share"] == 1.0 and summary["accuracy"] == 0.0


def test_wilson_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(3.8415 / 13.8415, abs=1e-4)  # z^2 / (n + z^2)
    low, high = wilson_interval(150, 300)
    assert low == pytest.approx(1 - high) and high - low == pytest.approx(0.1124, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


# --- the MedQA reader ------------------------------------------------------------------------------------------------


def test_reads_the_shared_medqa_file():
    if not MEDQA_TEST.is_file():
        pytest.skip(f"{MEDQA_TEST} is missing: set MEDRAY_SHARED_DATA")
    questions = read_medqa(MEDQA_TEST)
    assert len(questions) == 300
    first = questions[0]
    assert first.id == "0" and first.gold == "B"
    assert first.options[1] == "Tell the attending that he cannot fail to disclose this mistake"
    assert [q.id for q in read_medqa(MEDQA_TEST, limit=5)] == ["0", "1", "2", "3", "4"]


def test_the_three_layouts_give_the_same_question():
    options = ["w", "x", "y", "z"]
    rows = [
        {"question": "Q?", "options": dict(zip(LETTERS, options, strict=True)), "answer_idx": "C"},
        {"question": "Q?", "options": options, "answer_idx": 2},
        {"sent1": "Q?", **{f"ending{i}": text for i, text in enumerate(options)}, "label": 2},
    ]
    parsed = {parse_row(row, "line 3") for row in rows}
    assert parsed == {MedqaQuestion(id="3", question="Q?", options=tuple(options), gold="C")}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD = {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "A"}


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({k: v for k, v in GOOD.items() if k != "answer_idx"}, "line 2: no answer index ('answer_idx' is missing)"),
        ({**GOOD, "answer_idx": "E"}, "line 2: answer index answer_idx='E' is out of range"),
        ({**GOOD, "answer_idx": 4}, "line 2: answer index answer_idx=4 is out of range"),
        ({"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": -1}, "label=-1"),
        ({"prompt": "Q?", "choices": ["a", "b"]}, "line 2: unknown options layout"),
        ({**GOOD, "options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}}, "line 2: unknown options layout"),
        ({**GOOD, "options": {"A": "a", "B": "", "C": "c", "D": "d"}}, "line 2: option B is empty"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "medqa.jsonl", [GOOD, bad_row])
    with pytest.raises(MedqaError) as error:
        read_medqa(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_empty_benchmark_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(MedqaError, match="holds no questions: the benchmark would be empty"):
        read_medqa(path)
    with pytest.raises(MedqaError, match="no such file"):
        read_medqa(tmp_path / "missing.jsonl")
