"""The `medray` command: `medray train|tune|report ...`. `jobs/*.py` call the same functions for `ray job submit`.

medray train                                   # the offline CPU demo preset (medray/presets/cpu-demo.yaml)
medray train --config mistral7b-medical-o1 scaling.num_workers=2 scaling.use_gpu=true
medray report ~/medray_results/medray-demo
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medray.config import ConfigError, MedrayConfig, load_config
from medray.contracts import RunSummary
from medray.presets import resolve_preset

DEFAULT_PRESET = "cpu-demo"


class UserError(Exception):
    """Bad input from the person running medray: printed without a traceback."""


def config_from_args(args: argparse.Namespace) -> MedrayConfig:
    return load_config(resolve_preset(args.config), args.overrides)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_PRESET, help=f"preset name or YAML path (default {DEFAULT_PRESET})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.max_steps=20")


def train_command(args: argparse.Namespace) -> int:
    from medray.driver import run_training

    outcome = run_training(config_from_args(args))
    _print_outcome(outcome.summary)
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
    from medray.report import write_report

    run_dir = Path(args.run_dir).expanduser()
    if not (run_dir / "summary.json").is_file():
        raise UserError(f"{run_dir} holds no summary.json; pass the folder of a finished medray run")
    print(f"report: {write_report(run_dir)}")
    return 0


def _print_outcome(summary: RunSummary) -> None:
    best = summary.metrics["best"]
    print(
        f"steps {summary.steps} | best eval_loss {best.get('eval_loss', 'n/a')} | "
        f"best checkpoint {summary.best_checkpoint} | report {summary.report}",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medray", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune with LoRA under Ray Train")
    add_config_arguments(train)
    train.set_defaults(handler=train_command)
    tune = commands.add_parser("tune", help="hyperparameter search with Ray Tune (ASHA)")
    add_config_arguments(tune)
    tune.set_defaults(handler=tune_command)
    report = commands.add_parser("report", help="write report.md and loss.png for a finished run")
    report.add_argument("run_dir")
    report.set_defaults(handler=report_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, UserError, FileNotFoundError) as error:
        print(f"medray: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # DataError and bad derived settings (e.g. no full optimizer step)
        print(f"medray: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
