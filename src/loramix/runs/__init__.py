"""Runs: what training and evaluation share, below both.

A recipe (:mod:`~loramix.runs.recipe`, its training settings and schedules) describes a run; building it
(:mod:`~loramix.runs.build`) gives the tokenizer, the task set and split, the mixture model and the training
batches; :mod:`~loramix.runs.runinfo` holds the run's fingerprint and saved split; :mod:`~loramix.runs.scoring`
scores a model on a run's examples. :mod:`loramix.train` and :mod:`loramix.eval` both use this package and
neither imports the other.
"""

from loramix.runs.build import Run, build_run, load_run
from loramix.runs.recipe import Recipe
from loramix.runs.scoring import score_examples, validation_evaluator
from loramix.runs.settings import RecipeError, StageSettings, TrainingSettings

__all__ = [
    "Recipe",
    "RecipeError",
    "Run",
    "StageSettings",
    "TrainingSettings",
    "build_run",
    "load_run",
    "score_examples",
    "validation_evaluator",
]
