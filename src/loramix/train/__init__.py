"""Training: the accelerate loop, stages, checkpoints with exact resume, logs and ``train_recipe``.

The recipe, its settings and schedules, the run and its batches live in :mod:`loramix.runs` (shared with
:mod:`loramix.eval`) and are re-exported here under the names they have always had.
"""

from loramix.runs.batches import BatchSource, SampledBatches, TensorBatches, stack_examples
from loramix.runs.build import Run, build_run, load_run
from loramix.runs.recipe import Recipe
from loramix.runs.schedules import WarmupSchedule, make_scheduler
from loramix.runs.settings import RecipeError, StageSettings, TrainingSettings
from loramix.train.checkpoint import CheckpointManager, latest_checkpoint, list_checkpoints
from loramix.train.logs import RunLogger, read_log
from loramix.train.pipeline import train_recipe
from loramix.train.trainer import Trainer, TrainerState

__all__ = [
    "BatchSource",
    "CheckpointManager",
    "Recipe",
    "RecipeError",
    "Run",
    "RunLogger",
    "SampledBatches",
    "StageSettings",
    "TensorBatches",
    "Trainer",
    "TrainerState",
    "TrainingSettings",
    "WarmupSchedule",
    "build_run",
    "latest_checkpoint",
    "list_checkpoints",
    "load_run",
    "make_scheduler",
    "read_log",
    "stack_examples",
    "train_recipe",
]
