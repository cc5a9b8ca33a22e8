"""Score trained runs on their held-out split and write the report and plots."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loramix.data import Example, MultiTaskCollator
from loramix.eval.plots import matplotlib_available, plot_choices, plot_routing, plot_scores
from loramix.eval.report import Scores, write_report
from loramix.eval.routing import routing_summary
from loramix.runs.build import Run, load_run, make_template
from loramix.runs.scoring import score_examples


def _routing_batches(run: Run, examples: Sequence[Example]) -> Callable[[], dict[str, list[dict[str, Any]]]]:
    def build() -> dict[str, list[dict[str, Any]]]:
        template = make_template(run.recipe, run.tokenizer)
        collator = MultiTaskCollator(run.tokenizer)
        grouped: dict[str, list[Example]] = {}
        for example in examples:
            grouped.setdefault(example.task, []).append(example)
        size = run.recipe.eval.batch_size
        return {
            task: [collator([template(e) for e in items[start : start + size]]) for start in range(0, len(items), size)]
            for task, items in grouped.items()
        }

    return build


def evaluate_adapters(
    adapter_dirs: Sequence[str | Path], output_dir: str | Path, split: str | None = None, plots: bool = True
) -> dict[str, Any]:
    """Score each trained adapter on its run's held-out split and write ``report.{json,md}`` and PNG plots.

    Args:
        adapter_dirs: adapter directories written by ``loramix train`` (each holds its recipe).
        output_dir: where the report and plots go.
        split: ``test`` or ``validation``; ``None`` takes each recipe's ``eval.split``.
        plots: draw plots (skipped, with a message, when matplotlib is missing).

    Returns:
        ``{"results": {run: {task: metrics}}, "routing": {run: ...}, "report": path, "markdown": path,
        "plots": [paths]}``.
    """
    output_dir = Path(output_dir)
    results: dict[str, Scores] = {}
    routing: dict[str, Any] = {}
    for directory in adapter_dirs:
        run = load_run(directory)
        label = run.recipe.label
        while label in results:
            label += "'"
        examples = run.split(split or run.recipe.eval.split)
        results[label] = score_examples(run, run.model, examples)
        routing[label] = routing_summary(run.model, _routing_batches(run, examples))
    output_dir.mkdir(parents=True, exist_ok=True)  # only once every adapter has loaded and scored
    drawn: list[str] = []
    if plots and matplotlib_available():
        drawn.append(plot_scores(results, output_dir / "scores.png").name)
        for label, summary in routing.items():
            stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
            gates = plot_routing(summary, output_dir / f"routing_{stem}.png", f"{label}: gates by task and layer")
            choices = plot_choices(summary, output_dir / f"choices_{stem}.png", f"{label}: choice by task and layer")
            drawn += [gates.name, choices.name]
    elif plots:
        print("loramix eval: matplotlib is not installed; skipping plots (pip install matplotlib)", file=sys.stderr)
    details = {"routing": routing, "adapters": [str(path) for path in adapter_dirs], "split": split}
    json_path, md_path = write_report(results, output_dir, details, drawn)
    return {
        "results": results,
        "routing": routing,
        "report": json_path,
        "markdown": md_path,
        "plots": [output_dir / name for name in drawn],
    }
