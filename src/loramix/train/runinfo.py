"""A run's identity: its fingerprint, the guard of its output directory, and its saved split.

A run writes ``run.json`` into its output directory before it trains: the *fingerprint* of what it
trains (model, completed mixture config, tasks and labels, data hashes and split settings, the
optimisation settings and stages). ``--resume`` compares the new recipe's fingerprint with it before
anything is touched and refuses naming each difference (``mixture.lora_alpha: 16 -> 64``). A fresh run
refuses an output directory that holds another run's files unless told to overwrite them.

The trained adapter directory receives the same ``run.json`` and ``split.jsonl`` (every example of the
train/validation/test split), so ``loramix eval|merge|export`` rebuild the run without reading or
re-splitting the data files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from loramix.config import read_json_file
from loramix.data import DataError, Example, Splits, TaskData, TaskSet
from loramix.methods.base import get_method
from loramix.model import SAVE_ONLY_KEYS, is_mixture_directory, mixture_config_file
from loramix.train.checkpoint import PREFIX, STATE_NAME, list_checkpoints
from loramix.train.settings import RecipeError

RUN_FILE = "run.json"
SPLIT_FILE = "split.jsonl"
FORMAT = 1
#: Names (or name prefixes, for checkpoints) of what a run writes into its output directory.
RUN_ENTRIES = (RUN_FILE, "adapter", "log.jsonl", "tensorboard")
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
        recipe: the :class:`~loramix.train.recipe.Recipe`.
        mixture: the completed mixture config (``MixtureConfig.to_dict()``); options a stage sets are left
            out (:func:`comparable_mixture`).
        task_set: the tasks, in id order, with their labels.
        sources: one record per data source (its kind, settings and content hash; a ``file`` key, the
            data file's path, is left out).

    Returns:
        ``{"model", "mixture", "tasks", "data", "training", "stages"}``; logging, checkpointing and
        device settings are left out (they may change on ``--resume``).
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


# --------------------------------------------------------------------------- the output directory
def run_entries(directory: str | Path) -> list[Path]:
    """What a run wrote into ``directory``: ``run.json``, ``adapter/``, checkpoints (complete or being
    written), ``log.jsonl``, ``tensorboard/``. Other files are not a run's and are left alone."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        name = path.name
        if name in RUN_ENTRIES or name.startswith(PREFIX) or name.startswith(f".{PREFIX}"):
            found.append(path)
    return found


def _listing(entries: Sequence[Path]) -> str:
    names = [entry.name + ("/" if entry.is_dir() else "") for entry in entries]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


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


def check_output_dir(directory: str | Path, resume: bool | str | Path, overwrite: bool) -> Path | None:
    """Check, before anything is built or written, that a run may use ``directory``.

    Args:
        directory: the run's output directory.
        resume: ``True`` (the latest checkpoint in ``directory``), a checkpoint path, or ``False``.
        overwrite: the caller agreed to replace another run's files in ``directory``.

    Returns:
        The checkpoint a resume starts from, or ``None`` for a fresh run.

    Raises:
        RecipeError: resume and overwrite together; a fresh run into a directory holding another run
            without ``overwrite``; a resume with no checkpoint to resume from.
    """
    directory = Path(directory)
    if resume not in (None, False) and overwrite:
        raise RecipeError("--resume and --overwrite exclude each other: resume a run or replace it")
    if directory.exists() and not directory.is_dir():
        raise RecipeError(f"output directory {directory} is a file: choose a directory for output_dir")
    if is_mixture_directory(directory):
        raise RecipeError(
            f"output directory {directory} is an adapter directory (it holds a saved mixture): "
            "choose another output_dir (the run writes its adapter to <output_dir>/adapter)"
        )
    entries = run_entries(directory)
    if resume in (None, False):
        if entries and not overwrite:
            raise RecipeError(
                f"output directory {directory} holds another run ({_listing(entries)}): pass --resume to "
                "continue it, --overwrite to replace it, or choose another output_dir"
            )
        return None
    if resume is True:
        checkpoints = list_checkpoints(directory)
        if not checkpoints:
            what = f"it holds {_listing(entries)} but" if entries else "it"
            raise RecipeError(
                f"cannot resume: output directory {directory} has no checkpoint ({what} has no complete "
                f"{PREFIX}<step>/); train without --resume to start the run"
            )
        return checkpoints[-1]
    checkpoint = Path(resume)
    if not checkpoint.is_dir():
        raise RecipeError(f"cannot resume: checkpoint {checkpoint} does not exist")
    if not (checkpoint / STATE_NAME).is_file():
        raise RecipeError(f"cannot resume: {checkpoint} is not a complete checkpoint (no {STATE_NAME})")
    if checkpoint.resolve().parent != directory.resolve() and entries:
        raise RecipeError(
            f"cannot resume from {checkpoint} into output directory {directory}: it holds another run "
            f"({_listing(entries)}); resume into {checkpoint.parent} or an empty output_dir"
        )
    return checkpoint


def check_resume(
    directory: str | Path, checkpoint: Path, fingerprint: dict[str, Any], files: Sequence[str | None] = ()
) -> None:
    """Refuse to resume ``checkpoint`` under a recipe that trains something else.

    The run file is that of the checkpoint's run (``run.json`` beside it, else in ``directory``). A run
    written before run files existed is checked by its checkpoint's mixture config only, with a warning.

    Raises:
        RecipeError: naming every difference (``mixture.lora_alpha: 16 -> 64``, a task renamed, a data
            file changed, named from ``files``).
    """
    try:
        config_path = mixture_config_file(checkpoint)
        saved_mixture = read_json_file(config_path)
    except (OSError, ValueError) as error:
        raise RecipeError(f"cannot resume: the mixture config of {checkpoint} is unreadable ({error})") from None
    saved_mixture = {key: value for key, value in saved_mixture.items() if key not in SAVE_ONLY_KEYS}
    saved_mixture = comparable_mixture(saved_mixture)
    # the checkpoint's own config, so that a checkpoint of another run placed here is never adopted
    checkpoint_changes = [f"mixture.{line}" for line in _differences(saved_mixture, fingerprint["mixture"], "")]
    candidates = [checkpoint.parent / RUN_FILE, Path(directory) / RUN_FILE]
    run_file = next((path for path in candidates if path.is_file()), None)
    if run_file is not None:
        changes = describe_changes(read_run_file(run_file)["fingerprint"], fingerprint, files)
        source = str(run_file)
        if checkpoint_changes and checkpoint_changes != [line for line in changes if line.startswith("mixture.")]:
            changes.extend(line for line in checkpoint_changes if line not in changes)
            source += f" and {config_path}"
    else:
        changes, source = checkpoint_changes, str(config_path)
        if not changes:
            warnings.warn(
                f"{checkpoint} has no {RUN_FILE} (written by an older loramix): only its mixture config was "
                "checked; data files and training settings could not be compared",
                stacklevel=3,
            )
    if changes:
        raise RecipeError(
            f"cannot resume {checkpoint}: the recipe differs from the run it belongs to ({source}): "
            + "; ".join(changes)
            + ". Start a new run (another output_dir, or --overwrite) to train this recipe"
        )


def clear_run(directory: str | Path) -> list[str]:
    """Delete another run's files from ``directory`` (``--overwrite``), leaving any other file alone.

    The entries are first renamed into one hidden directory (all or none: a failed rename moves the
    others back), then that directory is deleted.

    Returns:
        The names removed.
    """
    directory = Path(directory)
    entries = run_entries(directory)
    if not entries:
        return []
    trash = directory / f".loramix-overwritten-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    moved: list[Path] = []
    try:
        for entry in entries:
            os.replace(entry, trash / entry.name)
            moved.append(entry)
    except OSError:
        for entry in moved:
            os.replace(trash / entry.name, entry)
        trash.rmdir()
        raise
    shutil.rmtree(trash)
    return [entry.name for entry in entries]


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
