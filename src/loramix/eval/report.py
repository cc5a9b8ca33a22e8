"""Per-task reports of one or more runs, as JSON and as a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Scores = dict[str, dict[str, float]]

PRIMARY_METRICS = ("accuracy", "exact_match")


def primary_metric(scores: Scores) -> str:
    """The headline metric of a run's scores: ``accuracy`` (classification) or ``exact_match``."""
    for metric in PRIMARY_METRICS:
        if any(metric in task_scores for task_scores in scores.values()):
            return metric
    raise ValueError(f"scores hold none of {PRIMARY_METRICS}")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def markdown_table(results: dict[str, Scores]) -> str:
    """A table with one row per task and one column per run, plus the mean over tasks.

    Args:
        results: ``{run label: {task: {metric: value}}}``.

    Returns:
        Markdown text; each cell is the run's primary metric in percent.
    """
    runs = list(results)
    tasks: list[str] = []
    for scores in results.values():
        tasks.extend(task for task in scores if task not in tasks)
    metrics = {run: primary_metric(scores) for run, scores in results.items()}
    header = "| task | " + " | ".join(f"{run} ({metrics[run]})" for run in runs) + " |"
    lines = [header, "|" + "---|" * (len(runs) + 1)]
    for task in tasks:
        cells = []
        for run in runs:
            value = results[run].get(task, {}).get(metrics[run])
            cells.append("–" if value is None else f"{100 * value:.1f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    means = [_mean([s[metrics[run]] for s in results[run].values() if metrics[run] in s]) for run in runs]
    lines.append("| **mean** | " + " | ".join(f"**{100 * mean:.1f}**" for mean in means) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    results: dict[str, Scores], directory: str | Path, details: dict[str, Any] | None = None, plots: list[str] = ()
) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``directory``.

    Args:
        results: ``{run label: {task: {metric: value}}}``.
        directory: where to write (created if needed).
        details: extra JSON data to keep in ``report.json`` (e.g. routing, split, adapter paths).
        plots: file names of plots in ``directory`` to link from the Markdown.

    Returns:
        The paths of the JSON and the Markdown report.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "report.json"
    json_path.write_text(json.dumps({"results": results, **(details or {})}, indent=2, sort_keys=True) + "\n")
    text = "# loramix evaluation\n\n" + markdown_table(results)
    if plots:
        text += "\n" + "\n".join(f"![{Path(name).stem}]({name})" for name in plots) + "\n"
    md_path = directory / "report.md"
    md_path.write_text(text)
    return json_path, md_path
