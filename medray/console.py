"""What a person sees on the console: one `[medray]` line per event, Ray's and the libraries' own logs at warning
level unless `--verbose`.

The CLI calls `configure(verbose)` once, before Ray starts: the choice is kept in the environment (`MEDRAY_VERBOSE`),
so Ray workers started on this machine and Tune's trial drivers inherit it; the driver also passes it to the
training workers in their plan. Quiet mode means:

- the driver's `ray` loggers, Ray Train's (`RunConfig.logging_config`) and Ray Data's console handler (through
  `RAY_DATA_LOGGING_CONFIG`) log warnings and errors only;
- a training worker (`quiet_worker()`) shows no library progress bars and no `FutureWarning` /
  `DeprecationWarning` meant for library developers;
- medray's own lines go through `say()`, which writes to stderr itself: Ray Train's print patch would log a
  `print` through the root logger *and* print it, so every line would show twice.

    configure(verbose=False)
    say("step 5/20 | loss 2.13")        # -> "[medray] step 5/20 | loss 2.13" on stderr, once
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

VERBOSE_ENV = "MEDRAY_VERBOSE"
RAY_DATA_QUIET_CONFIG = Path(__file__).resolve().parent / "ray_data_logging.yaml"
PREFIX = "[medray] "


def configure(verbose: bool) -> None:
    """Set the console's verbosity for this process and the Ray processes it starts (call before `ray.init`)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s %(name)s: %(message)s",
    )
    medray_logger = logging.getLogger("medray")  # medray's own INFO lines read like `say` lines
    if not any(getattr(handler, "medray_console", False) for handler in medray_logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
        handler.medray_console = True
        medray_logger.addHandler(handler)
    medray_logger.setLevel(logging.INFO)
    medray_logger.propagate = False
    if verbose:
        return
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_QUIET_CONFIG))
    _hide_library_warnings()


def is_verbose() -> bool:
    """Whether `--verbose` was given (here or in the process that started this one)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_init_options() -> dict:
    """`ray.init` keyword arguments: the driver's `ray` loggers at warning level unless verbose."""
    if is_verbose():
        return {}
    _hide_library_warnings()  # again: importing Ray put its own RayDeprecationWarning filter in front
    return {"logging_level": logging.WARNING}


def train_logging_config():
    """Ray Train's `LoggingConfig`: its per-report and per-checkpoint INFO lines only when verbose."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")


def quiet_worker() -> None:
    """In a training worker: no library progress bars, no warnings meant for library developers."""
    import datasets.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()
    _hide_library_warnings()
    # Ray 2.60 names this logger by its file path, so `LoggingConfig(log_level="WARNING")`, which filters the
    # `ray.train.*` loggers, misses its "Reporting training result N: TrainingReport(...)" line at every report.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def say(line: str) -> None:
    """Print one `[medray]` line on stderr, exactly once (also inside Ray workers)."""
    sys.stderr.write(f"{PREFIX}{line}\n")
    sys.stderr.flush()


def _hide_library_warnings() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if "ray.util.annotations" in sys.modules:
        warnings.filterwarnings("ignore", category=sys.modules["ray.util.annotations"].RayDeprecationWarning)
