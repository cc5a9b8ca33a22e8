"""BIG-bench ``task.json`` files as loramix tasks.

A BIG-bench JSON task holds ``examples`` with an ``input`` and either ``target_scores`` (a multiple-choice
map from choice to score, the highest being correct) or ``target`` (a string or a list of acceptable
strings), or both. Tasks split into subtasks keep them in subdirectories, each with its own
``task.json``; the parent file then holds no examples.

:func:`load_bigbench_task` turns one task into :class:`~loramix.data.sources.TaskData`: classification
when every example is multiple choice over the same choices (the label names are those choices, in the
first example's order), generation otherwise (the target is ``target`` when present, else the
highest-scoring choice).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from loramix import assets
from loramix.data.sources import DataError, Example, TaskData

#: Subtasks read by default for tasks whose subtasks overlap. ``multiemo``'s ``all_*`` subtasks are the
#: union of its four domains (hotels, medicine, products, reviews), in 11 languages; its default is the
#: whole-review English set. ``elementary_math_qa``'s other subtasks repeat its questions with hints.
DEFAULT_SUBTASKS: dict[str, tuple[str, ...]] = {
    "multiemo": ("all_text_{language}",),
    "elementary_math_qa": ("question_only",),
}

_LANGUAGE_SUFFIX = re.compile(r"^(?P<stem>.+)_(?P<language>[a-z]{2})$")
_INPUT_PREFIX = "\nQ: "
_OUTPUT_PREFIX = "\nA: "
_CHOICE_PREFIX = "\n  choice: "


def _default_root() -> Path:
    return assets.bigbench_tasks_dir()


def list_bigbench_tasks(root: str | os.PathLike[str] | None = None) -> list[str]:
    """List the tasks of a BIG-bench ``benchmark_tasks`` directory that have a ``task.json``.

    Args:
        root: The directory; by default :func:`loramix.assets.bigbench_tasks_dir` (never downloads).

    Returns:
        Sorted task names.
    """
    root = Path(root) if root is not None else _default_root()
    return sorted(path.parent.name for path in root.glob("*/task.json"))


def list_bigbench_subtasks(name: str, root: str | os.PathLike[str] | None = None) -> list[str]:
    """List a BIG-bench task's subtasks (subdirectories with a ``task.json``).

    Args:
        name: The task.
        root: The ``benchmark_tasks`` directory; by default :func:`loramix.assets.bigbench_tasks_dir`.

    Returns:
        Sorted subtask names; empty for a task without subtasks.
    """
    root = Path(root) if root is not None else _default_root()
    return sorted(path.parent.name for path in (root / name).glob("*/task.json"))


def _select_language(subtasks: list[str], language: str) -> list[str]:
    """Drop subtasks in another language when a sibling in ``language`` exists (``x_de`` vs ``x_en``)."""
    stems_in_language = {
        match["stem"] for match in map(_LANGUAGE_SUFFIX.match, subtasks) if match and match["language"] == language
    }
    kept = []
    for subtask in subtasks:
        match = _LANGUAGE_SUFFIX.match(subtask)
        if match and match["language"] != language and match["stem"] in stems_in_language:
            continue
        kept.append(subtask)
    return kept


def _format_input(example: dict[str, Any], spec: dict[str, Any], show_choices: bool) -> str:
    """Compose the input as BIG-bench shows it to a model: prefixes and, when asked, the choices."""
    text = spec.get("task_prefix", "") + spec.get("example_input_prefix", _INPUT_PREFIX) + example["input"]
    if show_choices and "target_scores" in example and spec.get("append_choices_to_input", True):
        choice_prefix = spec.get("choice_prefix", _CHOICE_PREFIX)
        text += "".join(choice_prefix + choice for choice in example["target_scores"])
    return text + spec.get("example_output_prefix", _OUTPUT_PREFIX)


def _best_choice(scores: dict[str, Any], where: str) -> str:
    if not scores:
        raise DataError(f"{where}: empty target_scores")
    best = max(scores.values())
    winners = [choice for choice, score in scores.items() if score == best]
    if len(winners) != 1:
        raise DataError(f"{where}: target_scores has {len(winners)} best choices {winners}")
    return winners[0]


def load_bigbench_task(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    subtasks: Sequence[str] | None = None,
    language: str | None = "en",
    mode: Literal["auto", "classification", "generation"] = "auto",
    task_name: str | None = None,
    add_prefixes: bool = False,
    max_examples: int | None = None,
) -> TaskData:
    """Read a BIG-bench JSON task (with its subtasks) as one loramix task.

    Args:
        name: A task (``"hyperbaton"``) or one subtask (``"multiemo/all_sentence_en"``).
        root: The ``benchmark_tasks`` directory; by default :func:`loramix.assets.bigbench_tasks_dir`.
        subtasks: For a task with subtasks, the ones to read (their examples are concatenated); by
            default those in :data:`DEFAULT_SUBTASKS` for the task, else all of them.
        language: Where subtasks come in several languages (``all_text_en``, ``all_text_de``), keep only
            this language's; ``{language}`` in a default subtask name is replaced by it. None keeps all.
        mode: ``"classification"`` (every example multiple choice over one choice set), ``"generation"``,
            or ``"auto"``: classification when possible, else generation.
        task_name: The loramix task name; by default ``name``.
        add_prefixes: Compose each input as BIG-bench presents it (``task_prefix``, the example input and
            output prefixes, and for generation from multiple choice the choices); else the raw input.
        max_examples: Keep only the first this many examples (in file order).

    Returns:
        The task's examples; ``labels`` holds the choice names for classification.

    Raises:
        DataError: Naming the file and example index, for a missing ``input``, an example without
            ``target_scores`` or ``target``, tied best choices, choices that differ from the label set
            (forced classification); or when the task is unknown or has no example.
    """
    root = Path(root) if root is not None else _default_root()
    task_dir = root / name
    if not (task_dir / "task.json").is_file():
        raise DataError(f"no BIG-bench task {name!r} in {root} (no {task_dir / 'task.json'})")

    files = [task_dir / "task.json"]
    available = list_bigbench_subtasks(name, root)
    if available:
        default = DEFAULT_SUBTASKS.get(name)
        chosen = list(subtasks) if subtasks is not None else list(default) if default else list(available)
        chosen = [subtask.format(language=language or "en") for subtask in chosen]
        if language is not None and subtasks is None:
            chosen = _select_language(chosen, language)
        unknown = [subtask for subtask in chosen if subtask not in available]
        if unknown:
            raise DataError(f"BIG-bench task {name!r} has no subtasks {unknown}; it has {available}")
        files = [task_dir / subtask / "task.json" for subtask in chosen]
    elif subtasks:
        raise DataError(f"BIG-bench task {name!r} has no subtasks")

    raw: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for file in files:
        with open(file, encoding="utf-8") as handle:
            spec = json.load(handle)
        for index, example in enumerate(spec.get("examples", [])):
            raw.append((f"{file} example {index}", example, spec))
    if max_examples is not None:
        raw = raw[:max_examples]
    if not raw:
        raise DataError(f"BIG-bench task {name!r} has no examples in {[str(file) for file in files]}")

    for where, example, _ in raw:
        if not isinstance(example.get("input"), str):
            raise DataError(f"{where}: missing field 'input'")
        if "target_scores" not in example and "target" not in example:
            raise DataError(f"{where}: needs 'target_scores' or 'target'")

    first_scores = raw[0][1].get("target_scores")
    choices = tuple(first_scores) if isinstance(first_scores, dict) else None
    same_choices = choices is not None and all(
        isinstance(example.get("target_scores"), dict) and set(example["target_scores"]) == set(choices)
        for _, example, _ in raw
    )
    if mode == "auto":
        mode = "classification" if same_choices else "generation"
    task_name = task_name or name

    if mode == "classification":
        examples = []
        for where, example, spec in raw:
            scores = example.get("target_scores")
            if not isinstance(scores, dict) or set(scores) != set(choices or ()):
                raise DataError(f"{where}: choices {list(scores or ())} differ from the label set {choices}")
            text = _format_input(example, spec, False) if add_prefixes else example["input"]
            label = choices.index(_best_choice(scores, where))
            examples.append(Example(task=task_name, text=text, label=label))
        return TaskData(task_name, examples, choices)
    if mode != "generation":
        raise DataError(f"mode must be 'auto', 'classification' or 'generation', got {mode!r}")

    examples = []
    for where, example, spec in raw:
        target = example.get("target")
        if target is None:
            references: tuple[str, ...] = (_best_choice(example["target_scores"], where),)
        else:
            references = (target,) if isinstance(target, str) else tuple(target)
        if not references or not all(isinstance(item, str) for item in references):
            raise DataError(f"{where}: 'target' must be a string or a non-empty list of strings")
        text = _format_input(example, spec, True) if add_prefixes else example["input"]
        examples.append(Example(task=task_name, text=text, target=references[0], references=references))
    return TaskData(task_name, examples, None)
