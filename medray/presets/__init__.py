"""medray's presets: YAML files of config overrides shipped inside the package, found by name from any folder.

Each file's first comment line is the exact command that runs it. `medray train --config cpu-demo` and
`load_config("cpu-demo")` find `cpu-demo.yaml` here; a path to any YAML file works as well.

    path = resolve_preset("tiny-test")      # .../site-packages/medray/presets/tiny-test.yaml
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

SUFFIX = ".yaml"
OLD_FOLDER = "jobs/configs"
"""Where presets lived before they shipped in the package; `jobs/configs/NAME.yaml` still finds preset NAME."""


def preset_names() -> list[str]:
    """Names of the shipped presets (file names without `.yaml`), sorted."""
    return sorted(item.name[: -len(SUFFIX)] for item in files(__name__).iterdir() if item.name.endswith(SUFFIX))


def preset_path(name: str) -> Path | None:
    """The file of the shipped preset `name` (with or without `.yaml`), or None when there is none."""
    file_name = name if name.endswith(SUFFIX) else f"{name}{SUFFIX}"
    if "/" in file_name or "\\" in file_name:
        return None
    resource = files(__name__) / file_name
    if not resource.is_file():
        return None
    with as_file(resource) as path:  # a real file for an installed package (not zipped): the path stays valid
        return Path(path)


def resolve_preset(name_or_path: str | Path) -> Path:
    """A YAML path that exists, or the shipped preset of that name.

    Raises:
        ConfigError: Neither a file nor a preset; the message lists the presets.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    found = preset_path(str(name_or_path))
    if found is None and path.parent.as_posix().endswith(OLD_FOLDER):  # `jobs/configs/NAME.yaml`, the old home
        found = preset_path(path.name)
    if found is not None:
        return found
    from medray.config import ConfigError

    raise ConfigError(
        [
            f"config {name_or_path}: no such YAML file or preset; presets shipped with medray: "
            f"{', '.join(preset_names()) or 'none found'}"
        ]
    )
