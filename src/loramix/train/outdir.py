"""The guard of a training run's output directory: refuse another run's files, resume only the same run.

A fresh run refuses an output directory that holds another run's files unless told to overwrite them;
``--resume`` compares the new recipe's fingerprint (:mod:`loramix.runs.runinfo`) with the run's
``run.json`` before anything is touched and refuses naming each difference.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loramix.config import read_json_file
from loramix.model import SAVE_ONLY_KEYS, is_mixture_directory, mixture_config_file
from loramix.runs.runinfo import RUN_FILE, _differences, comparable_mixture, describe_changes, read_run_file
from loramix.runs.settings import RecipeError
from loramix.train.checkpoint import PREFIX, STATE_NAME, list_checkpoints

#: Names (or name prefixes, for checkpoints) of what a run writes into its output directory.
RUN_ENTRIES = (RUN_FILE, "adapter", "log.jsonl", "tensorboard")


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
    _refuse_non_run_directory(directory, "run")
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


def check_trainer_output_dir(directory: str | Path, fresh: bool, overwrite: bool) -> None:
    """The :class:`~loramix.train.trainer.Trainer`'s own check of its output directory, before it writes.

    A fresh start refuses a directory holding another run's adapter, checkpoints or logs unless
    ``overwrite`` (``run.json`` alone is allowed: :func:`~loramix.train.pipeline.train_recipe` writes it for
    the run it is about to start). A resume continues the run in the directory, so it is not refused here.

    Args:
        directory: the trainer's output directory.
        fresh: the trainer starts afresh (no checkpoint is resumed).
        overwrite: the caller agreed to replace another run's files (only valid for a fresh start).

    Raises:
        RecipeError: overwrite with a resume; the directory is a file or a saved adapter; a fresh start
            into another run's files without ``overwrite``.
    """
    directory = Path(directory)
    if overwrite and not fresh:
        raise RecipeError("Trainer: overwrite=True and resume_from exclude each other: resume a run or replace it")
    _refuse_non_run_directory(directory, "trainer")
    others = [entry for entry in run_entries(directory) if entry.name != RUN_FILE]
    if fresh and others and not overwrite:
        raise RecipeError(
            f"output directory {directory} holds another run ({_listing(others)}): pass resume_from=True to "
            "continue it, overwrite=True to replace it, or choose another output_dir"
        )


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


def _refuse_non_run_directory(directory: Path, writer: str) -> None:
    """Refuse an output directory that is a file or a saved adapter (``writer`` names who writes there)."""
    if directory.exists() and not directory.is_dir():
        raise RecipeError(f"output directory {directory} is a file: choose a directory for output_dir")
    if is_mixture_directory(directory):
        raise RecipeError(
            f"output directory {directory} is an adapter directory (it holds a saved mixture): "
            f"choose another output_dir (the {writer} writes its adapter to <output_dir>/adapter)"
        )
