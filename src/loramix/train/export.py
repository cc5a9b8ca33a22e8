"""Save a trained run's task as a standalone model: merged weights (``loramix merge``)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from loramix.heads import MultiTaskSequenceClassifier
from loramix.train.build import Run

HEAD_WEIGHTS = "task_head.safetensors"
HEAD_CONFIG = "task_head.json"


def resolve_task(run: Run, task: str | int) -> int:
    """The id of a task given by name or by id (a string of digits that is no task's name counts as an id).

    Raises:
        ValueError: no such task.
    """
    names = run.task_set.names
    if isinstance(task, str) and task not in names and task.isdigit():
        task = int(task)
    return run.model.mixture_config.task_index(task)


def save_merged(run: Run, task: str | int, directory: str | Path) -> Path:
    """Fold one task into the base weights and save a plain model with ``save_pretrained``.

    A causal LM is saved whole with its tokenizer. For classification the merged encoder is saved with
    ``save_pretrained`` (load it with ``AutoModel``), with the task's head beside it:
    ``task_head.safetensors`` (``weight`` [labels, hidden], ``bias`` [labels]) and ``task_head.json``
    (the task, its label names and the pooling: the mean of the last hidden states over non-pad tokens).

    Returns:
        The output directory.
    """
    task_id = resolve_task(run, task)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merged = run.model.merge(task_id)
    if isinstance(merged, MultiTaskSequenceClassifier):
        merged.encoder.save_pretrained(directory)
        head = merged.heads[task_id]
        save_file(
            {"weight": head.weight.detach().contiguous().cpu(), "bias": head.bias.detach().contiguous().cpu()},
            str(directory / HEAD_WEIGHTS),
        )
        name = run.task_set.name(task_id)
        config = {"task": name, "labels": list(run.task_set.labels(name) or ()), "pooling": "mean"}
        (directory / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    else:
        merged.save_pretrained(directory)
    run.tokenizer.save_pretrained(directory)
    return directory
