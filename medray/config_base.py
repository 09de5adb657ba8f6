"""The base of every config section (`medray.config`, `medray.tune_config`) and `ConfigError`, the one error for a
bad config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, fields carry their docstrings."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ConfigError(ValueError):
    """A config with one or more problems; the message names every one."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        listing = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"invalid medray config ({len(problems)} problem(s)):\n{listing}")

    @classmethod
    def from_validation(cls, error: ValidationError, root: type[BaseModel]) -> ConfigError:
        """One problem per validation error of `root` (the whole config), each naming its key."""
        problems = []
        for item in error.errors():
            key = ".".join(str(part) for part in item["loc"]) or "config"
            if item["type"] == "extra_forbidden":
                problems.append(f"{key}: unknown key; allowed keys here: {_allowed_keys(root, item['loc'])}")
            elif not item["loc"]:  # a check across sections: its message names the keys
                problems.append(item["msg"].removeprefix("Value error, "))
            else:
                problems.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
        return cls(problems)


def _allowed_keys(root: type[BaseModel], location: tuple) -> str:
    section = root
    for part in location[:-1]:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "?"
        section = annotation
    return ", ".join(section.model_fields)
