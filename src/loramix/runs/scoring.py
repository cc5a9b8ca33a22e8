"""Score a model on a run's examples: the trainer's validation and ``loramix eval`` share this."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from loramix.data import Example, MultiTaskCollator
from loramix.model import MixtureModel
from loramix.runs.build import Run, make_template
from loramix.runs.metrics import classification_scores, generation_scores


def score_examples(run: Run, model: MixtureModel, examples: Sequence[Example]) -> dict[str, dict[str, float]]:
    """Per-task scores of ``model`` on ``examples`` with the run's template and evaluation settings."""
    template = make_template(run.recipe, run.tokenizer)
    settings = run.recipe.eval
    if run.recipe.model.task_type == "classification":
        collator = MultiTaskCollator(run.tokenizer)
        return classification_scores(model, examples, template, collator, settings.batch_size)
    return generation_scores(model, examples, template, run.tokenizer, settings.batch_size, settings.max_new_tokens)


def validation_evaluator(run: Run) -> Callable[[MixtureModel], dict[str, dict[str, float]]] | None:
    """The trainer's evaluator: per-task scores on the run's validation split (``None`` when it is empty)."""
    examples = run.split("validation")
    if not examples:
        return None
    return lambda model: score_examples(run, model, examples)
