"""What `medray.config.load_config` reads before it validates: a YAML file (or a preset by name) and `key.sub=value`
overrides, each made a plain nested dict. Bad input is a `ConfigError` naming the file or the override.

    values = apply_overrides(read_yaml("cpu-demo"), ["train.max_steps=20"])   # -> MedrayConfig.from_dict(values)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from medray.config_base import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (["train", "learning_rate"], 0.0001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected KEY=VALUE, e.g. train.max_steps=20"])
    key, _, raw = text.partition("=")
    parts = [part for part in key.strip().split(".") if part]
    if not parts:
        raise ConfigError([f"override {text!r}: the key is empty"])
    return parts, _parse_value(raw) if raw.strip() else None


# An override is one shell argument, so ` #` in it is text, never a YAML comment: it is swapped for a private-use
# character while the value is parsed as YAML, then put back.
_HASH_STANDIN = "\ue000"


def _parse_value(raw: str) -> Any:
    try:
        text = raw.replace(" #", " " + _HASH_STANDIN)
        text = _HASH_STANDIN + text[1:] if text.startswith("#") else text
        return _restore_hashes(yaml.safe_load(text))
    except yaml.YAMLError:  # not YAML (e.g. unbalanced brackets in a template): the text itself
        return raw


def _restore_hashes(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(_HASH_STANDIN, "#")
    if isinstance(value, list):
        return [_restore_hashes(item) for item in value]
    if isinstance(value, dict):
        return {_restore_hashes(key): _restore_hashes(item) for key, item in value.items()}
    return value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `values` with every `key.sub=value` override applied."""
    merged = copy.deepcopy(values)
    for override in overrides:
        parts, value = parse_override(override)
        node = merged
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"override {override!r}: {part} is a value, not a section"])
            node = child
        node[parts[-1]] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file, or the preset of that name (medray/presets/); neither, or a non-mapping, is a ConfigError."""
    from medray.presets import resolve_preset

    path = resolve_preset(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError([f"config file {path} is not valid YAML: {error}"]) from None
    if not isinstance(values, dict):
        raise ConfigError([f"config file {path} must hold a mapping of sections, got {type(values).__name__}"])
    return values
