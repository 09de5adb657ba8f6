"""What a run folder already holds, and what a new run on it may do: resume, refuse, or start afresh.

Decided on the driver, while holding the folder's lock (`medray.runlock`), before any worker is reserved:
- `run.resume=auto` (default): continue from the last checkpoint if there is one; `must`: fail without one;
  `never`: move an existing folder aside to `{name}.replaced-{UTC time}` and start afresh.
- A finished run (it has `summary.json`) started again with the same length (`train.max_steps`,
  `train.num_epochs`) is not trained again: `run_training` returns its summary. A longer one continues.
- Resuming with a different model, adapter shape or data (`model.*`, `lora.*`, `data.*`) is refused, naming every
  key that differs: the checkpoint's weights or its place in the data would not match.
- Checkpoint folders that Ray's checkpoint manager never registered (a copy cut short by a full disk or a crash)
  are removed, so they are never resumed from nor listed.

Every run writes its config to `medray_config.json` in the folder, which is what the next run is compared with.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from medray.config import MedrayConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "medray_config.json"
SUMMARY_FILE = "summary.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the registered checkpoints
RESUME_SECTIONS = ("model", "lora", "data")
RESUME_HARMLESS = frozenset({"model.attn_implementation"})  # same weights, another attention kernel
RUN_LENGTH_KEYS = ("train.max_steps", "train.num_epochs")


class ResumeError(ValueError):
    """The run folder's state and `run.resume` (or the config) do not go together."""


@dataclass
class FolderState:
    """What the driver found in the run folder."""

    run_dir: str
    checkpoints: list[str]
    """Registered checkpoint folder names, oldest first."""
    finished_summary: dict[str, Any] | None
    """The summary of a finished run that this config would only repeat; `run_training` returns it."""


def inspect_run_folder(cfg: MedrayConfig, storage: str) -> FolderState:
    """Apply `run.resume` to `{storage}/{run.name}` and check that resuming is safe; raise `ResumeError` if not."""
    fs, root = pafs.FileSystem.from_uri(storage)
    folder = f"{root.rstrip('/')}/{cfg.run.name}"
    run_dir = f"{storage.rstrip('/')}/{cfg.run.name}"
    exists = fs.get_file_info(folder).type == pafs.FileType.Directory
    if exists and cfg.run.resume == "never":
        aside = f"{folder}.replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        fs.move(folder, aside)
        logger.warning("run.resume=never: moved the existing run folder %s aside to %s", run_dir, aside)
        exists = False
    checkpoints = registered_checkpoints(fs, folder) if exists else []
    if cfg.run.resume == "must" and not checkpoints:
        raise ResumeError(f"run.resume=must, but {run_dir} holds no checkpoint to resume from; check run.name")
    saved = _read_json(fs, f"{folder}/{CONFIG_FILE}") if exists else None
    summary = _read_json(fs, f"{folder}/{SUMMARY_FILE}") if exists else None
    saved = saved or (summary or {}).get("config")
    if checkpoints and saved:
        changed = differing_keys(saved, cfg.to_dict(), RESUME_SECTIONS, RESUME_HARMLESS)
        if changed:
            raise ResumeError(
                f"{run_dir} holds a run with another model or data ({'; '.join(changed)}); its checkpoints do not "
                "fit this config: pick a new run.name, or run.resume=never to start afresh"
            )
    finished = None
    if summary and saved and not differing_keys(saved, cfg.to_dict(), ("train",), keys=RUN_LENGTH_KEYS):
        finished = summary
    if exists:
        remove_unregistered_checkpoints(fs, folder, checkpoints)
    return FolderState(run_dir=run_dir, checkpoints=checkpoints, finished_summary=finished)


def save_run_config(cfg: MedrayConfig, run_dir: str) -> None:
    """Write the config of the run about to start into its folder (what a later run is compared with)."""
    fs, folder = pafs.FileSystem.from_uri(run_dir)
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{CONFIG_FILE}") as stream:
        stream.write(json.dumps(cfg.to_dict(), indent=1).encode())


def differing_keys(
    old: dict[str, Any],
    new: dict[str, Any],
    sections: tuple[str, ...],
    harmless: frozenset[str] = frozenset(),
    keys: tuple[str, ...] | None = None,
) -> list[str]:
    """`section.key: old -> new` for every setting of `sections` (or only `keys`) that differs."""
    changed = []
    for section in sections:
        before, after = old.get(section) or {}, new.get(section) or {}
        for name in sorted(set(before) | set(after)):
            key = f"{section}.{name}"
            if key in harmless or (keys is not None and key not in keys):
                continue
            if before.get(name) != after.get(name):
                changed.append(f"{key}: {_short(before.get(name))} -> {_short(after.get(name))}")
    return changed


def registered_checkpoints(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The checkpoint folder names in Ray's checkpoint-manager snapshot (empty if there is none)."""
    snapshot = _read_json(fs, f"{folder}/{SNAPSHOT_FILE}") or {}
    results = [*snapshot.get("checkpoint_results", []), snapshot.get("latest_checkpoint_result") or {}]
    names = {item["checkpoint_dir_name"] for item in results if item.get("checkpoint_dir_name")}
    return sorted(names)


def remove_unregistered_checkpoints(fs: pafs.FileSystem, folder: str, registered: list[str]) -> list[str]:
    """Delete `checkpoint_*` folders that Ray never registered (half-written); return their names."""
    selector = pafs.FileSelector(folder, allow_not_found=True)
    removed = []
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            if info.base_name not in registered:
                fs.delete_dir(info.path)
                removed.append(info.base_name)
    if removed:
        logger.warning("removed %d unfinished checkpoint folder(s) from %s: %s", len(removed), folder, removed)
    return removed


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, ValueError):
        return None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
