"""medray.metrics: the callback's fields in real HF and TRL training runs on CPU, TensorBoard, the progress line,
the GPU memory arithmetic, and (slow) medray's gauges in the Prometheus text of a `ray start` head node."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import pad_rows

from medray.metrics import (
    GAUGES,
    TrainingMetricsCallback,
    count_params_for_mfu,
    gpu_memory_fields,
    progress_line,
)

MAX_STEPS = 6
EVAL_STEPS = 3
GPU_FIELDS = ("gpu_total_gb", "gpu_mem_reserved_before_gb", "gpu_peak_reserved_gb", "gpu_lora_mem_gb", "gpu_util_pct")


def token_rows(count: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """Rows of random token ids, 8 to 16 long, so every batch has padding."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(3, vocab_size, (8 + i % 9,), generator=generator).tolist()} for i in range(count)
    ]


def train_tiny(model_dir: str | Path, output_dir: str | Path, callback, tensorboard_dir: str | Path | None = None):
    """A real `transformers.Trainer` run of the tiny model on CPU: 6 steps, a log every step, an evaluation every 3."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    rows = token_rows(48, model.config.vocab_size)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=EVAL_STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    callbacks = [callback]
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(str(tensorboard_dir))))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows[:40]),
        eval_dataset=Dataset.from_list(rows[40:]),
        data_collator=pad_rows,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def train_entries(history: list[dict]) -> list[dict]:
    return [entry for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def hf_run(tiny_mistral_dir, tmp_path_factory):
    """One HF Trainer run with the callback (world size 2 declared, MFU inputs given) and TensorBoard after it."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("hf_run")
    n_params = count_params_for_mfu(AutoModelForCausalLM.from_pretrained(str(tiny_mistral_dir)))
    peak_flops = 6 * n_params * 1e3  # so that mfu = tokens_per_s_worker / 1000
    callback = TrainingMetricsCallback("unit-run", None, 0, 2, n_params, peak_flops, total_steps=MAX_STEPS)
    started = time.perf_counter()
    trainer = train_tiny(tiny_mistral_dir, folder / "out", callback, tensorboard_dir=folder / "tensorboard")
    return {"history": trainer.state.log_history, "folder": folder, "seconds": time.perf_counter() - started}


def test_every_training_log_gets_throughput_runtime_mfu_and_rss(hf_run):
    entries = train_entries(hf_run["history"])
    assert [entry["step"] for entry in entries] == list(range(1, MAX_STEPS + 1))
    for entry in entries:
        assert entry["tokens_per_s_total"] > 0
        assert entry["tokens_per_s_worker"] == pytest.approx(entry["tokens_per_s_total"] / 2, abs=0.1)
        assert entry["mfu"] == pytest.approx(entry["tokens_per_s_worker"] / 1000, abs=1e-4)
        assert 0 < entry["rss_gb"] < 64
        # The run average cannot beat tokens over wall time, evaluations included.
        # (train_runtime_s is rounded to 10 ms: allow that much time on top.)
        rounding_s = 0.005
        assert (
            entry["tokens_per_s_avg"] * (entry["train_runtime_s"] + rounding_s) >= entry["num_input_tokens_seen"] * 0.99
        )
    runtimes = [entry["train_runtime_s"] for entry in entries]
    assert runtimes == sorted(runtimes) and runtimes[0] > 0
    assert runtimes[-1] <= hf_run["seconds"]


def test_cpu_run_has_no_gpu_fields_and_evaluations_are_left_alone(hf_run):
    history = hf_run["history"]
    assert not [field for entry in history for field in entry if field.startswith("gpu_")]
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [EVAL_STEPS, MAX_STEPS]
    assert not [field for entry in evaluations for field in entry if field.startswith(("tokens_per_s", "rss"))]
    final = history[-1]
    assert "train_loss" in final and final["train_runtime_s"] >= train_entries(history)[-1]["train_runtime_s"]


def test_fields_reach_tensorboard_when_the_callback_comes_first(hf_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(hf_run["folder"] / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for field in ("loss", "tokens_per_s_total", "tokens_per_s_worker", "mfu", "rss_gb", "train_runtime_s"):
        assert f"train/{field}" in tags
    assert [event.step for event in events.Scalars("train/tokens_per_s_total")] == list(range(1, MAX_STEPS + 1))


def test_rank0_prints_one_progress_line_per_log(tiny_mistral_dir, tmp_path, capsys):
    train_tiny(tiny_mistral_dir, tmp_path / "rank0", TrainingMetricsCallback("r", rank=0))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[medray] ")]
    assert len(lines) == MAX_STEPS + MAX_STEPS // EVAL_STEPS + 1  # training logs, evaluations, the final summary
    assert lines[0].startswith("[medray] step 1/6 (17%) | loss ")
    assert " tok/s | " in lines[0] and "| ETA " in lines[0]
    assert "eval_loss" in lines[EVAL_STEPS] and "train_loss" in lines[-1] and "ETA" not in lines[-1]

    train_tiny(tiny_mistral_dir, tmp_path / "rank1", TrainingMetricsCallback("r", rank=1))
    assert "[medray]" not in capsys.readouterr().err


def test_trl_sft_trainer_counts_tokens_without_hf_token_counting(tiny_mistral_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_mistral_dir))
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(tiny_mistral_dir))
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        logging_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    callback = TrainingMetricsCallback("trl-run", world_size=1)
    rows = Dataset.from_list(token_rows(16, model.config.vocab_size))
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    entries = train_entries(trainer.state.log_history)
    assert len(entries) == 3
    assert all(entry["tokens_per_s_total"] > 0 and entry["num_tokens"] > 0 for entry in entries)


def test_gpu_memory_fields_follow_the_reference_arithmetic(monkeypatch):
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80 * gib}))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 30 * gib)
    fields = gpu_memory_fields(torch.device("cuda", 0), reserved_before=6 * gib)
    assert fields == {
        "gpu_total_gb": 80.0,
        "gpu_mem_reserved_before_gb": 6.0,
        "gpu_mem_reserved_before_pct": 7.5,
        "gpu_peak_reserved_gb": 30.0,
        "gpu_peak_reserved_pct": 37.5,
        "gpu_lora_mem_gb": 24.0,
        "gpu_lora_mem_pct": 30.0,
    }


def test_progress_line_eta_uses_this_sessions_pace():
    logs = {"loss": 1.23456, "learning_rate": 2e-4, "tokens_per_s_total": 812.4}
    line = progress_line(step=40, total=120, start_step=20, elapsed=60.0, logs=logs)
    assert line == "step 40/120 (33%) | loss 1.2346 | lr 2.00e-04 | 812 tok/s | elapsed 0:01:00 | ETA 0:04:00"
    assert progress_line(5, None, 0, 1.0, {}) == "step 5 | elapsed 0:00:01"


def test_four_bit_weights_count_unpacked():
    class Params4bit(torch.nn.Parameter):
        """Stands in for bitsandbytes' class: two 4-bit values per stored element."""

    model = torch.nn.Linear(4, 8, bias=True)
    assert count_params_for_mfu(model) == 40
    model.weight = Params4bit(torch.zeros(16, 1, dtype=torch.uint8), requires_grad=False)
    assert count_params_for_mfu(model) == 40


def test_callback_answers_every_trainer_event_and_nothing_else():
    callback = TrainingMetricsCallback("r")
    assert callback.on_step_end(None, None, None, model=None) is None
    assert callback.on_log(None, None, None, logs={"loss": 1.0}) is None  # before on_train_begin: ignored
    with pytest.raises(AttributeError):
        callback.not_an_event  # noqa: B018


DRIVER = """
import json, sys, ray

model_dir, out_dir, tests_dir = sys.argv[2:5]
ray.init(address=sys.argv[1], runtime_env={"env_vars": {"PYTHONPATH": tests_dir}})

@ray.remote(num_cpus=1)
class Worker:
    def train(self):
        from medray.metrics import TrainingMetricsCallback
        from test_metrics import train_tiny
        callback = TrainingMetricsCallback("prom-run", trial="trial_7", rank=0, world_size=1)
        return train_tiny(model_dir, out_dir, callback).state.log_history

worker = Worker.remote()  # kept alive (and its gauges exported) until the test closes our stdin
print("HISTORY " + json.dumps(ray.get(worker.train.remote())), flush=True)
sys.stdin.read()
"""


def scrape(url: str) -> dict[str, list]:
    """Prometheus text at `url`, parsed: metric name -> samples."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def wait_for_line(path: Path, prefix: str, process: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :]
        if process.poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"no {prefix!r} line from the driver:\n{path.read_text()[-4000:]}")


@pytest.mark.slow
def test_gauges_reach_the_head_nodes_prometheus_endpoint(tiny_mistral_dir, tmp_path):
    from raycluster import local_ray_cluster

    with local_ray_cluster(num_cpus=2) as cluster:
        log = tmp_path / "driver.log"
        command = [sys.executable, "-c", DRIVER, cluster.gcs_address, str(tiny_mistral_dir), str(tmp_path / "out")]
        command.append(str(Path(__file__).parent))
        with log.open("w") as output:
            driver = subprocess.Popen(
                command, env=cluster.env(), stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            history = json.loads(wait_for_line(log, "HISTORY ", driver, timeout_s=240))
            url = f"http://127.0.0.1:{cluster.ports['--metrics-export-port']}/metrics"
            expected = {
                "loss": train_entries(history)[-1]["loss"],
                "eval_loss": [entry for entry in history if "eval_loss" in entry][-1]["eval_loss"],
                "step": MAX_STEPS,
            }
            found = poll_gauges(url, expected, timeout_s=60)
        finally:
            driver.stdin.close()
            driver.wait(timeout=60)
    assert found["ray_medray_tokens_per_s_total"] > 0
    assert found["ray_medray_rss_gb"] > 0
    assert found["ray_medray_learning_rate"] > 0
    assert not [name for name in found if name.startswith("ray_medray_gpu_")]


def poll_gauges(url: str, expected: dict[str, float], timeout_s: float) -> dict[str, float]:
    """Scrape until every `medray_<key>` of `expected` carries the run's tags and the expected value (Ray exports
    every few seconds); return all medray gauges of the run."""
    tags = {"run": "prom-run", "trial": "trial_7", "rank": "0"}
    deadline = time.monotonic() + timeout_s
    found: dict[str, float] = {}
    while time.monotonic() < deadline:
        samples = scrape(url)
        found = {
            name: sample.value
            for name, family in samples.items()
            if name.startswith("ray_medray_")
            for sample in family
            if all(sample.labels.get(key) == value for key, value in tags.items())
        }
        if all(found.get(f"ray_medray_{key}") == pytest.approx(value) for key, value in expected.items()):
            assert set(found) <= {f"ray_medray_{key}" for key in GAUGES}
            return found
        time.sleep(2)
    raise AssertionError(f"medray gauges with tags {tags} and values {expected} not exported; found {found}")
