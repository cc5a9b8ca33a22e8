"""PNG plots of evaluation results (matplotlib is optional and imported only here, lazily)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loramix.eval.report import Scores, primary_metric
from loramix.eval.routing import routing_choices


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (``pip install matplotlib`` or ``loramix[assets]``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(results: dict[str, Scores], path: str | Path) -> Path:
    """Grouped bars: each task's primary metric (percent) for each run.

    Args:
        results: ``{run label: {task: {metric: value}}}``.
        path: the PNG to write.
    """
    plt = _pyplot()
    runs = list(results)
    tasks: list[str] = []
    for scores in results.values():
        tasks.extend(task for task in scores if task not in tasks)
    width = 0.8 / max(len(runs), 1)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.7 * len(tasks) * max(len(runs), 1) + 2), 4), layout="constrained")
    for offset, run in enumerate(runs):
        metric = primary_metric(results[run])
        values = [100 * results[run].get(task, {}).get(metric, float("nan")) for task in tasks]
        positions = [index + (offset - (len(runs) - 1) / 2) * width for index in range(len(tasks))]
        axis.bar(positions, values, width=width, label=f"{run} ({metric})")
    axis.set_xticks(range(len(tasks)))
    axis.set_xticklabels(tasks, rotation=30, ha="right")
    axis.set_ylabel("score (%)")
    axis.set_ylim(0, 100)
    axis.set_title("Per-task scores by method")
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_routing(routing: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Heat maps of routing: one panel per task, adapted layers as rows, rank components (or experts) as columns.

    Args:
        routing: ``{"kind": "gate" | "experts", "tasks": {task: {layer: weights}}}`` (see
            :func:`loramix.eval.routing.routing_summary`).
        path: the PNG to write.
        title: the figure's title (e.g. the run's name).
    """
    plt = _pyplot()
    tasks = routing["tasks"]
    columns = min(len(tasks), 4)
    rows = math.ceil(len(tasks) / columns)
    size = (3.2 * columns + 1.5, 0.3 * _layer_count(tasks) * rows + 2.5)
    figure, axes = plt.subplots(rows, columns, figsize=size, squeeze=False, layout="constrained")
    image = None
    for axis, (task, layers) in zip(axes.flat, tasks.items(), strict=False):
        names = list(layers)
        matrix = [layers[name] for name in names]
        image = axis.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        axis.set_title(task, fontsize="small")
        axis.set_yticks(range(len(names)))
        axis.set_yticklabels([_short(name) for name in names], fontsize=5)
        axis.set_xlabel("rank component" if routing["kind"] == "gate" else "expert", fontsize="small")
    for axis in list(axes.flat)[len(tasks) :]:
        axis.axis("off")
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="gate" if routing["kind"] == "gate" else "share routed")
    figure.suptitle(title or "Routing by task and layer")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_choices(routing: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """One heat map of what each task chose in each layer: adapted layers as rows, tasks as columns.

    Cells show the chosen rank (task gates: active rank components) or the expert most sequences of the
    task were routed to (input-routed methods), as numbers over the colours.

    Args:
        routing: what :func:`loramix.eval.routing.routing_summary` returns.
        path: the PNG to write.
        title: the figure's title.
    """
    plt = _pyplot()
    choices = routing_choices(routing)
    tasks = list(choices)
    layers = list(next(iter(choices.values()), {}))
    matrix = [[choices[task].get(layer, 0) for task in tasks] for layer in layers]
    figure, axis = plt.subplots(figsize=(1.1 * len(tasks) + 3.5, 0.28 * len(layers) + 1.8), layout="constrained")
    image = axis.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            axis.text(column, row, str(value), ha="center", va="center", fontsize=6, color="white")
    axis.set_xticks(range(len(tasks)))
    axis.set_xticklabels(tasks, rotation=30, ha="right", fontsize="small")
    axis.set_yticks(range(len(layers)))
    axis.set_yticklabels([_short(name) for name in layers], fontsize=5)
    label = "chosen rank" if routing["kind"] == "gate" else "expert chosen most"
    figure.colorbar(image, ax=axis, label=label)
    axis.set_title(title or f"{label} by task and layer", fontsize="small")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def _layer_count(tasks: dict[str, dict[str, Any]]) -> int:
    return max((len(layers) for layers in tasks.values()), default=1)


def _short(name: str) -> str:
    """A layer's name from its block number on (``encoder.layer.0.attention.self.query`` -> ``0.attention...``)."""
    parts = name.split(".")
    numbers = [index for index, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numbers[-1] :]) if numbers else ".".join(parts[-2:])
