"""What a `medray tune` search will run, and every problem with it named before Ray starts anything.

`tune.space` -> Ray Tune samplers (`param_space`), the number of trials, what each trial holds and how many fit in
the cluster at once, and the checks that need the whole config (a validation split for `eval_*` metrics, steps
against `eval_steps` and ASHA's grace period, every value a sampler can draw). The space's own shape (sampler
names and arguments, whole numbers for integer settings) is validated with the config, in `medray.config.TuneArgs`,
whose `SAMPLERS` is the one table of samplers.

    check_search(cfg)                       # ConfigError naming every problem
    tuner_space = param_space(cfg.tune)     # {"lora.r": tune.choice([8, 16, 32]), ...}
"""

from __future__ import annotations

import json
import math
from typing import Any

from ray import tune

from medray.config import ConfigError, MedrayConfig
from medray.driver import storage_path
from medray.tune_config import TuneArgs

WORST_METRIC = 1e30
"""Stands in for a NaN or infinite metric (a diverged trial): ASHA ignores NaN, so it would never stop such a trial."""
TRIAL_MEMORY_BYTES = 64 * 1024**2
"""What a trial's driver function reserves when `tune.trial_cpus` is 0 (Tune needs a non-empty reservation)."""


def search_dir(cfg: MedrayConfig) -> str:
    """The search folder, `{run.storage_path}/{run.name}` (a local path or a URI)."""
    return f"{storage_path(cfg).rstrip('/')}/{cfg.run.name}"


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """`set_dotted(d, "lora.r", 16)` sets `d["lora"]["r"] = 16`."""
    *sections, name = key.split(".")
    for section in sections:
        values = values.setdefault(section, {})
    values[name] = value


# -- config -> Ray Tune ---------------------------------------------------------------------------------------------


def param_space(tune_args: TuneArgs) -> dict[str, Any]:
    """`tune.space` as Ray Tune's param_space: `{"lora.r": tune.choice([8, 16])}`, flat dotted keys."""
    return {key: sampler(spec) for key, spec in tune_args.space.items()}


def sampler(spec: dict[str, list[Any]]):
    """`{"loguniform": [1e-5, 1e-3]}` -> `tune.loguniform(1e-5, 1e-3)`; choice and grid take the list itself.

    Every name in `TuneArgs.SAMPLERS` is the `ray.tune` function of that name, but `grid` is `tune.grid_search`.
    """
    ((name, arguments),) = spec.items()
    function = getattr(tune, "grid_search" if name == "grid" else name)
    if TuneArgs.SAMPLERS[name] is None:
        return function(list(arguments))
    return function(*arguments)


def number_of_trials(tune_args: TuneArgs) -> int:
    """Trials the search runs: num_samples times the size of the grid."""
    grid = math.prod(len(spec["grid"]) for spec in tune_args.space.values() if "grid" in spec)
    return tune_args.num_samples * grid


def trial_resources(tune_args: TuneArgs) -> dict[str, float]:
    """What Tune reserves for a trial's driver function (its trainer's workers reserve their own)."""
    if tune_args.trial_cpus > 0:
        return {"CPU": tune_args.trial_cpus}
    return {"CPU": 0, "memory": TRIAL_MEMORY_BYTES}


def resources_per_trial(cfg: MedrayConfig) -> dict[str, float]:
    """Everything one trial holds while it runs: its workers plus its driver function."""
    workers = cfg.scaling.num_workers
    return {
        "CPU": workers * cfg.scaling.cpus_per_worker + cfg.tune.trial_cpus,
        "GPU": float(workers) if cfg.scaling.use_gpu else 0.0,
    }


def max_concurrent_trials(cfg: MedrayConfig, cluster: dict[str, float]) -> int:
    """`tune.max_concurrent_trials`, or as many trials as the cluster's GPUs and CPUs hold at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    need = {name: amount for name, amount in resources_per_trial(cfg).items() if amount > 0}
    fits = min(int(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in need.items())
    if fits < 1:
        have = {name: cluster.get(name, 0.0) for name in need}
        raise ConfigError(
            [
                f"one trial needs {need} (scaling.num_workers={cfg.scaling.num_workers} workers) but the cluster "
                f"has {have}; use fewer or smaller workers, or set tune.max_concurrent_trials on an autoscaling "
                "cluster"
            ]
        )
    return fits


# -- checks before anything starts ----------------------------------------------------------------------------------


def check_search(cfg: MedrayConfig) -> None:
    """Raise one ConfigError naming every problem of the search, before Ray starts anything."""
    problems = []
    if cfg.tune.metric.startswith("eval_") and cfg.data.validation_fraction == 0:
        problems.append(f"tune.metric={cfg.tune.metric} needs a validation split: set data.validation_fraction > 0")
    if not cfg.tune.space:
        problems.append("tune.space is empty: add e.g. tune.space.train.learning_rate={loguniform: [1.0e-5, 1.0e-3]}")
    steps = cfg.tune.max_steps or (cfg.train.max_steps if cfg.train.max_steps > 0 else None)
    if steps:
        problems += step_problems(cfg, steps)
    problems += space_value_problems(cfg)
    raise_if_problems(problems)


def step_problems(cfg: MedrayConfig, max_steps: int) -> list[str]:
    """Trials must evaluate before they end, and ASHA's first rung must come before the end."""
    problems = []
    if cfg.train.eval_steps > max_steps:
        problems.append(
            f"train.eval_steps={cfg.train.eval_steps} is more than the {max_steps} steps of a trial: trials would "
            "never report a validation loss; lower train.eval_steps"
        )
    grace = cfg.tune.grace_period or cfg.train.eval_steps
    if cfg.tune.scheduler == "asha" and grace > max_steps:
        problems.append(f"tune.grace_period={grace} is more than the {max_steps} steps of a trial; lower it")
    return problems


def space_value_problems(cfg: MedrayConfig) -> list[str]:
    """Every value a sampler can draw must make a valid config: its list values and its range ends are tried."""
    base = cfg.to_dict()
    problems = []
    for key, spec in cfg.tune.space.items():
        for value in _edge_values(spec):
            values = json.loads(json.dumps(base))
            set_dotted(values, key, value)
            try:
                MedrayConfig.from_dict(values)
            except ConfigError as error:
                problems += [f"tune.space.{key} can draw {value!r}: {problem}" for problem in error.problems]
    return problems


def _edge_values(spec: dict[str, list[Any]]) -> list[Any]:
    ((name, arguments),) = spec.items()
    if TuneArgs.SAMPLERS[name] is None:
        return list(arguments)
    low, high = arguments[0], arguments[1]
    return [low, high - 1] if name == "randint" else [low, high]


def raise_if_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def finite_metric(metrics: dict[str, Any], metric: str, worst: float) -> dict[str, Any]:
    """A copy of one report with `metric` replaced by `worst` when it is missing, NaN, infinite or beyond `worst`."""
    value = metrics.get(metric)
    if is_finite_metric(value):
        return dict(metrics)
    return {**metrics, metric: worst}


def is_finite_metric(value: Any) -> bool:
    """A number that is neither NaN, infinite nor beyond `WORST_METRIC`."""
    return isinstance(value, int | float) and math.isfinite(value) and abs(value) < WORST_METRIC
