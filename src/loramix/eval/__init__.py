"""Evaluation: per-task metrics, routing summaries, reports (Markdown + JSON) and plots.

The metrics and the scoring of a run live in :mod:`loramix.runs` (the trainer validates with them too)
and are re-exported here.
"""

from loramix.eval.evaluate import evaluate_adapters
from loramix.eval.plots import matplotlib_available, plot_choices, plot_routing, plot_scores
from loramix.eval.report import markdown_table, primary_metric, write_report
from loramix.eval.routing import routed_experts, routing_choices, routing_summary, task_gates
from loramix.runs.metrics import classification_scores, generation_scores, normalize_answer
from loramix.runs.scoring import score_examples, validation_evaluator

__all__ = [
    "classification_scores",
    "evaluate_adapters",
    "generation_scores",
    "markdown_table",
    "matplotlib_available",
    "normalize_answer",
    "plot_choices",
    "plot_routing",
    "plot_scores",
    "primary_metric",
    "routed_experts",
    "routing_choices",
    "routing_summary",
    "score_examples",
    "task_gates",
    "validation_evaluator",
    "write_report",
]
