"""The throughput benchmark on CPU: its rows, the step timer's arithmetic, the Markdown report and the projection.

The GPU figures themselves come from tests/gpu/run.sh and run_real.sh; here the tiny model stands in (slow tier).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import bench, cli, records, workload
from benchmarks import report as bench_report
from benchmarks.steptimer import count_real_tokens, make_step_timer, step_table, summarize
from medray.config import MedrayConfig, TrainArgs, load_config
from medray.worker import _batch_layout


def parse(argv: list[str]):
    return cli.resolve_defaults(cli.build_parser().parse_args(argv), argv)


# ---------------------------------------------------------------------------------------------------- rows


def test_full_rows_are_max_length_random_ids_after_bos():
    rows = workload.make_rows(6, "full", 2048)
    for row in rows:
        ids = np.asarray(row["input_ids"])
        assert row["length"] == ids.size == 2048
        assert ids[0] == 1 and ids[1:].min() >= 1000 and ids.max() < 32000  # never the pad id 0


def test_real_rows_have_the_real_length_distribution():
    lengths = np.array([row["length"] for row in workload.make_rows(5000, "real", 2048)])
    assert lengths.min() >= 300 and lengths.max() <= 1423
    assert abs(lengths.mean() - 892) < 8
    assert abs(np.percentile(lengths, 90) - 1119) < 15  # 892 + 1.2816 x 177
    assert abs(lengths.std() - 177) < 8
    assert all(len(row["input_ids"]) == row["length"] for row in workload.make_rows(50, "real", 2048))


def test_real_rows_are_the_recipes_rows():
    """shared/gpu/bench_7b_batch.py drew 80 rows (batch 4) and 296 rows (batch 16) with seed 0 (its README rounds
    the p90 of the 80 to 1151)."""
    assert workload.length_stats(r["length"] for r in workload.make_rows(80, "real", 2048)) == {
        "n": 80, "mean": 913.3, "median": 910.0, "p90": 1150.6, "min": 480, "max": 1246,
    }  # fmt: skip
    stats = workload.length_stats(r["length"] for r in workload.make_rows(296, "real", 2048))
    assert (stats["mean"], stats["median"], stats["p90"], stats["min"], stats["max"]) == (885.8, 878.5, 1126, 342, 1423)


def test_real_rows_are_seeded_and_scale_with_the_max_length():
    assert workload.make_rows(20, "real", 2048, seed=3) == workload.make_rows(20, "real", 2048, seed=3)
    assert workload.make_rows(20, "real", 2048, seed=3) != workload.make_rows(20, "real", 2048, seed=4)
    lengths = [row["length"] for row in workload.make_rows(2000, "real", 128)]
    assert min(lengths) >= 19 and max(lengths) <= 89  # [300, 1423] x 128 / 2048
    assert abs(np.mean(lengths) - 892 * 128 / 2048) < 1


def test_group_by_length_sorts_each_step_and_keeps_its_rows():
    rows = workload.make_rows(12, "real", 2048)
    grouped = workload.group_by_length(rows, step_rows=4)
    for start in range(0, 12, 4):
        step, original = grouped[start : start + 4], rows[start : start + 4]
        assert sorted(map(id, step)) == sorted(map(id, original))
        assert [row["length"] for row in step] == sorted((row["length"] for row in original), reverse=True)


def test_parameter_count_of_the_7b_shape_and_of_a_built_model():
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    assert workload.count_parameters(workload.MISTRAL_7B_V03) == 7_248_023_552
    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**workload.TINY_MISTRAL))
    assert workload.count_parameters(workload.TINY_MISTRAL) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- step timer


def timeline(seconds, tokens, graphs=None, profiled=()):
    """Step records as the timer writes them, from per-step durations."""
    records, clock = [], 100.0
    for index, (duration, count) in enumerate(zip(seconds, tokens, strict=True)):
        record = {"step": index + 1, "t_start": clock, "t_end": clock + duration, "tokens": count}
        record["graphs"] = graphs[index] if graphs else None
        if index + 1 in profiled:
            record.update(profiled=True, kernel_s=0.5)
        records.append(record)
        clock += duration
    return records


def test_summarize_times_the_steps_after_the_warmup():
    records = timeline([5.0, 1.0, 2.0, 1.0, 1.0, 3.0], [100, 1000, 1000, 2000, 1000, 500], [6, 6, 6, 7, 7, 7], {6})
    summary = summarize(records, warmup=1)
    assert summary["steps_timed"] == 4  # steps 2-5; step 6 was profiled
    assert summary["tokens_timed"] == 5000
    assert summary["elapsed_s"] == pytest.approx(5.0)
    assert summary["tokens_per_s"] == pytest.approx(1000.0)
    assert summary["tokens_per_s_steady"] == pytest.approx(1000.0)  # median of 1000, 500, 2000, 1000
    assert (summary["s_per_step_mean"], summary["s_per_step_median"]) == pytest.approx((1.25, 1.0))
    assert (summary["s_per_step_min"], summary["s_per_step_max"]) == pytest.approx((1.0, 2.0))
    assert summary["new_graphs"] == 1  # 6 after the warm-up step, 7 at the last timed step
    assert summary["loop_s"] == pytest.approx(13.0)


def test_summarize_without_counts_or_timed_steps():
    summary = summarize(timeline([1.0, 2.0, 2.0], [None, None, None]), warmup=1)
    assert summary["tokens_per_s"] is None and summary["tokens_timed"] is None
    assert summary["s_per_step_mean"] == pytest.approx(2.0) and summary["new_graphs"] is None
    with pytest.raises(ValueError, match="none left to time after 3 warm-up"):
        summarize(timeline([1.0, 1.0, 1.0], [1, 1, 1]), warmup=3)


def test_step_table_is_compact():
    table = step_table(timeline([1.5, 0.25], [10, 20], [0, 0], profiled={2}))
    assert table == [[1, 1.5, 10, 0], [2, 0.25, 20, 0, {"profiled": True, "kernel_s": 0.5}]]


def test_count_real_tokens_of_every_batch_form():
    assert count_real_tokens([{"input_ids": [1, 5, 6]}, {"input_ids": [1, 7]}]) == 5
    assert count_real_tokens({"input_ids": np.array([np.arange(3), np.arange(4)], dtype=object)}) == 7
    assert count_real_tokens({"input_ids": [[1, 2]], "length": np.array([30, 12])}) == 42
    assert count_real_tokens(np.ones((4, 16))) == 64


def test_step_timer_pairs_every_step_with_its_micro_batches(tmp_path):
    timer = make_step_timer(sync_cuda=False, grad_accum=2, profile_step=3, profile_path=str(tmp_path / "p.txt"))
    state = SimpleNamespace(global_step=0)
    timer.on_train_begin(None, state, None)
    for rows in ([{"input_ids": [1] * 5}], {"input_ids": [[1] * 3]}, {"input_ids": [], "length": [4]}):
        timer.count_tokens(rows)  # the loader runs ahead: three micro-batches queued before step 1 ends
    state.global_step = 1
    timer.on_step_end(None, state, None)
    timer.count_tokens({"length": [6, 1]})
    state.global_step = 2
    timer.on_step_end(None, state, None)
    state.global_step = 2
    timer.on_step_begin(None, state, None)  # step 3 is profiled, and nobody counted its rows
    state.global_step = 3
    timer.on_step_end(None, state, None)
    assert [(r["step"], r["tokens"]) for r in timer.records] == [(1, 8), (2, 11), (3, None)]
    assert all(r["t_end"] >= r["t_start"] for r in timer.records)
    assert timer.records[1]["t_start"] == timer.records[0]["t_end"]
    assert timer.records[2]["profiled"] and (tmp_path / "p.txt").is_file()


# ---------------------------------------------------------------------------------------------------- config


def test_gpu_run_config_is_the_reference_recipe_at_benchmark_size():
    args = parse(["--variant", "medray", "--gpus", "2", "--lengths", "real", "--batch", "8", "--steps", "20"])
    cfg = load_config(None, bench.bench_overrides(args))
    assert (cfg.model.name, cfg.model.backend, cfg.model.load_in_4bit, cfg.model.dtype) == (
        "/tmp/m7b", "unsloth", True, "bfloat16",
    )  # fmt: skip
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, len(cfg.lora.target_modules)) == (16, 16, 0.0, 7)
    assert (cfg.train.per_device_batch_size, cfg.train.gradient_accumulation_steps, cfg.train.max_steps) == (8, 1, 20)
    assert (cfg.train.optim, cfg.train.precision, cfg.data.max_length, cfg.data.validation_fraction) == (
        "adamw_8bit", "bf16", 2048, 0.0,
    )  # fmt: skip
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu) == (2, True)
    assert cfg.run.storage_path == "/tmp/medray_bench" and cfg.run.name.startswith("bench-medray-real-b8x1-g2-")
    assert records.rows_needed(args) == 8 * 1 * 2 * 22


def test_cpu_run_config_and_profile_step():
    args = parse(["--cpu", "--variant", "bare", "--profile"])
    cfg = load_config(None, bench.bench_overrides(args))
    assert (cfg.model.backend, cfg.model.load_in_4bit, cfg.train.optim, cfg.train.precision) == (
        "hf", False, "adamw_torch", "fp32",
    )  # fmt: skip
    assert (args.steps, args.warmup, args.seq_len, cfg.train.max_steps) == (4, 1, 128, 5)  # + the profiled step


def test_knobs_become_config_options_and_sft_values():
    args = parse(["--padding", "padded", "--sort-lengths", "--pad-multiple", "64", "--env", "A=1", "--env", "B=x=y"])
    assert bench.knob_overrides(args) == ["train.padding=padded", "train.length_grouping=true",
                                          "train.pad_to_multiple_of=64"]  # fmt: skip
    assert _batch_layout(load_config(None, bench.bench_overrides(args)).train) == {
        "padding_free": False,
        "pad_to_multiple_of": 64,
    }
    assert records.knobs(args)["env"] == {"A": "1", "B": "x=y"}
    assert _batch_layout(load_config(None, bench.bench_overrides(parse([]))).train) == {}
    assert bench.knob_overrides(parse([])) == []


@pytest.mark.skipif("padding" not in TrainArgs.model_fields, reason="needs the train.padding config options")
def test_knob_overrides_are_valid_config():
    args = parse(["--padding", "padded", "--sort-lengths", "--pad-multiple", "128"])
    cfg = load_config(None, bench.bench_overrides(args))
    assert isinstance(cfg, MedrayConfig)
    assert (cfg.train.padding, cfg.train.length_grouping, cfg.train.pad_to_multiple_of) == ("padded", True, 128)


def test_bad_combinations_are_refused():
    with pytest.raises(SystemExit, match="only the medray variant"):
        parse(["--variant", "bare", "--gpus", "2"])
    with pytest.raises(SystemExit, match="no timed step"):
        parse(["--steps", "3", "--warmup", "3"])


# ---------------------------------------------------------------------------------------------------- report


def record(variant, lengths, batch, rate, *, gpus=1, grad_accum=1, peak=6.0, total=None, **extra):
    """A benchmark record with the fields the report reads."""
    fields = {
        "name": records.VARIANTS[variant] + (f", {gpus} GPU" if variant == "medray" else ""),
        "variant": variant,
        "gpus": gpus,
        "batch": batch,
        "grad_accum": grad_accum,
        "lengths": lengths,
        "seq_len": 2048,
        "tokens_per_s_per_gpu": rate,
        "tokens_per_s_total": total or rate * gpus,
        "tokens_per_s_steady": rate,
        "peak_reserved_gb": peak,
        "mfu": 6 * 7.248e9 * rate / 790e12,
        "s_per_step": 0.75,
        "s_per_step_min": 0.74,
        "s_per_step_max": 0.77,
        "steps_timed": 15,
        "warmup": 3,
        "new_graphs_timed": 0,
        "warmup_extra_s": None,
        "knobs": {"padding": "auto", "sort_lengths": False, "pad_multiple": None, "env": {}, "profile": False},
        "n_params": 7_248_023_552,
        "peak_tflops": 790.1,
        "date": "2026-11-30",
        "gpu": "NVIDIA H200",
        "versions": {"torch": "2.11.0+cu130", "unsloth": "2026.10.9"},
        "command": f"python jobs/benchmark.py --variant {variant} --lengths {lengths} --batch {batch}",
        "steps": [[step, 0.75, 8192, 0] for step in range(1, 19)],
    }
    fields.update(extra)
    return fields


@pytest.fixture
def fixture_records():
    padded = {"padding": "padded", "sort_lengths": True, "pad_multiple": 64, "env": {}, "profile": False}
    return [
        record("medray", "full", 4, 9000.0, peak=9.0),  # replaced by the re-run below
        record("medray", "full", 4, 10840.4, peak=6.39, startup={"startup_s": 95.0}),
        record("medray", "full", 4, 10645.0, gpus=2, peak=6.53, total=21290.1),
        record("bare", "full", 4, 10817.7, peak=6.11),
        record("bare", "full", 16, 11090.5, peak=10.49),
        record("peft", "full", 4, 6254.1, peak=12.60),
        record("bare", "real", 16, 9316.2, eval={"rows": 64, "tokens": 57000, "s": 1.9, "tokens_per_s": 30000.0}),
        record("medray", "real", 4, 7742.0, grad_accum=4, startup={"startup_s": 100.0}),
        record("medray", "real", 4, 9800.0, grad_accum=4, knobs=padded, startup={"startup_s": 100.0}),
        record("medray", "real", 16, 10000.0, startup={"startup_s": 100.0}, warmup_extra_s=20.0),
        record("medray", "real", 8, 9800.0, gpus=2, startup={"startup_s": 120.0}, warmup_extra_s=25.0),
        record("bare", "real", 4, 9700.0, grad_accum=4, peak=5.9),
        record("medray", "full", 4, 10900.0, grad_accum=4),
        record("bare", "full", 4, 11000.0, grad_accum=4),
        REFERENCE_RECORD,
    ]


REFERENCE_RECORD = {
    "variant": "reference_run",
    "gpus": 1,
    "batch": 4,
    "grad_accum": 4,
    "measured_steps": 200,
    "measured_seconds": 300.0,
    "step_seconds": 1.45,
    "warmup_extra_seconds": 10.0,
    "eval_seconds": 60.0,
    "eval_rows": 1971,
    "checkpoint_seconds": 2.0,
    "startup_seconds": 90.0,
    "projected_minutes": 34.2,
    "batch_layout": "padding_free",
    "row_lengths": {"n": 500, "mean": 888.0, "median": 880.0, "p90": 1129.0, "min": 343, "max": 1424},
    "padding_free_off_printed": False,
    "date": "2026-12-03",
    "gpu": "NVIDIA H200",
    "command": "python benchmarks/reference_run.py --model-dir /tmp/m7b",
}


def test_report_tables_floors_and_projection(tmp_path, fixture_records):
    source = tmp_path / "benchmarks.json"
    source.write_text(json.dumps(fixture_records))
    text = bench_report.write_report(source, tmp_path / "benchmarks.md").read_text()

    full, real = text.split("## Full rows")[1].split("## Real-length rows")
    assert "| (a) medray: Ray Train worker, unsloth backend, 1 GPU | 1 | 4 x 1 | 10,840 | 10,840 |" in full
    assert "9,000" not in full  # the older medray record was replaced
    assert "| (c) transformers + peft + bitsandbytes, gradient checkpointing | 1 | 4 x 1 | 6,254 |" in full
    assert "| 4 x 4 | 9,800 | 9,800 | 9,800 | 6.00 |" in real and "padded, sorted, pad 64 |" in real
    floors = text.split("## Floors")[1]
    assert "| (a) 1 GPU / (b), tokens/s per GPU, full rows | 1.002 | >= 0.98 | pass |" in floors
    assert "| (a) 2 GPUs / (b), tokens/s per GPU, full rows | 0.984 | >= 0.98 | pass |" in floors
    assert "| (a) / (c), tokens/s, full rows | 1.733 | >= 1.7 | pass |" in floors
    assert "| (a) / (c), peak reserved memory | 0.507 | <= 0.5 | **FAIL** |" in floors
    assert "| (a) 2 GPUs / 1 GPU, total tokens/s | 1.964 | >= 1.94 | pass |" in floors
    real_4x4 = "real rows 4 x 4: medray real 4x4 (padded, sorted, pad 64)"
    assert f"| (a) / (b), tokens/s, {real_4x4} | 1.010 | >= 1.0 | pass |" in floors
    assert f"| (a) / (b), peak reserved, {real_4x4} | 1.017 | <= 1.05 | pass |" in floors
    assert "| (a) real rows 4 x 4 / (a) full rows micro-batch 4, tokens/s | 0.899 | >= 0.9 | **FAIL** |" in floors
    assert "| (a) / (b), tokens/s, real rows 16 x 1: medray real 16x1 (default) | 1.073 | >= 1.0 | pass |" in floors
    assert "| (a) real rows 16 x 1 / (a) full rows micro-batch 4, tokens/s | 0.917 | >= 0.9 | pass |" in floors
    assert "| (a) / (b), tokens/s, full rows 4 x 4 | 0.991 | >= 0.98 | pass |" in floors
    measured = text.split("## Reference run measured through `medray train` (1 GPU)")[1].split("## Projected")[0]
    assert "| **full run, projected** | **34.2 min** | floor 30, goal 25 |" in measured
    assert "| evaluation of 1,971 rows | 60 s | 5 x |" in measured
    assert "Floor (<= 30 min on one GPU): **FAIL**" in measured
    projection = text.split("## Projected reference run")[1]
    # 1 GPU: 17,733 x 892 / 10,000 + 20 = 1,601.8 s; eval 8,790,660 / 30,000 = 293.0 s; start-up 100 s
    assert "| total | **33.2 min (1,995 s)** | **18.3 min (1,099 s)** |" in projection
    assert "| optimizer steps | 1,108 | 1,108 |" in projection
    assert "| result | **FAIL** | **FAIL** |" in projection
    assert "measured: bare real 16x1 (default), 64 rows" in projection


def test_projection_estimates_evaluation_when_none_was_measured(fixture_records):
    records = [r for r in fixture_records if "eval" not in r]
    found, how = bench_report.projections(bench_report.latest(records))
    assert how.startswith("estimate")
    one = found[0]
    assert one["eval_s"] == pytest.approx(5 * 1971 * 892 / 3 / 10000.0)
    assert one["total_s"] == pytest.approx(17733 * 892 / 10000.0 + 20 + one["eval_s"] + 100)
    assert one["passed"] is False


def test_empty_report_and_summary(tmp_path, fixture_records):
    assert "No throughput records yet" in bench_report.render([])
    assert "## Reference run measured" in bench_report.render([REFERENCE_RECORD])
    source = tmp_path / "b.json"
    source.write_text(json.dumps(fixture_records))
    summary = bench_report.summary_text(source)
    assert "FLOOR (a) / (c), peak reserved memory: 0.507 <= 0.5 **FAIL**" in summary
    assert summary.count("PROJECTION") == 2


def test_append_and_merge_records(tmp_path):
    first, merged = tmp_path / "a.json", tmp_path / "docs" / "b.json"
    records.append_record(first, {"n": 1})
    records.append_record(first, {"n": 2})
    assert json.loads(first.read_text()) == [{"n": 1}, {"n": 2}]
    assert cli.main(["--merge", str(first), "--json", str(merged)]) == 0
    assert json.loads(merged.read_text()) == [{"n": 1}, {"n": 2}]


# ---------------------------------------------------------------------------------------------------- CPU dry runs


def run_dry(tmp_path, model_dir, *extra):
    """One CPU dry run through jobs/benchmark.py's main; returns its record."""
    output = tmp_path / "records.json"
    argv = ["--cpu", "--model-dir", str(model_dir), "--json", str(output), "--peak-file", str(tmp_path / "peak.json")]
    argv += ["--storage", str(tmp_path / "runs"), "--lengths", "real", "--batch", "2", "--grad-accum", "2", *extra]
    assert cli.main(argv) == 0
    return json.loads(output.read_text())[-1]


def expected_step_tokens(record):
    """Real tokens of each optimizer step, from the rows the run drew (one worker: in order)."""
    lengths = [row["length"] for row in workload.make_rows(100, "real", 128)]
    step_rows = record["batch"] * record["grad_accum"]
    return [sum(lengths[i : i + step_rows]) for i in range(0, step_rows * len(record["steps"]), step_rows)]


@pytest.mark.slow
def test_bare_dry_run_counts_every_real_token(tmp_path, tiny_mistral_dir):
    record = run_dry(tmp_path, tiny_mistral_dir, "--variant", "bare", "--eval-rows", "4")
    assert (record["variant"], record["backend"], record["steps_timed"]) == ("bare", "hf", 3)
    assert [step[2] for step in record["steps"]] == expected_step_tokens(record)
    assert record["tokens_timed"] == sum(step[2] for step in record["steps"][1:])
    assert record["tokens_per_s_per_gpu"] > 0 and record["eval"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_medray_dry_run_through_the_driver_and_worker(tmp_path, tiny_mistral_dir):
    record = run_dry(tmp_path, tiny_mistral_dir, "--variant", "medray")
    assert (record["variant"], record["backend"], record["gpus"]) == ("medray", "hf", 1)
    assert [step[2] for step in record["steps"]] == expected_step_tokens(record)
    assert record["startup"]["startup_s"] > 0 and record["startup"]["fit_s"] > record["startup"]["train_loop_s"]


# ---------------------------------------------------------------------------------------------------- reference run


def _progress(step: int, seconds: int, loss: str = "loss 2.0") -> str:
    elapsed = f"0:{seconds // 60:02d}:{seconds % 60:02d}"
    return f"(RayTrainWorker pid=1) [medray] step {step}/200 (5%) | {loss} | lr 1e-4 | elapsed {elapsed}"


def test_reference_parts_from_a_console_log():
    from benchmarks.reference_run import measure_log, project

    lines = [_progress(step, 30 + step * 2) for step in range(10, 101, 10)] + [_progress(100, 260, "eval_loss 1.9")]
    parts = measure_log("\n".join(lines + ["summary: /gone/summary.json"]), wall_s=330.0)
    assert parts["measured_steps"] == 100 and parts["measured_seconds"] == 230
    assert parts["step_seconds"] == 2.0 and parts["warmup_extra_seconds"] == 30  # step 20 at 70 s = 20 x 2 + 30
    assert parts["eval_seconds"] == 30 and parts["loop_seconds"] == 260 and parts["startup_seconds"] == 70
    seconds = 70 + 30 + 1108 * 2.0 + 5 * 30
    assert project(parts)["projected_minutes"] == round(seconds / 60, 1)
    with pytest.raises(RuntimeError, match="no evaluation"):
        measure_log("\n".join(lines[:-1]), wall_s=330.0)


def test_reference_record_from_the_committed_h200_log(tmp_path, tiny_mistral_dir):
    """docs/benchmarks.json's reference-run record is what the script derives from the committed log."""
    from benchmarks import reference_run

    out, docs = tmp_path / "records.json", Path(__file__).resolve().parents[1] / "docs"
    argv = ["--model-dir", str(tiny_mistral_dir), "--from-log", str(docs / "logs/reference_run_2026-12-03.log")]
    argv += ["--wall-seconds", "533", "--versions-from", str(docs / "logs/side1_bare_real_4x4_2026-12-03.json")]
    assert reference_run.main([*argv, "--date", "2026-12-03", "--json", str(out)]) == 0
    record = json.loads(out.read_text())[-1]
    committed = [r for r in json.loads((docs / "benchmarks.json").read_text()) if r["variant"] == "reference_run"][-1]
    for key in ("measured_steps", "step_seconds", "eval_seconds", "startup_seconds", "projected_minutes", "eval_rows"):
        assert record[key] == committed[key]
    assert record["measured_steps"] == 200 and record["eval_rows"] == 1971 and record["gpu"] == "NVIDIA H200"
    assert record["padding_free_off_printed"] is False


def test_generation_speed_records_get_their_section(tmp_path, fixture_records):
    source = tmp_path / "benchmarks.json"
    source.write_text(json.dumps(fixture_records))
    assert "## Generation speed" not in bench_report.write_report(source, tmp_path / "a.md").read_text()
    common = {"max_new_tokens": 256, "prompt_tokens_mean": 169.0, "repeats": 2, "load_s": 7.5, "backend": "unsloth"}
    common |= {"device": "NVIDIA H200", "versions": {"torch": "2.11.0"}, "decode_tokens_per_s_per_sequence": 17.5}
    older = {**common, "batch": 1, "first_token_s": 9.0, "decode_tokens_per_s": 1.0, "tokens_per_s": 1.0}
    rows = [{**older, "peak_reserved_gib": 4.0, "measured_at": "2026-12-02T10:00:00Z"}]
    for batch, rate in ((1, 17.5), (32, 507.6)):
        rows.append(
            {**common, "batch": batch, "first_token_s": 0.879, "decode_tokens_per_s": rate, "tokens_per_s": rate}
        )
        rows[-1] |= {"peak_reserved_gib": 4.43, "measured_at": "2026-12-03T17:24:56Z"}
    (tmp_path / "generate_speed.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = bench_report.write_report(source, tmp_path / "b.md").read_text()
    section = text[text.index("## Generation speed") : text.index("## Commands")]
    assert "| 1 | 879 ms | 17.5 | 17.5 | 17.5 |" in section and "| 32 | 879 ms | 17.5 | 507.6 | 507.6 |" in section
    assert "9000 ms" not in section and "NVIDIA H200, 2026-12-03" in section  # only the newest measurement
