"""Multi-task data: sources, the task set, splits, templates, samplers and collators.

This package knows nothing of the model: it turns files and datasets into batches of tensors with
``input_ids``, ``attention_mask``, ``labels`` and ``task_ids``.
"""

from loramix.data.bigbench import (
    DEFAULT_SUBTASKS,
    list_bigbench_subtasks,
    list_bigbench_tasks,
    load_bigbench_task,
)
from loramix.data.collate import MultiTaskCollator, MultiTaskDataset
from loramix.data.samplers import STRATEGIES, MultiTaskBatchSampler, task_probabilities
from loramix.data.sources import (
    DataError,
    Example,
    Splits,
    TaskData,
    TaskSet,
    load_hf_dataset,
    load_jsonl,
    split_examples,
)
from loramix.data.templates import IGNORE_INDEX, ClassificationTemplate, GenerationTemplate

__all__ = [
    "DEFAULT_SUBTASKS",
    "IGNORE_INDEX",
    "STRATEGIES",
    "ClassificationTemplate",
    "DataError",
    "Example",
    "GenerationTemplate",
    "MultiTaskBatchSampler",
    "MultiTaskCollator",
    "MultiTaskDataset",
    "Splits",
    "TaskData",
    "TaskSet",
    "list_bigbench_subtasks",
    "list_bigbench_tasks",
    "load_bigbench_task",
    "load_hf_dataset",
    "load_jsonl",
    "split_examples",
    "task_probabilities",
]
