"""A failed Ray Train run -> one line that says what happened and what to do (`RunFailedError`).

Ray's `TrainingFailedError` carries every worker's exception, with the worker traceback in its text. People need
the cause: a full disk, a worker process or node that died, memory, or the first line of an error in the training
code. The traceback stays in the worker logs (`ray logs`, the run's Ray session folder).
"""

from __future__ import annotations

import errno
import re

RESUME_HINT = "run the same command again to resume from the last checkpoint"


class RunFailedError(RuntimeError):
    """Training failed after the workers started; the message is one line."""


def describe_failure(error: BaseException, *, run_dir: str, max_failures: int) -> str:
    """One line naming what ended the run in `run_dir` and what to do."""
    text = _all_text(error)
    retries = f"after {max_failures} restart(s)" if max_failures > 0 else "(run.max_failures=0: no restart)"
    if "No space left on device" in text or f"[Errno {errno.ENOSPC}]" in text:
        where = re.search(r"No space left on device: '([^']+)'", text)
        place = f" writing {where.group(1)}" if where else ""
        return (
            f"training in {run_dir} stopped {retries}: the disk is full{place}; free space there (or move "
            f"run.storage_path / TMPDIR), then {RESUME_HINT}"
        )
    if "CUDA out of memory" in text or "torch.OutOfMemoryError" in text:
        return (
            f"training in {run_dir} stopped {retries}: out of GPU memory; lower train.per_device_batch_size or "
            f"data.max_length, then {RESUME_HINT}"
        )
    if "running low on memory" in text:
        return (
            f"training in {run_dir} stopped {retries}: the node ran out of memory and Ray killed run processes; "
            f"free memory or lower train.per_device_batch_size / data.max_length, then {RESUME_HINT}"
        )
    if re.search(
        r"ActorDiedError|ActorUnavailableError|NodeDiedError|WorkerCrashedError|unexpectedly died|"
        r"SYSTEM_ERROR|exit code|Worker unexpectedly exits|node .* died|was killed",
        text,
    ):
        return (
            f"training in {run_dir} stopped {retries}: a worker process died (killed, out of memory, or its node "
            f"was lost); set run.max_failures=N to let Ray restart the workers from the last checkpoint, or "
            f"{RESUME_HINT}"
        )
    return f"training in {run_dir} failed {retries}: {_root_cause(text)} (full traceback in the worker log above)"


def _all_text(error: BaseException) -> str:
    """The text of `error`, its causes and every worker failure it carries."""
    parts, seen, pending = [], set(), [error]
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        parts.append(f"{type(item).__name__}: {item}")
        pending.extend([item.__cause__, item.__context__])
        pending.extend(getattr(item, "worker_failures", {}).values())
        pending.append(getattr(item, "controller_failure", None))
    return "\n".join(parts)


def _root_cause(text: str) -> str:
    """The last `SomethingError: message` line of a traceback text (the innermost error)."""
    lines = [line.strip() for line in text.splitlines()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line)]
    line = errors[-1] if errors else (lines[0] if lines else "unknown error")
    return line if len(line) <= 300 else line[:297] + "..."
