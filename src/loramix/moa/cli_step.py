"""``loramix add-domain``: grow a trained MoA run by one domain from a JSONL file, without forgetting."""

from __future__ import annotations

import copy
from pathlib import Path

from loramix.moa.grow import add_domain
from loramix.moa.training import StageSettings
from loramix.runs.build import Run, extend_data, load_run, make_template, save_run_recipe
from loramix.runs.recipe import SourceSpec
from loramix.runs.settings import RecipeError


def add_domain_to_run(
    adapter_dir: str | Path,
    jsonl: str | Path,
    name: str,
    out_dir: str | Path,
    replay_per_domain: int = 8,
    expert: StageSettings | None = None,
    routers: StageSettings | None = None,
) -> int:
    """Add a domain to an ``moa`` run that ``loramix train`` wrote, and save the grown run.

    The new domain's examples (``text`` and ``target`` fields) train a new expert alone; the routers are
    then retrained on them plus the first ``replay_per_domain`` training examples of each earlier domain.
    Earlier experts stay byte-identical. The grown adapter and its recipe (the JSONL appended as a task
    source, so ``loramix eval`` covers the new domain) go to ``out_dir``.

    Args:
        adapter_dir: the trained run's adapter directory.
        jsonl: the new domain's data.
        name: the new domain's name.
        out_dir: where the grown adapter is written.
        replay_per_domain: earlier-domain examples replayed while the routers are retrained.
        expert: settings of the new expert's training (default: 100 steps, lr 1e-3).
        routers: settings of the routers' retraining (default: 50 steps, lr 1e-3, experts frozen).

    Returns:
        The new domain's id.

    Raises:
        RecipeError: the run is not an ``moa`` generation run, or the name is taken.
    """
    run = load_run(adapter_dir)
    config = run.model.mixture_config
    if config.method != "moa" or run.recipe.model.task_type != "generation":
        raise RecipeError(f"{adapter_dir}: add-domain needs an 'moa' generation run, not {config.method!r}")
    if name in run.task_set.names:
        raise RecipeError(f"domain {name!r} exists already: {run.task_set.names}")
    recipe = copy.deepcopy(run.recipe)
    source = SourceSpec(jsonl=str(Path(jsonl).resolve()), task=name)
    # the run's saved split plus the new domain's, so its validation and test examples are never trained on
    task_set, splits, sources = extend_data(run, source)
    recipe.data.tasks.append(source)
    domain_id = task_set.task_id(name)
    template = make_template(recipe, run.tokenizer)
    examples: list[dict] = []
    replay: dict[int, list[dict]] = {}
    for example in splits.train:
        if example.task_id == domain_id:
            examples.append(template(example))
        elif len(replay.setdefault(example.task_id, [])) < replay_per_domain:
            replay[example.task_id].append(template(example))
    pad = run.tokenizer.pad_token_id or 0
    length = recipe.model.max_length
    expert = expert or StageSettings(steps=100, lr=1e-3, max_length=length, pad_token_id=pad)
    routers = routers or StageSettings(steps=50, lr=1e-3, max_length=length, pad_token_id=pad)
    domain = add_domain(run.model, examples, replay, expert, routers, name=name)
    out = Path(out_dir)
    run.model.save_pretrained(out)
    save_run_recipe(recipe, out, Run(recipe, run.tokenizer, task_set, splits, run.model, sources))
    return domain
