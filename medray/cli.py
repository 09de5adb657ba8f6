"""The `medray` command; `jobs/*.py` call it for `ray job submit`.

medray train                                   # the offline CPU demo preset (medray/presets/cpu-demo.yaml)
medray train --config mistral7b-medical-o1 scaling.num_workers=2 scaling.use_gpu=true
medray tune --config tune-cpu-demo             # a small Ray Tune search on CPU
medray presets                                 # the presets, with the command that runs each
medray config show --config cpu-demo lora.r=32 # the effective config (defaults filled) as YAML
medray report ~/medray_results/medray-demo     # rewrite a run's report and print its summary
medray generate ~/medray_results/medray-demo "What does ST elevation in II, III and aVF mean?"
medray export ~/medray_results/medray-demo --merged ~/medray-demo-merged
medray evaluate ~/medray_results/medray-demo --medqa medqa_4options.jsonl --limit 50
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

import yaml

from medray import console
from medray.config import ConfigError, EvalArgs, MedrayConfig, load_config
from medray.failures import RunFailedError
from medray.presets import preset_names, preset_path, resolve_preset

DEFAULT_PRESET = "cpu-demo"
DEFAULT_TUNE_PRESET = "tune-cpu-demo"


class UserError(Exception):
    """Bad input from the person running medray: printed without a traceback."""


def config_from_args(args: argparse.Namespace) -> MedrayConfig:
    return load_config(resolve_preset(args.config), args.overrides)


def add_config_arguments(parser: argparse.ArgumentParser, default: str = DEFAULT_PRESET) -> None:
    parser.add_argument(
        "--config", default=default, help=f"preset name (see `medray presets`) or a YAML path (default {default})"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.max_steps=20")


def train_command(args: argparse.Namespace) -> int:
    from medray.driver import run_training
    from medray.report import summary_lines

    cfg = config_from_args(args)
    outcome = run_training(cfg)
    print("\n".join(summary_lines(outcome.run_dir)), flush=True)
    if cfg.eval.after_training:
        from medray.evaluate import evaluate_run, print_evaluation

        print_evaluation(evaluate_run(outcome.run_dir, cfg.eval).evaluation)
    print(f"summary: {outcome.summary_path}", flush=True)
    return 0


def tune_command(args: argparse.Namespace) -> int:
    from medray.search import run_search

    outcome = run_search(config_from_args(args))
    summary = outcome.summary
    best = summary.best_trial
    if best:
        print(
            f"best trial {best['trial']} | {summary.metric} {best['best']:.4f} | {best['params']} | "
            f"adapter {summary.best_checkpoint} | preset {summary.best_config}",
            flush=True,
        )
    print(f"summary: {outcome.summary_path}", flush=True)
    return 0


def report_command(args: argparse.Namespace) -> int:
    from medray.report import summary_lines, write_report
    from medray.storage import StorageFolder, join

    folder = StorageFolder.of(args.run_dir)  # a local folder or one in object storage (s3://...)
    if not folder.exists("summary.json"):
        raise UserError(f"{folder.uri} holds no summary.json; pass the folder of a finished medray run")
    with folder.staged(fetch=["summary.json", "history.json", "leaderboard.csv"]) as local:
        report = write_report(local, location=folder.uri)
        print("\n".join(summary_lines(local)))
    print(f"report: {join(folder.uri, report.name)} (and report.html, loss.png)")
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from medray.generate import (
        answer_file,
        answer_question,
        eos_stop_check,
        read_questions,
        record_evaluation,
        settings_for,
    )
    from medray.inference import resolve_run

    modes = [args.question is not None, args.questions is not None, args.eos_check]
    if sum(modes) != 1:
        raise UserError('give one of: a "question", --questions FILE.jsonl --output OUT.jsonl, or --eos-check')
    if args.questions is not None and args.output is None:
        raise UserError("--questions needs --output OUT.jsonl (where the answers go)")
    run = resolve_run(args.run)  # bad folders fail here, before any model loads
    settings = settings_for(
        run,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    if args.question is not None:
        answer_question(run, args.question, settings, sys.stdout)
    elif args.questions is not None:
        rows = read_questions(args.questions, run.config.data.columns.question)
        totals = answer_file(run, rows, args.output, settings)
        print(f"{totals['rows']} answers ({totals['stopped_at_eos']} ended with EOS): {args.output}", flush=True)
    else:
        check = eos_stop_check(run, settings, limit=args.limit)
        report = record_evaluation(run.run_dir, "eos_stop", check)
        print(
            f"ended with EOS within {check['max_new_tokens']} tokens on held-out rows: base "
            f"{check['base']['stopped']}/{check['base']['total']}, tuned {check['tuned']['stopped']}/"
            f"{check['tuned']['total']} | summary.json evaluation.eos_stop | report {report}",
            flush=True,
        )
    return 0


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR_OR_ADAPTER", help="a finished run's folder, or an adapter folder")
    parser.add_argument("question", nargs="?", help="one question; the answer streams to the terminal")
    parser.add_argument("--questions", metavar="FILE.jsonl", help="one JSON object per line with a Question")
    parser.add_argument("--output", metavar="OUT.jsonl", help="where --questions answers go (one JSON line each)")
    parser.add_argument(
        "--eos-check", action="store_true", help="base vs tuned: how often each ends with EOS on the held-out rows"
    )
    parser.add_argument("--limit", type=int, default=32, help="--eos-check: held-out rows to use (default 32)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's data.max_length")
    parser.add_argument("--temperature", type=float, help="0 (default) is greedy; above 0 samples")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold (default 1.0)")
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--batch-size", type=int, help="prompts generated together (default 8)")


def export_command(args: argparse.Namespace) -> int:
    from medray.export import export_merged
    from medray.inference import resolve_run

    out_dir = export_merged(resolve_run(args.run), args.merged, dtype=args.dtype)
    print(f"merged model: {out_dir} (model card {out_dir / 'README.md'})", flush=True)
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """`medray evaluate RUN_DIR ...`: the run's `eval` section, overridden by the flags given."""
    from medray.evaluate import evaluate_run, print_evaluation, read_run

    _, cfg = read_run(args.run_dir)
    flags = {name: getattr(args, name) for name in EvalArgs.model_fields if getattr(args, name, None) is not None}
    eval_args = MedrayConfig.from_dict({**cfg.to_dict(), "eval": {**cfg.eval.model_dump(), **flags}}).eval
    outcome = evaluate_run(args.run_dir, eval_args, args.adapter)
    print_evaluation(outcome.evaluation)
    if outcome.records_path:
        print(f"records: {outcome.records_path}", flush=True)
    print(f"summary: {outcome.summary_path}", flush=True)
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The `medray evaluate` arguments; each flag overrides the run's `eval.*` setting of the same name."""
    parser.add_argument("run_dir", help="the folder `medray train` printed before summary.json")
    parser.add_argument("--medqa", help="MedQA-USMLE 4-option questions: a .jsonl file or a hub dataset id")
    parser.add_argument("--limit", type=int, help="score only the first N MedQA questions")
    parser.add_argument("--adapter", action="append", metavar="[NAME=]PATH", help="another adapter or run to score")
    switch = dict(action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--generation", help="also score MedQA by generation (default: eval.generation)", **switch)
    parser.add_argument("--validation", help="score the held-out split (default: eval.validation)", **switch)
    parser.add_argument("--max-new-tokens", type=int, help="token limit of each generated answer")
    parser.add_argument("--batch-size", type=int, help="questions per batch sent to a replica")
    parser.add_argument("--replicas", type=int, help="model replicas (default: the run's scaling.num_workers)")
    parser.add_argument("--use-gpu", help="one GPU per replica (default: the run's scaling.use_gpu)", **switch)
    parser.add_argument("--cpus-per-replica", type=float, help="CPUs per replica (default: scaling.cpus_per_worker)")


def presets_command(args: argparse.Namespace) -> int:
    for name in preset_names():
        lines = preset_path(name).read_text().splitlines()
        first = next((line for line in lines if line.startswith("#")), "#")
        print(f"{name:24} {first.lstrip('# ').strip()}")
    return 0


def config_show_command(args: argparse.Namespace) -> int:
    print(yaml.safe_dump(config_from_args(args).to_dict(), sort_keys=False, width=120), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medray", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medray {_version()}")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' INFO logs too")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", parents=[verbose], help="fine-tune with LoRA under Ray Train")
    add_config_arguments(train)
    train.set_defaults(handler=train_command)
    tune = commands.add_parser("tune", parents=[verbose], help="hyperparameter search with Ray Tune (ASHA)")
    add_config_arguments(tune, default=DEFAULT_TUNE_PRESET)
    tune.set_defaults(handler=tune_command)
    report = commands.add_parser("report", help="rewrite a finished run's report and print its summary")
    report.add_argument("run_dir")
    report.set_defaults(handler=report_command)
    generate = commands.add_parser("generate", help="answer questions with a finished run's model")
    add_generate_arguments(generate)
    generate.set_defaults(handler=generate_command)
    export = commands.add_parser("export", help="merge a finished run's adapter into its base model (safetensors)")
    export.add_argument("run", metavar="RUN_DIR_OR_ADAPTER", help="a finished run's folder, or an adapter folder")
    export.add_argument("--merged", metavar="OUT_DIR", required=True, help="a new folder for the merged model")
    export.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    export.set_defaults(handler=export_command)
    evaluate = commands.add_parser("evaluate", help="base model vs tuned adapter: held-out loss, MedQA accuracy")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(handler=evaluate_command)
    presets = commands.add_parser("presets", help="list the presets with the command that runs each")
    presets.set_defaults(handler=presets_command)
    config = commands.add_parser("config", help="show the effective config")
    show = config.add_subparsers(dest="config_command", metavar="show", required=True)
    config_show = show.add_parser("show", help="print the effective config as YAML (defaults filled)")
    add_config_arguments(config_show)
    config_show.set_defaults(handler=config_show_command)
    return parser


def _version() -> str:
    try:
        return version("medray")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if hasattr(args, "verbose"):  # the commands that start Ray
        console.configure(verbose=args.verbose)
    try:
        return args.handler(args)
    except (ConfigError, UserError, FileNotFoundError) as error:
        print(f"medray: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # DataError, PreflightError, RunLockedError, ResumeError, bad derived settings
        print(f"medray: error: {error}", file=sys.stderr)
        return 2
    except RunFailedError as error:  # training started and failed: one line, the traceback is in the worker log
        print(f"medray: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
