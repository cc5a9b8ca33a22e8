"""Multi-task examples, the task registry, file and dataset sources, and seeded splits.

A source returns :class:`TaskData` (one task's examples and, for classification, its label names). A
:class:`TaskSet` fixes the order of tasks (task name <-> task id) and their label sets, and stamps
``task_id`` on examples. :func:`split_examples` cuts examples into train/validation/test, per task,
with a seeded ``random.Random`` so the split is the same on every run and platform.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple


class DataError(ValueError):
    """Data that cannot be used: a missing field, an unknown task, an empty task, a label out of range."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One input of one task.

    Attributes:
        task: The task's name.
        text: The input text (for generation: the prompt's content, before any chat template).
        target: The reference output of a generation task, else None.
        label: The class id of a classification task (an index into the task's label names), else None.
        task_id: The task's id in a :class:`TaskSet`; None until :meth:`TaskSet.assign` sets it.
        references: Every acceptable output of a generation task (``target`` is the first), for metrics.
    """

    task: str
    text: str
    target: str | None = None
    label: int | None = None
    task_id: int | None = None
    references: tuple[str, ...] = ()


@dataclasses.dataclass
class TaskData:
    """The examples of one task as a source returns them.

    Attributes:
        name: The task's name.
        examples: The task's examples, in source order.
        labels: The label names of a classification task (label id i is ``labels[i]``); None for generation.
    """

    name: str
    examples: list[Example]
    labels: tuple[str, ...] | None = None

    @property
    def is_classification(self) -> bool:
        """True when the task has label names."""
        return self.labels is not None


class TaskSet:
    """The ordered tasks of a multi-task run: task name <-> task id, and each task's label names.

    Args:
        tasks: ``(name, labels)`` pairs in id order; ``labels`` is a sequence of label names for a
            classification task and None for a generation task. A plain name means a generation task.

    Raises:
        DataError: When a task name repeats or a label set is empty or repeats a name.
    """

    def __init__(self, tasks: Iterable[str | tuple[str, Sequence[str] | None]] = ()) -> None:
        self._names: list[str] = []
        self._ids: dict[str, int] = {}
        self._labels: dict[str, tuple[str, ...] | None] = {}
        for task in tasks:
            name, labels = (task, None) if isinstance(task, str) else task
            self.add(name, labels)

    @classmethod
    def from_task_data(cls, data: Iterable[TaskData]) -> TaskSet:
        """Build a task set from sources' results, ids in the order given.

        Args:
            data: One :class:`TaskData` per task.

        Returns:
            The task set.
        """
        return cls((item.name, item.labels) for item in data)

    def add(self, name: str, labels: Sequence[str] | None = None) -> int:
        """Append a task.

        Args:
            name: The task's name.
            labels: Its label names (classification) or None (generation).

        Returns:
            The new task's id.

        Raises:
            DataError: When the name is taken or the labels are empty or repeat.
        """
        if not name:
            raise DataError("a task needs a non-empty name")
        if name in self._ids:
            raise DataError(f"task {name!r} is already in the task set")
        if labels is not None:
            labels = tuple(str(label) for label in labels)
            if not labels or len(set(labels)) != len(labels):
                raise DataError(f"task {name!r}: label names must be non-empty and distinct, got {labels}")
        self._ids[name] = len(self._names)
        self._names.append(name)
        self._labels[name] = labels
        return self._ids[name]

    @property
    def names(self) -> list[str]:
        """Task names in id order."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def __iter__(self):
        return iter(self._names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskSet) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"TaskSet({[(name, self._labels[name]) for name in self._names]})"

    def task_id(self, name: str) -> int:
        """Return a task's id.

        Raises:
            DataError: When the task is unknown.
        """
        try:
            return self._ids[name]
        except KeyError:
            raise DataError(f"unknown task {name!r}; known tasks: {self._names}") from None

    def name(self, task_id: int) -> str:
        """Return the name of the task with id ``task_id``."""
        if not 0 <= task_id < len(self._names):
            raise DataError(f"task id {task_id} is outside 0..{len(self._names) - 1}")
        return self._names[task_id]

    def labels(self, name: str) -> tuple[str, ...] | None:
        """Return a task's label names, or None for a generation task."""
        self.task_id(name)
        return self._labels[name]

    def num_labels(self, name: str) -> int:
        """Return the number of classes of a task (0 for a generation task)."""
        labels = self.labels(name)
        return 0 if labels is None else len(labels)

    def is_classification(self, name: str) -> bool:
        """True when the task has label names."""
        return self.labels(name) is not None

    def assign(self, examples: Iterable[Example], require_all: bool = False) -> list[Example]:
        """Check examples against the task set and return copies with ``task_id`` set.

        Args:
            examples: Examples of tasks in this set.
            require_all: Raise when some task of the set has no example.

        Returns:
            New examples, in the same order, with ``task_id`` filled in.

        Raises:
            DataError: Naming the example's index, when its task is unknown, a classification example
                has no label or a label outside the task's label set, or a generation example has no
                target; or, with ``require_all``, naming the tasks without examples.
        """
        assigned = []
        for index, example in enumerate(examples):
            if example.task not in self._ids:
                raise DataError(f"example {index}: unknown task {example.task!r}; known: {self._names}")
            labels = self._labels[example.task]
            if labels is not None:
                if example.label is None or not 0 <= example.label < len(labels):
                    raise DataError(
                        f"example {index} of task {example.task!r}: label {example.label!r} is outside "
                        f"0..{len(labels) - 1} ({list(labels)})"
                    )
            elif example.target is None:
                raise DataError(f"example {index} of generation task {example.task!r} has no target")
            assigned.append(dataclasses.replace(example, task_id=self._ids[example.task]))
        if require_all:
            seen = {example.task for example in assigned}
            empty = [name for name in self._names if name not in seen]
            if empty:
                raise DataError(f"tasks without examples: {empty}")
        return assigned

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dict (for checkpoints and reports)."""
        return {
            "tasks": [
                {"name": name, "labels": None if self._labels[name] is None else list(self._labels[name])}
                for name in self._names
            ]
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> TaskSet:
        """Rebuild a task set written by :meth:`to_dict`."""
        return cls((task["name"], task["labels"]) for task in state["tasks"])


def _field_text(record: Mapping[str, Any], fields: str | Sequence[str], where: str) -> str:
    """Read one text field, or join several with newlines."""
    names = [fields] if isinstance(fields, str) else list(fields)
    parts = []
    for name in names:
        if name not in record or record[name] is None:
            raise DataError(f"{where}: missing field {name!r}")
        parts.append(str(record[name]))
    return "\n".join(parts)


def _resolve_label(value: Any, labels: Sequence[str] | None, where: str) -> int:
    """Turn a label value (an id or a label name) into a label id."""
    if isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is neither an id nor a label name")
    if isinstance(value, int):
        if labels is not None and not 0 <= value < len(labels):
            raise DataError(f"{where}: label {value} is outside 0..{len(labels) - 1} ({list(labels)})")
        if value < 0:
            raise DataError(f"{where}: label {value} is negative")
        return value
    if isinstance(value, str):
        if labels is None:
            raise DataError(f"{where}: label name {value!r} needs a label set")
        if value not in labels:
            raise DataError(f"{where}: label {value!r} is not in the label set {list(labels)}")
        return list(labels).index(value)
    raise DataError(f"{where}: label {value!r} is neither an id nor a label name")


def _records_to_task_data(
    records: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    task: str | None,
    task_field: str,
    text_field: str | Sequence[str],
    label_field: str,
    target_field: str,
    labels: Mapping[str, Sequence[str]] | Sequence[str] | None,
    source: str,
    task_set: TaskSet | None = None,
) -> dict[str, TaskData]:
    """Shared record reader for JSONL files and Hugging Face datasets.

    ``records`` yields ``(where, record)`` pairs, ``where`` naming the record for error messages. String
    labels without a given label set get the sorted set of names seen, so ids do not depend on order.
    """
    rows: dict[str, list[tuple[str, str, Any, Any]]] = {}
    for where, record in records:
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected an object, got {type(record).__name__}")
        name = task if task is not None else record.get(task_field)
        if not name:
            raise DataError(f"{where}: missing field {task_field!r} (or pass task=...)")
        if task_set is not None and name not in task_set:
            raise DataError(f"{where}: unknown task {name!r}; known tasks: {task_set.names}")
        text = _field_text(record, text_field, where)
        label = record.get(label_field)
        target = record.get(target_field)
        if label is None and target is None:
            raise DataError(f"{where}: needs a {label_field!r} (classification) or {target_field!r} field")
        rows.setdefault(str(name), []).append((where, text, label, target))
    if not rows:
        raise DataError(f"{source}: no examples")

    result: dict[str, TaskData] = {}
    for name, task_rows in rows.items():
        given = labels.get(name) if isinstance(labels, Mapping) else labels
        if given is None and task_set is not None:
            given = task_set.labels(name)
        with_label = [row for row in task_rows if row[2] is not None]
        if with_label and len(with_label) != len(task_rows):
            where = next(row[0] for row in task_rows if row[2] is None)
            raise DataError(f"{where}: missing field {label_field!r} (other examples of {name!r} have one)")
        if with_label:
            label_names = tuple(str(label) for label in given) if given is not None else None
            if label_names is None:
                values = [row[2] for row in task_rows]
                if all(isinstance(value, str) for value in values):
                    label_names = tuple(sorted(set(values)))
                elif all(isinstance(value, int) and not isinstance(value, bool) for value in values):
                    label_names = tuple(str(i) for i in range(max(max(values) + 1, 1)))
            examples = [
                Example(task=name, text=text, label=_resolve_label(label, label_names, where))
                for where, text, label, _ in task_rows
            ]
            result[name] = TaskData(name, examples, label_names)
        else:
            examples = []
            for where, text, _, target in task_rows:
                references = (target,) if isinstance(target, str) else tuple(target)
                if not references or not all(isinstance(item, str) for item in references):
                    raise DataError(f"{where}: {target_field!r} must be a string or a list of strings")
                examples.append(Example(task=name, text=text, target=references[0], references=references))
            result[name] = TaskData(name, examples, None)
    return result


def load_jsonl(
    path: str | os.PathLike[str],
    *,
    task: str | None = None,
    task_field: str = "task",
    text_field: str | Sequence[str] = "text",
    label_field: str = "label",
    target_field: str = "target",
    labels: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    task_set: TaskSet | None = None,
) -> dict[str, TaskData]:
    """Read examples from a JSON Lines file: one object per line, blank lines skipped.

    A line is ``{"text": ..., "label": 2}`` or ``{"text": ..., "label": "positive"}`` (classification)
    or ``{"text": ..., "target": "..."}`` (generation; a list of strings gives several references).
    A file holds one task (pass ``task``) or several (each line names its own in ``task_field``).

    Args:
        path: The file.
        task: The task of every line; None reads each line's ``task_field``.
        task_field: The field naming a line's task.
        text_field: The input field, or several fields joined with newlines.
        label_field: The classification label field (an id or a label name).
        target_field: The generation target field.
        labels: Label names, for every task or per task; without them, string labels get their sorted
            distinct values and integer labels the names ``"0".."max"``.
        task_set: When given, every line's task must be in it, and its label names are the default.

    Returns:
        The tasks found, by name, in order of first appearance.

    Raises:
        DataError: Naming the file and line, for invalid JSON, a missing field, an unknown task, a label
            outside the label set; naming the file when it holds no example.
    """
    path = Path(path)

    def records() -> Iterable[tuple[str, Mapping[str, Any]]]:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: invalid JSON: {error.msg}") from None
                yield f"{path}:{number}", record

    return _records_to_task_data(
        records(),
        task=task,
        task_field=task_field,
        text_field=text_field,
        label_field=label_field,
        target_field=target_field,
        labels=labels,
        source=str(path),
        task_set=task_set,
    )


def load_hf_dataset(
    path_or_name: str | os.PathLike[str],
    *,
    task: str,
    split: str = "train",
    config: str | None = None,
    text_field: str | Sequence[str] = "text",
    label_field: str = "label",
    target_field: str = "target",
    labels: Sequence[str] | None = None,
) -> TaskData:
    """Read one task from a Hugging Face dataset saved on disk or on the Hub.

    ``datasets`` is imported only here, so it need not be installed for other sources. A directory
    is read with ``datasets.load_from_disk`` (a ``DatasetDict`` gives its ``split``); anything else is a
    Hub name for ``datasets.load_dataset(name, config, split=split)``, which honours ``HF_HUB_OFFLINE``.
    A ``ClassLabel`` label column supplies the label names.

    Args:
        path_or_name: A ``save_to_disk`` directory or a Hub dataset name.
        task: The task name to give the examples.
        split: The split to read.
        config: The Hub dataset's configuration name.
        text_field: The input column, or several joined with newlines.
        label_field: The classification label column.
        target_field: The generation target column.
        labels: Label names; by default the ``ClassLabel`` names when there are some.

    Returns:
        The task's examples.

    Raises:
        ImportError: When ``datasets`` is not installed.
        DataError: Naming the row index, for a missing field or a label outside the label set.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError("load_hf_dataset needs the `datasets` package: pip install datasets") from error

    if Path(path_or_name).is_dir():
        dataset = datasets.load_from_disk(str(path_or_name))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{path_or_name} has no split {split!r}; it has {list(dataset)}")
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(str(path_or_name), config, split=split)

    feature = dataset.features.get(label_field)
    if labels is None and isinstance(feature, datasets.ClassLabel):
        labels = feature.names
    source = f"{path_or_name}[{split}]"
    data = _records_to_task_data(
        ((f"{source} row {index}", row) for index, row in enumerate(dataset)),
        task=task,
        task_field="",
        text_field=text_field,
        label_field=label_field,
        target_field=target_field,
        labels=labels,
        source=source,
    )
    return data[task]


class Splits(NamedTuple):
    """Train, validation and test examples."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]


def _per_task(value: Any, task: str) -> Any:
    return value.get(task) if isinstance(value, Mapping) else value


def _split_size(value: int | float, count: int, task: str, what: str) -> int:
    """A split's size for a task from a count (int) or a fraction (float in [0, 1))."""
    if isinstance(value, bool) or value < 0:
        raise DataError(f"{what} size {value!r} must be a non-negative count or a fraction in [0, 1)")
    if isinstance(value, int):
        return min(value, count)
    if value >= 1:
        raise DataError(f"{what} fraction {value!r} must be below 1 (give an int for a count)")
    return min(math.floor(value * count + 0.5), count)


def split_examples(
    examples: Sequence[Example],
    *,
    validation: int | float | Mapping[str, int | float] = 0.1,
    test: int | float | Mapping[str, int | float] = 0.1,
    seed: int = 0,
    max_train: int | Mapping[str, int] | None = None,
    max_validation: int | Mapping[str, int] | None = None,
    max_test: int | Mapping[str, int] | None = None,
) -> Splits:
    """Split examples into train, validation and test, per task, reproducibly.

    Each task's examples are shuffled with ``random.Random(f"{seed}:{task}")`` (string seeds are hashed
    with SHA-512, so the order is the same on every run, platform and Python version since 3.2, and
    adding a task does not change the other tasks' splits). The first ``validation`` examples go to
    validation, the next ``test`` to test, the rest to train; each part is then cut to its cap. Tasks
    keep their order of first appearance.

    Args:
        examples: The examples of one or more tasks.
        validation: Validation size per task: an int count or a float fraction, or a mapping per task.
        test: Test size per task, the same way.
        seed: The split seed.
        max_train: At most this many train examples per task (int or mapping per task); None: no cap.
        max_validation: The same cap for validation.
        max_test: The same cap for test.

    Returns:
        ``Splits(train, validation, test)``.

    Raises:
        DataError: When a size is negative, a fraction is 1 or more, or validation and test together
            need more examples than a task has.
    """
    by_task: dict[str, list[Example]] = {}
    for example in examples:
        by_task.setdefault(example.task, []).append(example)
    train: list[Example] = []
    valid: list[Example] = []
    held_out: list[Example] = []
    for task, task_examples in by_task.items():
        order = list(range(len(task_examples)))
        random.Random(f"{seed}:{task}").shuffle(order)
        shuffled = [task_examples[i] for i in order]
        n_valid = _split_size(_per_task(validation, task) or 0, len(shuffled), task, "validation")
        n_test = _split_size(_per_task(test, task) or 0, len(shuffled), task, "test")
        if n_valid + n_test > len(shuffled):
            raise DataError(
                f"task {task!r} has {len(shuffled)} examples, fewer than validation {n_valid} + test {n_test}"
            )
        parts = (
            (valid, shuffled[:n_valid], max_validation),
            (held_out, shuffled[n_valid : n_valid + n_test], max_test),
            (train, shuffled[n_valid + n_test :], max_train),
        )
        for out, part, cap in parts:
            limit = _per_task(cap, task)
            out.extend(part if limit is None else part[:limit])
    return Splits(train, valid, held_out)
