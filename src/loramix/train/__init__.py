"""Training: the accelerate loop, stages, checkpoints with exact resume, schedules, logs and recipes."""

from loramix.train.batches import BatchSource, SampledBatches, TensorBatches, stack_examples
from loramix.train.build import Run, build_run, load_run
from loramix.train.checkpoint import CheckpointManager, latest_checkpoint, list_checkpoints
from loramix.train.logs import RunLogger, read_log
from loramix.train.pipeline import train_recipe
from loramix.train.recipe import Recipe
from loramix.train.schedules import WarmupSchedule, make_scheduler
from loramix.train.settings import RecipeError, StageSettings, TrainingSettings
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
