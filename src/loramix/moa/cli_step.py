"""``loramix add-domain``: grow a trained MoA run by one domain from a JSONL file, with ``loramix train``'s trainer."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from loramix.config import read_json_file
from loramix.model import mixture_config_file
from loramix.runs.build import RECIPE_NAME
from loramix.runs.recipe import Recipe, SourceSpec
from loramix.runs.settings import RecipeError, StageSettings
from loramix.train.pipeline import train_recipe


def add_domain_recipe(
    adapter_dir: str | Path,
    jsonl: str | Path,
    name: str,
    out_dir: str | Path,
    replay_per_domain: int = 8,
    expert_steps: int = 100,
    router_steps: int = 50,
    learning_rate: float = 1e-3,
    max_length: int | None = None,
) -> Recipe:
    """The recipe that adds a domain to an ``moa`` run that ``loramix train`` wrote.

    It is the run's own recipe (saved beside its adapter) with ``init_adapter`` set to the adapter, the
    JSONL file appended as a task, the output in ``out_dir``, and two stages: ``new_expert`` (label
    routing, the new domain's data only, every earlier expert held bit-identical) and ``routers`` (router
    routing on the new domain plus the first ``replay_per_domain`` training examples of each earlier
    domain, experts frozen). The earlier domains' examples and split come from the run's saved split (their
    data files are not read again); ``max_length`` overrides the run's ``model.max_length``.

    Raises:
        RecipeError: the directory holds no trained run's recipe, the run is not an ``moa`` generation run,
            the name is taken, or a count is not a positive integer.
    """
    path = Path(adapter_dir) / RECIPE_NAME
    if not path.is_file():
        raise RecipeError(f"{adapter_dir} is not the adapter directory of a loramix run (no {RECIPE_NAME})")
    for label, value in (("replay", replay_per_domain), ("expert steps", expert_steps), ("router steps", router_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RecipeError(f"add-domain: {label}={value!r} is invalid: expected an integer >= 1")
    recipe = copy.deepcopy(Recipe.from_yaml(path))
    if recipe.mixture.get("method") != "moa" or recipe.model.task_type != "generation":
        method = recipe.mixture.get("method")
        raise RecipeError(f"{adapter_dir}: add-domain needs an 'moa' generation run, not {method!r}")
    earlier = read_json_file(mixture_config_file(adapter_dir)).get("task_names") or []
    if name in earlier:
        raise RecipeError(f"domain {name!r} exists already: {earlier}")
    recipe.init_adapter = str(Path(adapter_dir).resolve())
    recipe.data.tasks.append(SourceSpec(jsonl=str(Path(jsonl).resolve()), task=name))
    recipe.output_dir = str(out_dir)
    if max_length is not None:
        recipe.model = dataclasses.replace(recipe.model, max_length=max_length)
    recipe.name = f"{recipe.label}+{name}"
    recipe.stages = [
        StageSettings(
            name="new_expert",
            max_steps=expert_steps,
            learning_rate=learning_rate,
            trainable=["lora_"],
            max_grad_norm=0.0,
            options={"route_by": "label", "train_experts": [name]},
            data={"only_tasks": [name]},
        ),
        StageSettings(
            name="routers",
            max_steps=router_steps,
            learning_rate=learning_rate,
            trainable=["router"],
            options={"route_by": "router"},
            data={"limit_train": {domain: replay_per_domain for domain in earlier}},
        ),
    ]
    return recipe


def add_domain_to_run(adapter_dir: str | Path, jsonl: str | Path, name: str, out_dir: str | Path, **options) -> int:
    """Add a domain to an ``moa`` run (see :func:`add_domain_recipe`) and train it; the grown adapter is
    written to ``out_dir/adapter`` with its recipe.

    Returns:
        The new domain's id.
    """
    recipe = add_domain_recipe(adapter_dir, jsonl, name, out_dir, **options)
    run, _ = train_recipe(recipe)
    return run.task_set.task_id(name)
