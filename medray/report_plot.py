"""`loss.png`: training and validation loss by step, the best validation loss starred; and the loss series the
report's tables read.

    plot_losses(history, run_dir / "loss.png", title="medray-demo")   # history: the run's history.json entries
"""

from __future__ import annotations

from pathlib import Path

TRAIN_COLOR = "#1f77b4"
VALIDATION_COLOR = "#ff7f0e"
FIGURE_SIZE_IN = (8, 5)
FIGURE_DPI = 100


def losses_by_step(history: list[dict]) -> list[tuple[int, float | None, float | None]]:
    """(step, training loss, validation loss) for every step with either, in step order (a later entry wins)."""
    train: dict[int, float] = {}
    validation: dict[int, float] = {}
    for entry in history:
        if "loss" in entry:
            train[entry["step"]] = entry["loss"]
        if "eval_loss" in entry:
            validation[entry["step"]] = entry["eval_loss"]
    return [(step, train.get(step), validation.get(step)) for step in sorted(train.keys() | validation.keys())]


def best_validation(history: list[dict]) -> tuple[int, float] | None:
    """(step, loss) of the lowest validation loss (the first, on a tie); None without evaluations."""
    evaluated = [(step, loss) for step, _, loss in losses_by_step(history) if loss is not None]
    return min(evaluated, key=lambda item: item[1]) if evaluated else None


def plot_losses(history: list[dict], path: Path, title: str = "") -> Path:
    """Draw training and validation loss against step into an 800 x 500 PNG; the best validation loss is starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rows = losses_by_step(history)
    train = [(step, loss) for step, loss, _ in rows if loss is not None]
    validation = [(step, loss) for step, _, loss in rows if loss is not None]
    if train:
        axes.plot(*zip(*train, strict=True), color=TRAIN_COLOR, linewidth=2, label="training loss")
    if validation:
        axes.plot(
            *zip(*validation, strict=True), color=VALIDATION_COLOR, linewidth=2, marker="o", label="validation loss"
        )
        best_step, best_loss = best_validation(history)
        axes.plot(
            [best_step],
            [best_loss],
            linestyle="none",
            marker="*",
            markersize=16,
            color=VALIDATION_COLOR,
            markeredgecolor="black",
            label=f"best validation loss ({best_loss:.4f}, step {best_step})",
        )
    if not rows:
        axes.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=axes.transAxes)
    axes.set(xlabel="step", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    if rows:
        axes.legend()
    figure.savefig(path, dpi=FIGURE_DPI)
    return path
