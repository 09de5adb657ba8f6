"""Inference speed of a tuned model through medray's public inference API: time to first token and tokens/s.

On a GPU: a random-weight Mistral with Mistral-7B v0.3's exact shape and tokenizer (the throughput benchmark's
`/tmp/m7b`, built here if missing), loaded 4-bit with a LoRA adapter (r=16 on all seven projections, zero-initialised
B, so the compute is a tuned model's) through `medray.inference.load_for_inference`: Unsloth's fast inference
(`FastLanguageModel.for_inference`). Greedy generation of `--max-new-tokens` tokens for the sample questions'
prompts (the training template), at batch 1 and 32, after one warm-up batch. Random weights almost never produce
EOS, so every row runs to `--max-new-tokens`; the figures are speed, not quality.

    python benchmarks/generate_speed.py --model-dir /tmp/m7b --tokenizer $TOK --json /tmp/generate_speed.json
    python benchmarks/generate_speed.py --cpu --json /tmp/g.json       # the CPU path on the tiny model (seconds)

Per batch size: time to first token (prefill + first step, median of the repeats), decode tokens/s per sequence
and for the whole batch ((new tokens - 1) x batch / time after the first token), end-to-end tokens/s, and peak GPU
memory. Prints a Markdown table; appends one JSON record per batch size to `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

from medray.config import MedrayConfig, load_config  # noqa: E402
from medray.inference import (  # noqa: E402
    GenerationSettings,
    RunArtifacts,
    build_prompt,
    generate_batch,
    load_for_inference,
)

SAMPLE = Path(__file__).resolve().parents[1] / "medray" / "sample_data" / "medical_o1_sample.jsonl"


def run_config(args: argparse.Namespace) -> MedrayConfig:
    """The run being served: the reference recipe's model settings (unsloth, 4-bit) on GPU, hf fp32 on CPU."""
    backend = (
        ["model.backend=hf", "model.load_in_4bit=false"]
        if args.cpu
        else ["model.backend=unsloth", "scaling.use_gpu=true"]
    )
    return load_config(None, [f"model.name={args.model_dir}", *backend, "lora.r=16", "lora.alpha=16"])


def make_adapter(cfg: MedrayConfig, folder: Path, cpu: bool, b_scale: float = 0.0) -> Path:
    """Save a fresh LoRA adapter of `cfg` for the base model. B = 0 by default (a tuned model's compute, the base's
    outputs); `b_scale` > 0 draws B from a seeded normal of that scale, so the adapter changes the outputs."""
    import torch

    from medray.model import load_model

    backend = "hf" if cpu else "unsloth"
    model, _ = load_model(cfg, backend, torch.device("cpu" if cpu else "cuda:0"))
    if b_scale:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_((torch.randn(param.shape, generator=generator) * b_scale).to(param.dtype))
    model.save_pretrained(str(folder))
    del model
    if not cpu:
        torch.cuda.empty_cache()
    return folder


def questions(count: int) -> list[str]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)]["Question"] for i in range(count)]


def measure(model, tokenizer, cfg: MedrayConfig, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Generate `args.repeats` batches of `batch` prompts; medians of the repeats."""
    import torch

    prompts = [build_prompt(cfg, question, tokenizer) for question in questions(batch)]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=batch)
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(args.repeats):
        generations = generate_batch(model, tokenizer, prompts, settings)
        seconds, first = generations[0].seconds, generations[0].first_token_s
        tokens = [item.new_tokens for item in generations]
        runs.append(
            {
                "first_token_s": first,
                "seconds": seconds,
                "new_tokens": sum(tokens),
                "decode_tokens_per_s": sum(count - 1 for count in tokens) / (seconds - first),
                "tokens_per_s": sum(tokens) / seconds,
                "stopped_at_eos": sum(item.stopped_at_eos for item in generations),
            }
        )
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    prompt_tokens = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    return {
        "batch": batch,
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1),
        "repeats": args.repeats,
        "first_token_s": round(median["first_token_s"], 4),
        "decode_tokens_per_s_per_sequence": round(median["decode_tokens_per_s"] / batch, 2),
        "decode_tokens_per_s": round(median["decode_tokens_per_s"], 2),
        "tokens_per_s": round(median["tokens_per_s"], 2),
        "seconds": round(median["seconds"], 3),
        "new_tokens": int(median["new_tokens"]),
        "stopped_at_eos": int(median["stopped_at_eos"]),
        "runs": runs,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
    }


def table(records: list[dict[str, Any]]) -> str:
    from medray.report import markdown_table

    header = ["batch", "time to first token", "decode tokens/s per sequence", "decode tokens/s", "end-to-end tokens/s"]
    rows = [
        [
            item["batch"],
            f"{item['first_token_s'] * 1000:.0f} ms",
            f"{item['decode_tokens_per_s_per_sequence']:.1f}",
            f"{item['decode_tokens_per_s']:.1f}",
            f"{item['tokens_per_s']:.1f}",
        ]
        for item in records
    ]
    return markdown_table(header, rows)


GENERATION_RECORDS = "generate_speed.jsonl"
"""The records' file, beside docs/benchmarks.json: one JSON line per batch size (`--json`)."""


def generation_section(path: str | Path) -> str | None:
    """docs/benchmarks.md's section for the newest measurement in a `--json` file (None when there is none)."""
    path = Path(path)
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    newest = [record for record in records if record["measured_at"] == records[-1]["measured_at"]]
    first = newest[0]
    versions = ", ".join(f"{name} {version}" for name, version in (first.get("versions") or {}).items() if version)
    return "\n".join(
        [
            "## Generation speed (`medray generate`'s inference path)",
            "",
            table(newest),
            "",
            f"- {first['device']}, {first['measured_at'][:10]}, backend {first['backend']} (4-bit base + LoRA adapter "
            f"r=16 on all seven projections), greedy, {first['max_new_tokens']} new tokens per row (random weights: no "
            f"row stops early), prompts of {first['prompt_tokens_mean']:.0f} tokens on average, median of "
            f"{first['repeats']} repeats after one warm-up batch; model load {first['load_s']} s; peak reserved "
            + ", ".join(f"{r['peak_reserved_gib']} GiB (batch {r['batch']})" for r in newest)
            + f". Versions: {versions}.",
            "- Command: `python benchmarks/generate_speed.py --model-dir /tmp/m7b --tokenizer $TOK "
            f"--json docs/{GENERATION_RECORDS} --repeats {first['repeats']}` (on the GPU; `$TOK`: the bundle's "
            "tokenizer.model).",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the tiny model on CPU (hf backend): a dry run")
    parser.add_argument("--model-dir", help="default /tmp/m7b (/tmp/medray_bench_tiny with --cpu); built if missing")
    parser.add_argument("--tokenizer", help="for building: Mistral's tokenizer.model or a tokenizer folder")
    parser.add_argument("--batches", default="1,32", help="batch sizes, comma-separated (default 1,32)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="append one JSON record per batch size to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.model_dir = args.model_dir or ("/tmp/medray_bench_tiny" if args.cpu else "/tmp/m7b")
    started = time.perf_counter()
    if not (Path(args.model_dir) / "config.json").is_file():
        from benchmarks.workload import build_model_dir, default_tokenizer_source

        built = build_model_dir(args.model_dir, args.tokenizer or default_tokenizer_source(), cpu=args.cpu)
        print("BUILT", json.dumps(built), flush=True)
    cfg = run_config(args)
    with tempfile.TemporaryDirectory(prefix="medray-adapter-") as scratch:
        adapter = make_adapter(cfg, Path(scratch) / "adapter", args.cpu)
        run = RunArtifacts(config=cfg, adapter_dir=adapter, base_model=cfg.model.name, run_dir=None)
        loaded = time.perf_counter()
        model, tokenizer = load_for_inference(run, device="cpu" if args.cpu else None)
        load_s = time.perf_counter() - loaded
        generate_batch(
            model, tokenizer, [build_prompt(cfg, "warm-up", tokenizer)], GenerationSettings(max_new_tokens=8)
        )
        records = [measure(model, tokenizer, cfg, int(batch), args) for batch in args.batches.split(",")]
    context = {"model_dir": args.model_dir, "backend": cfg.model.backend, "load_s": round(load_s, 1), **_device()}
    for record in records:
        record.update(context, measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        print("RESULT", json.dumps({key: value for key, value in record.items() if key != "runs"}), flush=True)
        if args.json:
            with open(args.json, "a") as file:
                file.write(json.dumps(record) + "\n")
    print(table(records))
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def _device() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu"}
    import importlib.metadata

    versions = {}
    for name in ("torch", "transformers", "peft", "unsloth"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"device": torch.cuda.get_device_name(0), "versions": versions}


if __name__ == "__main__":
    sys.exit(main())
