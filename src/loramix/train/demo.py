"""``loramix demo``: train several methods on one recipe, then compare them per task.

The demo file is YAML with two sections: ``recipe`` (a recipe shared by every method, without
``mixture``) and ``methods`` (a list of ``{name, mixture}``).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import yaml

from loramix.train.recipe import Recipe
from loramix.train.settings import RecipeError

DEMO_RECIPE = "demo.yaml"
_METHOD_KEYS = {"name", "mixture"}


def default_demo_recipe() -> Path:
    """``recipes/demo.yaml`` under the working directory, else in the source checkout loramix runs from.

    Raises:
        RecipeError: neither exists.
    """
    candidates = [Path.cwd() / "recipes" / DEMO_RECIPE, Path(__file__).resolve().parents[3] / "recipes" / DEMO_RECIPE]
    for path in candidates:
        if path.is_file():
            return path
    raise RecipeError(f"no demo recipe found at {[str(path) for path in candidates]}; pass --recipe")


def demo_recipes(spec: dict[str, Any], output_dir: Path, max_steps: int | None = None) -> list[Recipe]:
    """One recipe per method of a demo file, each writing to ``output_dir / <name>``.

    Raises:
        RecipeError: the file lacks a section or a method entry is malformed.
    """
    unknown = sorted(set(spec) - {"recipe", "methods"})
    if unknown or "recipe" not in spec or not spec.get("methods"):
        raise RecipeError(f"a demo file has the sections 'recipe' and 'methods' (found {sorted(spec)})")
    recipes = []
    for index, entry in enumerate(spec["methods"]):
        if not isinstance(entry, dict) or set(entry) != _METHOD_KEYS:
            raise RecipeError(f"methods[{index}] must have exactly the keys name and mixture")
        mixture = entry["mixture"]
        data = copy.deepcopy(spec["recipe"])
        data.update(name=entry["name"], mixture=mixture, output_dir=str(output_dir / entry["name"]))
        recipe = Recipe.from_dict(data)
        if max_steps:
            recipe.training.max_steps = max_steps
        recipes.append(recipe)
    return recipes


def run_demo(recipe_path: str | Path | None, output_dir: str | Path, max_steps: int | None = None) -> dict[str, Any]:
    """Train each method of the demo file, evaluate them all and print the per-task table.

    Args:
        recipe_path: the demo file (``None``: :func:`default_demo_recipe`).
        output_dir: where each method's run and the report go.
        max_steps: override every method's training steps.

    Returns:
        What :func:`loramix.eval.evaluate_adapters` returns.
    """
    from loramix.eval import evaluate_adapters, markdown_table
    from loramix.train.pipeline import train_recipe

    path = Path(recipe_path) if recipe_path else default_demo_recipe()
    spec = yaml.safe_load(path.read_text())
    output_dir = Path(output_dir)
    started = time.perf_counter()
    adapters = []
    for recipe in demo_recipes(spec, output_dir, max_steps):
        method, steps = recipe.mixture.get("method"), recipe.training.max_steps
        print(f"loramix demo: training {recipe.label} ({method}), {steps} steps")
        train_recipe(recipe)
        adapters.append(Path(recipe.output_dir) / "adapter")
    print("loramix demo: evaluating")
    outcome = evaluate_adapters(adapters, output_dir / "report")
    minutes = (time.perf_counter() - started) / 60
    print()
    print(markdown_table(outcome["results"]))
    print(f"report: {outcome['markdown']} (and {outcome['report'].name})")
    for plot in outcome["plots"]:
        print(f"plot: {plot}")
    print(f"runs: {output_dir} ({minutes:.1f} min)")
    return outcome
