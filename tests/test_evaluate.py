"""`medray evaluate` on CPU: the log-likelihood maths against a direct forward pass, and one real run of the CLI on a
tiny trained run through the Ray Data actor pool (2 replicas), checking the records Parquet, summary.json, the report,
and that bad input fails before any model is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import MEDQA_TEST

from medray.cli import main
from medray.config import load_config
from medray.evaluate import EvaluationError, evaluate_run
from medray.inference import InferenceError
from medray.lm_scoring import choice_logliks, sequence_nll
from medray.medqa import MedqaError

LIMIT = 4


@pytest.fixture(scope="module")
def tiny_model(tiny_mistral_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_mistral_dir)).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_mistral_dir))


def direct_loglik(model, tokenizer, prompt: str, choice: str) -> float:
    context = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + choice)["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(log_probs[position - 1, whole[position]]) for position in range(len(context), len(whole)))


def test_choice_logliks_match_a_direct_forward_pass(tiny_model):
    model, tokenizer = tiny_model
    prompts = ["Question: Which vessel?\nAnswer:", "Question: A much longer question about the heart?\nAnswer:"]
    choices = [" A", " B", " aortic dissection"]  # single-token choices share one forward; a multi-token one not
    scores = choice_logliks(model, tokenizer, prompts, choices, micro_batch=2)
    for i, prompt in enumerate(prompts):
        for j, choice in enumerate(choices):
            assert scores[i][j] == pytest.approx(direct_loglik(model, tokenizer, prompt, choice), abs=1e-4)


def test_sequence_nll_matches_the_training_loss(tiny_model):
    model, _ = tiny_model
    rows = [
        {"input_ids": [1, 415, 1032, 349, 2], "labels": [-100, -100, 1032, 349, 2]},  # loss on the completion
        {"input_ids": [1, 22, 2], "labels": [1, 22, 2]},  # loss on every token
    ]
    scored = sequence_nll(model, rows, micro_batch=2)
    for row, (nll, tokens) in zip(rows, scored, strict=True):
        with torch.no_grad():
            loss = model(torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
        assert tokens == sum(label != -100 for label in row["labels"][1:])
        assert nll / tokens == pytest.approx(float(loss), abs=1e-4)


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def medqa_file(tmp_path_factory) -> Path:
    if not MEDQA_TEST.is_file():
        pytest.skip(f"{MEDQA_TEST} is missing: set MEDRAY_SHARED_DATA")
    return MEDQA_TEST


@pytest.fixture(scope="module")
def tiny_run(ray_local, tiny_mistral_dir, medqa_file, tmp_path_factory) -> Path:
    """`medray train eval.after_training=true`: a 3-step run, then held-out loss and MedQA by log-likelihood."""
    storage = tmp_path_factory.mktemp("runs")
    command = ["train", "--config", "tiny-test", f"model.name={tiny_mistral_dir}", f"run.storage_path={storage}"]
    evaluation = [
        "eval.after_training=true",
        f"eval.medqa={medqa_file}",
        f"eval.limit={LIMIT}",
        "eval.generation=false",
    ]
    assert main([*command, "train.max_steps=3", *evaluation, "eval.replicas=2"]) == 0
    return storage / "tiny-test"


@pytest.fixture(scope="module")
def after_training(tiny_run) -> dict:
    return json.loads((tiny_run / "summary.json").read_text())["evaluation"]


@pytest.fixture(scope="module")
def evaluated(tiny_run, medqa_file, after_training) -> Path:
    """`medray evaluate` on the same run: MedQA again, by log-likelihood and by generation, over 2 replicas."""
    command = [
        "evaluate",
        str(tiny_run),
        "--medqa",
        str(medqa_file),
        "--limit",
        str(LIMIT),
        "--no-validation",
        "--generation",
    ]
    options = ["--max-new-tokens", "6", "--replicas", "2", "--cpus-per-replica", "1", "--batch-size", "2"]
    assert main([*command, *options]) == 0
    return tiny_run


def test_train_with_eval_after_training_evaluates_the_run(after_training):
    assert set(after_training) == {"validation", "medqa_loglik"}  # eval.generation=false
    assert after_training["medqa_loglik"]["questions"] == LIMIT
    assert set(after_training["medqa_loglik"]["models"]) == {"base", "tuned"}


def test_slow_batches_are_not_cut_by_ray_datas_no_progress_limit(evaluated):
    """A batch of generations may outlast Ray Data's 30-minute no-progress limit (a 7B on CPU, a busy machine): seen
    on 2 loaded cores, where `ExecutionTimeoutError` ended an evaluation of SmolLM2 after 1,800 s of one batch."""
    import ray

    assert ray.data.DataContext.get_current().execution_no_progress_timeout_s == -1


def test_records_parquet_holds_every_question_model_and_method(evaluated):
    records = pd.read_parquet(evaluated / "evaluation_records.parquet")
    assert len(records) == LIMIT * 2 * 2  # questions x (base, tuned) x (loglik, generation)
    expected = {"question_id", "model", "method", "gold", "predicted", "correct", "generated", "new_tokens", "seconds"}
    assert expected <= set(records.columns)
    assert sorted(set(records["question_id"])) == [str(i) for i in range(LIMIT)]
    assert set(records["model"]) == {"base", "tuned"} and set(records["method"]) == {"loglik", "generation"}
    assert list(records[records["question_id"] == "0"]["gold"].unique()) == ["B"]  # the shared file's first gold
    loglik = records[records["method"] == "loglik"]
    assert loglik["predicted"].isin(list("ABCD")).all()
    assert (loglik["correct"] == (loglik["predicted"] == loglik["gold"])).all()
    generation = records[records["method"] == "generation"]
    assert ((generation["new_tokens"] >= 1) & (generation["new_tokens"] <= 6)).all()
    assert (records["seconds"] > 0).all()


def test_summary_holds_the_evaluation_section(evaluated, after_training):
    summary = json.loads((evaluated / "summary.json").read_text())
    evaluation = summary["evaluation"]
    assert set(evaluation) == {"validation", "medqa_loglik", "medqa_generation"}
    assert evaluation["validation"] == after_training["validation"]  # kept from the first evaluation
    # The same questions scored the same way by the same weights give the same answers.
    assert evaluation["medqa_loglik"]["models"] == after_training["medqa_loglik"]["models"]
    records = pd.read_parquet(evaluated / "evaluation_records.parquet")
    for method in ("loglik", "generation"):
        entry = evaluation[f"medqa_{method}"]
        assert entry["questions"] == LIMIT and entry["replicas"] == 2 and entry["device"] == "cpu"
        for model in ("base", "tuned"):
            mine = records[(records["method"] == method) & (records["model"] == model)]
            result = entry["models"][model]
            assert result["correct"] == int(mine["correct"].sum()) and result["questions"] == LIMIT
            assert result["ci95"][0] <= result["accuracy"] <= result["ci95"][1]
    assert "unparsable_share" in evaluation["medqa_generation"]["models"]["base"]
    validation = evaluation["validation"]
    assert validation["rows"] == summary["data"]["rows_validation"]
    for model in ("base", "tuned"):
        assert validation["models"][model]["perplexity"] == pytest.approx(
            2.718281828 ** validation["models"][model]["loss"], rel=1e-3
        )
    # The tuned model on the rebuilt held-out split is the model the run evaluated at its best step.
    assert validation["models"]["tuned"]["loss"] == pytest.approx(summary["metrics"]["best"]["eval_loss"], rel=0.02)
    assert validation["models"]["base"]["loss"] != validation["models"]["tuned"]["loss"]


def test_report_has_the_model_quality_table(evaluated):
    report = (evaluated / "report.md").read_text()
    assert "## Model quality" in report
    assert "| benchmark | figure | base | tuned |" in report
    assert "MedQA 4-option, log-likelihood (4 questions) | accuracy |" in report


def test_bad_input_fails_before_any_model(tiny_run, tmp_path, medqa_file, monkeypatch):
    import medray.evaluate_replica

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(medray.evaluate_replica, "load_for_inference", no_model)
    with pytest.raises(InferenceError, match="holds neither summary.json nor adapter_config.json"):
        evaluate_run(tmp_path)
    with pytest.raises(InferenceError, match="holds neither"):
        evaluate_run(tiny_run, adapters=[f"other={tmp_path}"])
    with pytest.raises(EvaluationError, match="the name 'tuned' is taken"):
        evaluate_run(tiny_run, adapters=[f"tuned={tiny_run}"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(medqa_file.read_text().splitlines()[0] + "\n" + '{"question": "Q?", "options": {"A": "a"}}\n')
    assert main(["evaluate", str(tiny_run), "--medqa", str(bad)]) == 2
    with pytest.raises(MedqaError, match=f"{bad}, line 2: unknown options layout"):
        evaluate_run(tiny_run, load_config(None, [f"eval.medqa={bad}"]).eval)
    with pytest.raises(EvaluationError, match="nothing to evaluate"):
        evaluate_run(tiny_run, load_config(None, ["eval.validation=false"]).eval)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("checkpoint_*"))
    summary = json.loads((copy / "summary.json").read_text())
    summary["best_checkpoint"] = summary["latest_checkpoint"] = str(copy / "checkpoint_gone" / "checkpoint")
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InferenceError, match="holds no adapter: no adapter_config.json at its recorded checkpoints"):
        evaluate_run(copy)
