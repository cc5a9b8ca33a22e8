"""Training: the accelerate loop, stages, checkpoints with exact resume, schedules, logs and recipes."""

from loramix.train.batches import BatchSource, TensorBatches, stack_examples
from loramix.train.checkpoint import CheckpointManager, latest_checkpoint, list_checkpoints
from loramix.train.logs import RunLogger, read_log
from loramix.train.schedules import WarmupSchedule, make_scheduler
from loramix.train.settings import RecipeError, StageSettings, TrainingSettings
from loramix.train.trainer import Trainer, TrainerState

__all__ = [
    "BatchSource",
    "CheckpointManager",
    "RecipeError",
    "RunLogger",
    "StageSettings",
    "TensorBatches",
    "Trainer",
    "TrainerState",
    "TrainingSettings",
    "WarmupSchedule",
    "latest_checkpoint",
    "list_checkpoints",
    "make_scheduler",
    "read_log",
    "stack_examples",
]
