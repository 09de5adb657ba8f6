"""The benchmark's command line (`python jobs/benchmark.py ...`): one run, or --build, --measure-peak, --table, --merge.

See `benchmarks.bench` for the variants and what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from benchmarks.bench import PEAK_FILE, REPO_ROOT, run_medray, run_name, run_single
from benchmarks.bench import __doc__ as BENCH_DOC
from benchmarks.records import VARIANTS, append_record
from benchmarks.workload import FULL_LENGTH, build_model_dir, default_tokenizer_source, measure_peak_tflops


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/benchmark.py", description=BENCH_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_argument_group("modes (default: run one --variant)")
    mode.add_argument("--build", action="store_true", help="build --model-dir (random weights) and exit")
    mode.add_argument("--measure-peak", action="store_true", help="measure the matmul peak into --peak-file")
    mode.add_argument("--table", action="store_true", help="render --md from the records in --json")
    mode.add_argument("--merge", nargs="+", metavar="FILE", help="append the records of these JSON files to --json")
    run = parser.add_argument_group("run")
    run.add_argument("--variant", choices=sorted(VARIANTS), default="medray")
    run.add_argument("--gpus", type=int, default=1, help="Ray Train workers, one GPU each (medray only)")
    run.add_argument("--lengths", choices=["full", "real"], default="full")
    run.add_argument("--batch", type=int, default=4, help="per-device micro-batch (rows)")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--steps", type=int, default=None, help="optimizer steps (default 18; 4 with --cpu)")
    run.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; 1 with --cpu)")
    run.add_argument("--seq-len", type=int, default=None, help="max length (default 2048; 128 with --cpu)")
    run.add_argument("--model-dir", default=None, help="default /tmp/m7b (/tmp/medray_bench_tiny with --cpu)")
    run.add_argument(
        "--tokenizer",
        "--tokenizer-dir",
        dest="tokenizer",
        default=None,
        help="for --build: a tokenizer folder or Mistral's tokenizer.model (default: mistral-common's)",
    )
    run.add_argument("--json", default=None, help="append the record to this JSON list")
    run.add_argument("--cpu", action="store_true", help="CPU dry run: tiny model, hf backend, fp32")
    run.add_argument("--eval-rows", type=int, default=0, help="bare/peft: also time evaluation on N real rows")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--storage", default="/tmp/medray_bench", help="run.storage_path of medray runs")
    run.add_argument("--peak-file", default=PEAK_FILE, help="measured peak, reused by later runs")
    knob = parser.add_argument_group("real-length knobs (recorded in the JSON)")
    knob.add_argument(
        "--padding",
        choices=["auto", "padding_free", "padded"],
        default="auto",
        help="unsloth batch layout: padding-free rows (eager layers) or padded (compiled layers)",
    )
    knob.add_argument("--sort-lengths", action="store_true", help="sort each optimizer step's rows by length")
    knob.add_argument("--pad-multiple", type=int, default=None, help="pad micro-batches to a multiple of K tokens")
    knob.add_argument(
        "--env",
        action="append",
        default=[],
        type=_env_pair,
        metavar="KEY=VALUE",
        help="environment for the trainer processes, e.g. UNSLOTH_COMPILE_DISABLE=1 (repeatable)",
    )
    knob.add_argument(
        "--profile",
        action="store_true",
        help="run one more step under torch.profiler (untimed); its op table goes next to --json",
    )
    table = parser.add_argument_group("table")
    table.add_argument("--md", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    table.add_argument(
        "--extra-startup-s",
        type=float,
        default=0.0,
        help="projection: start-up the benchmark does not see (data preparation), in seconds",
    )
    return parser


def _env_pair(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"--env {text!r}: expected KEY=VALUE, e.g. UNSLOTH_COMPILE_DISABLE=1")
    return key, value


def resolve_defaults(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Fill the defaults that depend on `--cpu`, and check the combination."""
    args.steps = args.steps if args.steps is not None else (4 if args.cpu else 18)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3)
    args.seq_len = args.seq_len or (128 if args.cpu else FULL_LENGTH)
    args.model_dir = args.model_dir or ("/tmp/medray_bench_tiny" if args.cpu else "/tmp/m7b")
    args.json = args.json or (str(REPO_ROOT / "docs" / "benchmarks.json") if args.table or args.merge else None)
    args.command = "python jobs/benchmark.py " + shlex.join(argv)
    if args.variant != "medray" and args.gpus != 1:
        raise SystemExit(f"--gpus {args.gpus}: only the medray variant runs on more than one GPU")
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}")
    args.run_name = run_name(args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of jobs/benchmark.py; prints `RESULT {...}` for a run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_defaults(build_parser().parse_args(argv), argv)
    if args.table:
        from benchmarks.report import summary_text, write_report

        print(summary_text(args.json, extra_startup_s=args.extra_startup_s))
        print(f"wrote {write_report(args.json, args.md, extra_startup_s=args.extra_startup_s)}")
        return 0
    if args.merge:
        for source in args.merge:
            for record in json.loads(Path(source).read_text()):
                append_record(args.json, record)
        print(f"appended the records of {', '.join(args.merge)} to {args.json}")
        return 0
    if args.measure_peak:
        Path(args.peak_file).write_text(json.dumps(measure_peak_tflops(cuda=not args.cpu)))
        print(f"peak {Path(args.peak_file).read_text()}")
        return 0
    if args.build:
        source = args.tokenizer or default_tokenizer_source()
        print("BUILT", json.dumps(build_model_dir(args.model_dir, source, cpu=args.cpu)), flush=True)
        return 0
    os.environ.update(dict(args.env))  # before anything imports unsloth, torch.compile or Ray
    record = run_medray(args) if args.variant == "medray" else run_single(args)
    if args.json:
        append_record(args.json, record)
    short = {key: value for key, value in record.items() if key not in ("versions", "steps", "command")}
    print("RESULT", json.dumps(short), flush=True)
    print("STEPS", json.dumps(record["steps"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
