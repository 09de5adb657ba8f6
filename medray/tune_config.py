"""The `tune:` section of medray's config (`medray tune`): the search space, its samplers and their validation.

`TuneArgs.SAMPLERS` is the one table of samplers; `medray.search_space` turns the space into Ray Tune samplers and
runs the checks that need the whole config. Imported by `medray.config`, which holds it as `MedrayConfig.tune`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, field_validator

from medray.config_base import Section


class TuneArgs(Section):
    """`medray tune`: a Ray Tune search over the settings above, with ASHA stopping the weak trials early.

    `space` maps a setting to a Ray Tune sampler, in YAML either dotted or nested:

        space:
          train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
          lora: {r: {choice: [8, 16, 32]}, dropout: {uniform: [0.0, 0.1]}}
    """

    SAMPLERS: ClassVar[dict[str, int | None]] = {
        "uniform": 2,
        "quniform": 3,
        "loguniform": 2,
        "qloguniform": 3,
        "randint": 2,
        "qrandint": 3,
        "lograndint": 2,
        "choice": None,
        "grid": None,
    }
    """Sampler name -> number of arguments (None: a list of values); each is the `ray.tune` function of that name,
    `grid` is `tune.grid_search`. Ranges are [low, high] (+ q); `randint` excludes `high`, as in Ray."""
    INTEGER_SAMPLERS: ClassVar[frozenset[str]] = frozenset({"randint", "qrandint", "lograndint", "choice", "grid"})
    NOT_SEARCHABLE: ClassVar[tuple[str, ...]] = ("run.", "scaling.", "tune.")

    @staticmethod
    def _check_key(key: str) -> str:
        if key.startswith(TuneArgs.NOT_SEARCHABLE):
            raise ValueError(f"{key} cannot be searched: run.*, scaling.* and tune.* are the same for every trial")
        if TuneArgs.setting(key) is None:
            raise ValueError(f"{key} is not a setting; use `section.key`, e.g. train.learning_rate or lora.r")
        return key

    @staticmethod
    def _check_sampler(spec: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """`{sampler: [arguments]}`: a known sampler with the right arguments; numeric strings ("1e-5") -> floats."""
        samplers = TuneArgs.SAMPLERS
        if len(spec) != 1 or next(iter(spec)) not in samplers:
            raise ValueError(f"expected {{SAMPLER: [arguments]}} with SAMPLER one of {', '.join(samplers)}")
        ((sampler, arguments),) = spec.items()
        if samplers[sampler] is None:
            if not arguments:
                raise ValueError(f"{sampler} needs at least one value")
            return spec
        try:
            numbers = [float(item) if isinstance(item, str) else item for item in arguments]
        except ValueError:
            raise ValueError(f"{sampler} takes numbers") from None
        shape = "[low, high, q]" if samplers[sampler] == 3 else "[low, high]"
        if len(numbers) != samplers[sampler] or not all(isinstance(item, int | float) for item in numbers):
            raise ValueError(f"{sampler} takes {shape}")
        if not numbers[0] < numbers[1]:
            raise ValueError(f"{sampler} needs low < high")
        if "log" in sampler and numbers[0] <= 0:
            raise ValueError(f"{sampler} needs low > 0")
        return {sampler: numbers}

    space: dict[
        Annotated[str, AfterValidator(_check_key)],
        Annotated[dict[str, list[Any]], AfterValidator(_check_sampler)],
    ] = Field(
        default_factory=lambda: {
            "train.learning_rate": {"loguniform": [5.0e-5, 5.0e-4]},
            "lora.r": {"choice": [8, 16, 32]},
            "lora.alpha": {"choice": [16, 32]},
        }
    )
    """Setting (`section.key`) -> `{sampler: [arguments]}`; samplers: uniform, quniform, loguniform, qloguniform,
    randint, qrandint, lograndint, choice, grid."""
    num_samples: int = Field(4, ge=1)
    """Trials to sample; with `grid` entries, each grid point is sampled this many times."""
    metric: str = "eval_loss"
    """Reported metric that ranks trials and that ASHA compares."""
    mode: Literal["min", "max"] = "min"
    """Whether `metric` is minimised or maximised."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """`asha` stops trials that fall behind at each rung; `fifo` runs every trial to the end (for comparison)."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps of every trial (ASHA's max_t); sets `train.max_steps` of the trials. None: the trial's own
    `train.max_steps`, or the steps of `train.num_epochs`."""
    grace_period: int | None = Field(None, ge=1)
    """ASHA: optimizer steps before a trial can be stopped (the first rung). None: `train.eval_steps`."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """ASHA: rungs are `grace_period * reduction_factor**k` steps; at each rung the worst `1 - 1/factor` stop."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials run at once. None: as many as the cluster's GPUs (or CPUs) hold, given each trial's workers."""
    trial_cpus: float = Field(0.0, ge=0.0)
    """CPUs reserved for each trial's driver function, which only waits on its trainer (the workers have their own).
    0 reserves none, so a trial takes exactly `scaling.num_workers` workers' resources."""
    max_failures: int = Field(0, ge=-1)
    """Tune-level retries of a failed trial (-1: unlimited); each retry resumes from the trial's last checkpoint."""
    seed: int | None = 3407
    """Seed of the random search, so the same config samples the same trials (None: a fresh draw each time)."""

    @field_validator("space", mode="before")
    @classmethod
    def _flatten_space(cls, value: Any) -> Any:
        """Nested mappings (`lora: {r: {choice: [...]}}`, as `tune.space.lora.r=...` overrides make) -> dotted keys."""
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}
        for key, spec in value.items():
            is_section = isinstance(spec, dict) and spec and all(isinstance(item, dict) for item in spec.values())
            if is_section:
                flat.update({f"{key}.{sub}": item for sub, item in cls._flatten_space(spec).items()})
            else:
                flat[str(key)] = spec
        return flat

    @field_validator("space")
    @classmethod
    def _check_whole_numbers(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        """An integer setting (lora.r, train.warmup_steps) needs a sampler that draws integers."""
        problems = [
            f"{key} takes whole numbers: use randint, qrandint, lograndint, choice or grid, not {sampler}"
            for key, spec in space.items()
            for sampler in spec
            if sampler not in cls.INTEGER_SAMPLERS and cls.setting(key).annotation is int
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return space

    @staticmethod
    def setting(key: str) -> Any:
        """The pydantic field of a `section.key` setting of MedrayConfig, or None."""
        from medray.config import MedrayConfig  # the whole tree, which holds this section

        section_name, _, name = key.partition(".")
        section = MedrayConfig.model_fields.get(section_name)
        if section is None or not isinstance(section.annotation, type) or not issubclass(section.annotation, Section):
            return None
        return section.annotation.model_fields.get(name)
