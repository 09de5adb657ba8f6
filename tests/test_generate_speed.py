"""The GPU inference-speed script's CPU path (benchmarks/generate_speed.py) on the tiny model: one record per batch
size, with token counts and timings that agree with each other."""

from __future__ import annotations

import json

from benchmarks.generate_speed import main


def test_cpu_path_writes_one_consistent_record_per_batch(tiny_mistral_dir, tmp_path, capsys):
    out = tmp_path / "speed.jsonl"
    args = ["--cpu", "--model-dir", str(tiny_mistral_dir), "--batches", "1,2", "--max-new-tokens", "5"]
    assert main([*args, "--repeats", "1", "--json", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [record["batch"] for record in records] == [1, 2]
    for record in records:
        assert record["new_tokens"] == 5 * record["batch"] and record["stopped_at_eos"] == 0  # random weights
        assert 0 < record["first_token_s"] < record["seconds"]
        assert record["decode_tokens_per_s"] > 0 and record["tokens_per_s"] > 0
        assert record["device"] == "cpu" and record["backend"] == "hf"
    table = capsys.readouterr().out
    assert "| batch | time to first token |" in table and "\n| 2 |" in table
