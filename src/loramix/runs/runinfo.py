"""A run's identity: its fingerprint, its run file, and its saved split.

A run writes ``run.json`` into its output directory before it trains: the *fingerprint* of what it
trains (model, completed mixture config, tasks and labels, data hashes and split settings, the
optimisation settings and stages). :func:`describe_changes` names each difference between two
fingerprints (``mixture.lora_alpha: 16 -> 64``); the guard of the output directory that uses it on
``--resume`` is :mod:`loramix.train.outdir`.

The trained adapter directory receives the same ``run.json`` and ``split.jsonl`` (every example of the
train/validation/test split), so ``loramix eval|merge|export`` rebuild the run without reading or
re-splitting the data files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from loramix.assets import sha256_file
from loramix.data import DataError, Example, Splits, TaskData, TaskSet
from loramix.methods.base import get_method
from loramix.runs.settings import RecipeError

RUN_FILE = "run.json"
SPLIT_FILE = "split.jsonl"
FORMAT = 1
#: Training settings that do not change what is trained (free to change on ``--resume``).
UNTRACKED_TRAINING = ("log_every", "eval_every", "save_every", "keep_last", "progress_bar", "use_cpu")
UNTRACKED_TRAINING += ("gradient_checkpointing", "find_unused_parameters")
SPLIT_NAMES = ("train", "validation", "test")


def examples_sha256(tasks: Iterable[TaskData]) -> str:
    """The SHA-256 of tasks' content (names, labels, every example): for sources that are not one file."""
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(json.dumps([task.name, task.labels]).encode())
        for example in task.examples:
            record = [example.text, example.target, example.label, list(example.references)]
            digest.update(json.dumps(record, ensure_ascii=False).encode())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


def comparable_mixture(mixture: dict[str, Any]) -> dict[str, Any]:
    """A mixture config without the ``method_options`` its method lets training stages set.

    MoA's stages switch ``route_by`` (and may switch ``gate``) in the model's config, so checkpoints and the
    final adapter hold the mode of their stage; the stages' options, part of the fingerprint, say it.
    """
    try:
        keys = getattr(get_method(mixture.get("method")), "stage_settable_options", ())
    except (KeyError, ValueError, TypeError):
        return mixture
    options = mixture.get("method_options")
    if not keys or not isinstance(options, dict):
        return mixture
    return {**mixture, "method_options": {key: value for key, value in options.items() if key not in keys}}


def run_fingerprint(
    recipe: Any, mixture: dict[str, Any], task_set: TaskSet, sources: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """What a run trains, as plain JSON data: two runs with equal fingerprints train the same thing.

    Args:
        recipe: the :class:`~loramix.runs.recipe.Recipe`.
        mixture: the completed mixture config (``MixtureConfig.to_dict()``); options a stage sets are left
            out (:func:`comparable_mixture`).
        task_set: the tasks, in id order, with their labels.
        sources: one record per data source (its kind, settings and content hash; a ``file`` key, the
            data file's path, is left out).

    Returns:
        ``{"model", "mixture", "tasks", "data", "training", "stages"}``, and ``"init_adapter"`` (the sha256 of
        each file of the adapter the run starts from, not its path) when the recipe has one; logging,
        checkpointing and device settings are left out (they may change on ``--resume``).
    """
    data = dataclasses.asdict(recipe.data)
    # where a file lies is not part of what is trained, only its content (its sha256)
    data["tasks"] = [{key: value for key, value in source.items() if key != "file"} for source in sources]
    training = {
        key: value for key, value in dataclasses.asdict(recipe.training).items() if key not in UNTRACKED_TRAINING
    }
    stages = [dataclasses.asdict(stage.resolved(recipe.training)) for stage in recipe.stages]
    fingerprint = {
        "model": dataclasses.asdict(recipe.model),
        "mixture": comparable_mixture(mixture),
        "tasks": task_set.to_dict()["tasks"],
        "data": data,
        "training": training,
        "stages": stages,
    }
    if getattr(recipe, "init_adapter", None) is not None:
        # what the run starts from is its content: a resume from another or a changed adapter is refused
        folder = Path(recipe.init_adapter)
        fingerprint["init_adapter"] = (
            {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.is_file()}
            if folder.is_dir()
            else None
        )
    return _plain(fingerprint)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _differences(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in old:
                found.append(f"{where}: (none) -> {_short(new[key])}")
            elif key not in new:
                found.append(f"{where}: {_short(old[key])} -> (none)")
            else:
                found.extend(_differences(old[key], new[key], where))
        return found
    if path == "tasks" and old != new:
        names = [[task.get("name") for task in tasks] for tasks in (old, new)]
        if names[0] != names[1]:
            return [f"tasks: {names[0]} -> {names[1]}"]
        return [
            f"task {before['name']!r} labels: {_short(before.get('labels'))} -> {_short(after.get('labels'))}"
            for before, after in zip(old, new, strict=True)
            if before != after
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        found = []
        for index, (before, after) in enumerate(zip(old, new, strict=True)):
            found.extend(_differences(before, after, f"{path}[{index}]"))
        return found
    if old == new:
        return []
    return [f"{path}: {_short(old)} -> {_short(new)}"]


def data_files(sources: Sequence[dict[str, Any]]) -> list[str | None]:
    """The data file of each source record (``None`` for sources that are not one file)."""
    return [source.get("file") for source in sources]


def describe_changes(old: dict[str, Any], new: dict[str, Any], files: Sequence[str | None] = ()) -> list[str]:
    """The differences between two fingerprints, one ``field: old -> new`` line each.

    Tasks are compared by name (``tasks: [...] -> [...]``); a data file's change names the file (from
    ``files``, one per source of ``new``, as :func:`data_files` gives them).
    """
    changes = []
    old_sources = old.get("data", {}).get("tasks", [])
    new_sources = new.get("data", {}).get("tasks", [])
    if len(old_sources) == len(new_sources):
        for index, (before, after) in enumerate(zip(old_sources, new_sources, strict=True)):
            if before.get("sha256") != after.get("sha256"):
                file = files[index] if index < len(files) else None
                what = f"data file {file}" if file else f"the data of data.tasks[{index}]"
                changes.append(
                    f"{what} changed (data.tasks[{index}] sha256 {str(before.get('sha256'))[:12]} -> "
                    f"{str(after.get('sha256'))[:12]})"
                )
    for line in _differences(old, new, ""):
        if ".sha256:" not in line:
            changes.append(line)
    return changes


def read_run_file(path: str | Path) -> dict[str, Any]:
    """Read a ``run.json``.

    Raises:
        RecipeError: the file is not a run file of this version (naming the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RecipeError(f"{path}: not a readable run file ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("fingerprint"), dict):
        raise RecipeError(f"{path}: not a loramix run file (format {FORMAT} with a fingerprint)")
    return data


def write_run_file(path: str | Path, fingerprint: dict[str, Any], files: Sequence[str | None] = ()) -> None:
    """Write ``run.json``: the fingerprint and the data files it was taken from (atomically: a temporary
    file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    content = {"format": FORMAT, "fingerprint": fingerprint, "files": list(files)}
    staging.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    os.replace(staging, path)


# --------------------------------------------------------------------------- the saved split
def _example_record(split: str, example: Example) -> dict[str, Any]:
    record: dict[str, Any] = {"split": split, "task": example.task, "text": example.text}
    if example.label is not None:
        record["label"] = example.label
    if example.target is not None:
        record["target"] = example.target
    if example.references:
        record["references"] = list(example.references)
    return record


def write_split(
    directory: str | Path, fingerprint: dict[str, Any], splits: Splits, files: Sequence[str | None] = ()
) -> None:
    """Write ``run.json`` and ``split.jsonl`` (every example, with its split) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".{SPLIT_FILE}.tmp"
    with open(staging, "w", encoding="utf-8") as handle:
        for name in SPLIT_NAMES:
            for example in getattr(splits, name):
                handle.write(json.dumps(_example_record(name, example), ensure_ascii=False) + "\n")
    os.replace(staging, directory / SPLIT_FILE)
    write_run_file(directory / RUN_FILE, fingerprint, files)


def remove_split(directory: str | Path) -> None:
    """Remove a saved split and run file (they would not match a recipe written without them)."""
    for name in (SPLIT_FILE, RUN_FILE):
        (Path(directory) / name).unlink(missing_ok=True)


def read_split(directory: str | Path) -> tuple[TaskSet, Splits, dict[str, Any]] | None:
    """The task set, split and fingerprint saved in an adapter directory, or ``None`` when it has none.

    Raises:
        DataError: the split file is malformed or names a task the run file does not (file and line).
    """
    directory = Path(directory)
    split_path, run_path = directory / SPLIT_FILE, directory / RUN_FILE
    if not split_path.is_file() or not run_path.is_file():
        return None
    fingerprint = read_run_file(run_path)["fingerprint"]
    task_set = TaskSet.from_dict({"tasks": fingerprint["tasks"]})
    parts: dict[str, list[Example]] = {name: [] for name in SPLIT_NAMES}
    with open(split_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{split_path}:{number}"
            try:
                record = json.loads(line)
                example = Example(
                    task=record["task"],
                    text=record["text"],
                    target=record.get("target"),
                    label=record.get("label"),
                    references=tuple(record.get("references", ())),
                )
                parts[record["split"]].append(example)
            except (ValueError, KeyError, TypeError) as error:
                raise DataError(f"{where}: not a split record ({error!r})") from None
    for name in SPLIT_NAMES:
        try:
            parts[name] = task_set.assign(parts[name])
        except DataError as error:
            raise DataError(f"{split_path}: {error}") from None
    return task_set, Splits(parts["train"], parts["validation"], parts["test"]), fingerprint
