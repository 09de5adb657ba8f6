"""`medray generate` through the CLI on the tiny run: one streamed question, a questions file in batches, and bad
input (a questions file with a bad row, a run folder without an adapter) failing before any model loads."""

from __future__ import annotations

import json
import shutil

import pytest

import medray.generate
from medray.cli import main
from medray.generate import read_questions
from medray.inference import InferenceError


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load fails the test: bad input must be caught before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(medray.generate, "load_for_inference", refuse)


def test_one_question_streams_and_prints_speed(tiny_run_dir, capsys):
    assert main(["generate", str(tiny_run_dir), "What causes chest pain?", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    streamed, speed = out.rstrip("\n").rsplit("\n", 1)
    assert streamed.strip()  # the tokens came out before the speed line
    assert speed.startswith("6 tokens in ") and "first token after" in speed and "hit max_new_tokens" in speed


def test_questions_file_gives_one_answer_line_per_row(tiny_run_dir, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    rows = [{"Question": "What causes chest pain?", "id": "a"}, {"Question": "Why jaundice?"}, {"Question": "Fever?"}]
    questions.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    output = tmp_path / "out" / "answers.jsonl"
    args = ["--questions", str(questions), "--output", str(output), "--max-new-tokens", "4", "--batch-size", "2"]
    assert main(["generate", str(tiny_run_dir), *args]) == 0
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert [answer["row"] for answer in answers] == [1, 2, 3]
    assert [answer["question"] for answer in answers] == [row["Question"] for row in rows]
    assert answers[0]["id"] == "a" and "id" not in answers[1]
    assert all(answer["new_tokens"] == 4 and answer["stopped_at_eos"] is False for answer in answers)
    assert {"reasoning", "answer", "seconds", "first_token_s"} <= set(answers[0])
    out = capsys.readouterr().out
    assert "generated 2/3" in out and "generated 3/3" in out and f"3 answers (0 ended with EOS): {output}" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"Question": "ok"}\n{"Question": ""}\n', "line 2: 'Question' must be a non-empty string"),
        (
            '{"Question": "ok"}\n\n{"question": "lower case"}\n',
            "line 3: 'Question' must be a non-empty string (missing)",
        ),
        ('{"Question": "ok"}\n{"Question": "a",\n', "line 2: not valid JSON"),
        ('["Question"]\n', "line 1: expected a JSON object"),
        ("\n\n", "holds no rows"),
    ],
)
def test_bad_questions_file_names_file_and_row_before_loading(
    tiny_run_dir, tmp_path, capsys, no_model_loading, content, message
):
    questions = tmp_path / "q.jsonl"
    questions.write_text(content)
    args = ["generate", str(tiny_run_dir), "--questions", str(questions), "--output", str(tmp_path / "o.jsonl")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("medray: error: ") and str(questions) in error and message in error
    assert "Traceback" not in error


def test_run_without_adapter_fails_before_loading(tiny_run_dir, tmp_path, capsys, no_model_loading):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tiny_run_dir / "summary.json", run_dir)  # its checkpoint is not in this folder
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["best_checkpoint"] = str(tmp_path / "gone" / "checkpoint_000001" / "checkpoint")
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert main(["generate", str(run_dir), "a question"]) == 2
    assert f"medray: error: {run_dir} holds no adapter" in capsys.readouterr().err


def test_one_mode_at_a_time(tiny_run_dir, tmp_path, capsys, no_model_loading):
    assert main(["generate", str(tiny_run_dir)]) == 2
    assert main(["generate", str(tiny_run_dir), "q", "--eos-check"]) == 2
    assert main(["generate", str(tiny_run_dir), "--questions", str(tmp_path / "q.jsonl")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith('medray: error: give one of: a "question"')
    assert errors[2] == "medray: error: --questions needs --output OUT.jsonl (where the answers go)"


def test_read_questions_uses_the_runs_question_column(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"prompt": "Why?"}\n')
    assert read_questions(questions, "prompt") == [{"prompt": "Why?"}]
    with pytest.raises(InferenceError, match="does not exist"):
        read_questions(tmp_path / "missing.jsonl")
