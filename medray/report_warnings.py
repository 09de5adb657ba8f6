"""The report's "Read with care" section: where a run's numbers mislead (too few validation rows, more passes than
the configured epochs, validation rows that also appear in training).

    sections += warnings_section(summary)   # [] when nothing misleads
"""

from __future__ import annotations

from medray.contracts import RunSummary, SearchSummary

FEW_VALIDATION_ROWS = 10


def run_warnings(summary: RunSummary | SearchSummary) -> list[str]:
    """Where the report's numbers mislead: too few validation rows, more passes than the configured epochs,
    validation rows that also appear in training."""
    stats, train = summary.data or {}, summary.config.get("train", {})
    found = []
    validation = stats.get("rows_validation")
    if validation is not None and 0 < validation < FEW_VALIDATION_ROWS:
        found.append(
            f"The validation loss is a mean over {validation} row(s): too few to rank checkpoints by; "
            "use more rows or a larger data.validation_fraction."
        )
    rows_train, steps = stats.get("rows_train"), summary.steps
    effective = getattr(summary, "effective", None) or {}
    per_step = effective.get("rows_per_step")
    if train.get("max_steps", -1) > 0 and rows_train and steps and per_step:
        passes = steps * per_step / rows_train
        if passes > train.get("num_epochs", 1) * 1.05:
            found.append(
                f"train.max_steps={train['max_steps']} made {passes:.1f} passes over the {rows_train} training rows; "
                f"train.num_epochs={train.get('num_epochs')} does not apply when max_steps is set."
            )
    overlap = stats.get("rows_validation_in_train")
    if overlap:
        found.append(
            f"{overlap} of the {validation} validation rows also appear in the training rows: the validation loss "
            "measures memorisation there."
        )
    return found


def warnings_section(summary: RunSummary | SearchSummary) -> list[str]:
    """The section's heading and bullet list, or no section when nothing misleads."""
    found = run_warnings(summary)
    return ["## Read with care", "\n".join(f"- {text}" for text in found)] if found else []
