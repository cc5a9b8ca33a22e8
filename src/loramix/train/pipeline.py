"""Train a recipe end to end: check the output directory, build the run, train it, keep the recipe and split."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from loramix.runs.build import Run, build_run, save_run_recipe
from loramix.runs.recipe import Recipe
from loramix.runs.runinfo import RUN_FILE, data_files, write_run_file
from loramix.runs.scoring import validation_evaluator
from loramix.runs.settings import check_precision
from loramix.train.outdir import check_output_dir, check_resume, clear_run
from loramix.train.trainer import ADAPTER_DIR, Trainer, TrainerState


def _is_main_process() -> bool:
    """Rank 0 of a launched job (``torchrun``/``accelerate launch`` set ``RANK``), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def train_recipe(
    recipe: Recipe | str | Path, resume: bool | str | Path = False, overwrite: bool = False
) -> tuple[Run, TrainerState]:
    """Train the run a recipe describes.

    Writes under ``recipe.output_dir``: ``run.json`` (the run's fingerprint, first), ``log.jsonl`` (and
    TensorBoard events when installed), ``checkpoint-<step>/`` directories, and ``adapter/`` (the trained
    adapter with ``recipe.yaml``, ``run.json`` and ``split.jsonl``, ready for ``loramix eval|merge|export``
    without the data files). Validation runs on the recipe's validation split.

    Everything is checked before anything is written: the recipe against the data and the model, the
    precision against the device, and the output directory. A fresh run refuses a directory holding
    another run (``run.json``, ``adapter/``, checkpoints, ``log.jsonl``, ``tensorboard/``) unless
    ``overwrite``, which deletes those (and only those) once every check has passed, before training. A
    resume needs a checkpoint and refuses a recipe whose fingerprint differs from the run's, naming each
    change.

    Args:
        recipe: a :class:`Recipe` or the path of a YAML recipe.
        resume: ``True`` to continue from the latest checkpoint in the output directory, or a checkpoint
            path.
        overwrite: replace another run's files in the output directory.

    Returns:
        The built run (its model trained) and the trainer's final state.

    Raises:
        RecipeError: a check failed (the message names the field, file or change); nothing was written.
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    check_precision(recipe.training)
    output_dir = Path(recipe.output_dir)
    main = _is_main_process()
    # Only rank 0 guards the directory: the others would see the run file rank 0 writes.
    checkpoint = check_output_dir(output_dir, resume, overwrite) if main else None
    run = build_run(recipe)
    fingerprint, files = run.fingerprint, data_files(run.sources)
    if main:
        if checkpoint is not None:
            check_resume(output_dir, checkpoint, fingerprint, files)
            if not (output_dir / RUN_FILE).is_file():
                write_run_file(output_dir / RUN_FILE, fingerprint, files)
        else:
            if overwrite:
                clear_run(output_dir)
            write_run_file(output_dir / RUN_FILE, fingerprint, files)
    options = {}
    if "fingerprint" in inspect.signature(Trainer).parameters:
        options["fingerprint"] = fingerprint
    trainer = Trainer(
        run.model,
        recipe.training,
        run.batches,
        recipe.output_dir,
        stages=recipe.stages or None,
        evaluator=validation_evaluator(run),
        **options,
    )
    state = trainer.train(resume_from=resume)
    if trainer.accelerator.is_main_process:
        save_run_recipe(recipe, output_dir / ADAPTER_DIR, run)
    trainer.accelerator.wait_for_everyone()
    return run, state
