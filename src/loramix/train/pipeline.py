"""Train a recipe end to end: build the run, train it, keep the recipe with the adapter."""

from __future__ import annotations

from pathlib import Path

from loramix.train.build import Run, build_run, save_run_recipe
from loramix.train.recipe import Recipe
from loramix.train.trainer import ADAPTER_DIR, Trainer, TrainerState


def train_recipe(recipe: Recipe | str | Path, resume: bool | str | Path = False) -> tuple[Run, TrainerState]:
    """Train the run a recipe describes.

    Writes under ``recipe.output_dir``: ``log.jsonl`` (and TensorBoard events when installed),
    ``checkpoint-<step>/`` directories, and ``adapter/`` (the trained adapter with ``recipe.yaml``,
    ready for ``loramix eval|merge|export``). Validation runs on the recipe's validation split.

    Args:
        recipe: a :class:`Recipe` or the path of a YAML recipe.
        resume: ``True`` to continue from the latest checkpoint in the output directory, or a checkpoint
            path.

    Returns:
        The built run (its model trained) and the trainer's final state.
    """
    from loramix.eval.evaluate import validation_evaluator

    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    run = build_run(recipe)
    trainer = Trainer(
        run.model,
        recipe.training,
        run.batches,
        recipe.output_dir,
        stages=recipe.stages or None,
        evaluator=validation_evaluator(run),
    )
    state = trainer.train(resume_from=resume)
    if trainer.accelerator.is_main_process:
        save_run_recipe(recipe, Path(recipe.output_dir) / ADAPTER_DIR)
    trainer.accelerator.wait_for_everyone()
    return run, state
