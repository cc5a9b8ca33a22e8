"""Export or merge the tasks of a saved mixture from its directory alone (``loramix export`` / ``merge``).

:func:`load_adapter` rebuilds a mixture from any directory :meth:`MixtureModel.save_pretrained` or
``loramix train`` wrote, without the run's training data: the base model comes from ``--base-model``, the
run's ``recipe.yaml`` (its ``model`` section only) or the adapter config's ``base_model_name_or_path``; a
classifier's label counts come from its saved heads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from loramix import config as config_module
from loramix.export import export_all_tasks, staged_directory, write_adapter, write_merged
from loramix.heads import MultiTaskSequenceClassifier
from loramix.hub import resolve_pretrained_dir
from loramix.model import WEIGHTS_NAME, MixtureModel
from loramix.runs.build import RECIPE_NAME, Run, load_base_model, load_tokenizer, resolve_model_path
from loramix.runs.recipe import Recipe
from loramix.runs.settings import RecipeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


@dataclass
class LoadedAdapter:
    """A saved mixture rebuilt for export.

    Attributes:
        directory: the adapter directory.
        model: the mixture on its base model (eval mode).
        tokenizer: the base model's tokenizer, or ``None`` when none was found.
        base_path: the base model's directory or hub id (``None`` for the tests' tiny random models).
        labels: label names by task name for classifiers (when known).
    """

    directory: Path
    model: MixtureModel
    tokenizer: Any
    base_path: str | None
    labels: dict[str, list[str]] = field(default_factory=dict)

    def task_name(self, task: int) -> str:
        names = self.model.mixture_config.task_names
        return names[task] if names else str(task)

    def id2label(self, task: int) -> dict[int, str] | None:
        names = self.labels.get(self.task_name(task))
        return dict(enumerate(names)) if names else None


def saved_config(directory: Path) -> dict[str, Any]:
    """The saved mixture config of an adapter directory (as a dict), whichever file name it was saved under.

    Raises:
        RecipeError: the directory holds no loramix mixture.
    """
    names = [config_module.CONFIG_NAME, config_module.LEGACY_CONFIG_NAME]
    for name in dict.fromkeys(names):
        path = directory / name
        if path.is_file():
            data = config_module.read_json_file(path)
            if isinstance(data, dict) and data.get("peft_type") == config_module.PEFT_TYPE:
                return data
    if not (directory / WEIGHTS_NAME).is_file():
        raise RecipeError(f"{directory} holds no loramix mixture (no {config_module.CONFIG_NAME})")
    raise RecipeError(f"{directory} holds no loramix mixture config (a PEFT adapter is not a loramix mixture)")


def head_label_counts(directory: Path) -> tuple[list[int], str] | None:
    """The label count of each task head saved in an adapter and the classifier's pooling, or ``None``.

    Heads saved as ``heads.<t>.weight`` are mean-pooled; ``heads.<t>.classifier.weight`` carry a pooler.
    """
    counts: dict[int, int] = {}
    pooling = "mean"
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            parts = key.split(".")
            if len(parts) < 3 or parts[0] != "heads" or not parts[1].isdigit() or parts[-1] != "weight":
                continue
            if parts[2:] == ["weight"] or parts[2:] == ["classifier", "weight"]:
                counts[int(parts[1])] = handle.get_slice(key).get_shape()[0]
                pooling = "pooler" if parts[2] == "classifier" else pooling
    if not counts:
        return None
    return [counts[index] for index in sorted(counts)], pooling


def _recipe_labels(recipe: Recipe, task_names: list[str]) -> dict[str, list[str]]:
    """Label names the recipe itself declares: a source's ``labels`` for its named task, or for every task
    when the recipe has one source. Reads no data."""
    found: dict[str, list[str]] = {}
    sources = recipe.data.tasks
    for source in sources:
        if not source.labels:
            continue
        if source.task:
            found[source.task] = list(source.labels)
        elif len(sources) == 1:
            found.update({name: list(source.labels) for name in task_names})
    return found


def _load_plain(path: str, heads: tuple[list[int], str] | None) -> Any:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if heads is not None:
        return MultiTaskSequenceClassifier(AutoModel.from_pretrained(path), heads[0], pooling=heads[1])
    config = AutoConfig.from_pretrained(path)
    import transformers

    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path)


def _load_tokenizer(*paths: str | Path | None) -> Any:
    from transformers import AutoTokenizer

    for path in paths:
        if path is not None and Path(path).is_dir() and any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(str(path))
    return None


def load_adapter(adapter: str | Path, base_model: str | None = None) -> LoadedAdapter:
    """Rebuild a saved mixture on its base model, without any training data.

    Args:
        adapter: a directory written by ``save_pretrained`` or ``loramix train`` (or a hub id).
        base_model: the base model's directory or hub id; default: the run's ``recipe.yaml`` model, else
            the config's ``base_model_name_or_path``.

    Returns:
        The loaded adapter.

    Raises:
        RecipeError: no loramix mixture there, or no way to find its base model.
    """
    directory = resolve_pretrained_dir(adapter)
    config = saved_config(directory)
    heads = head_label_counts(directory) if "heads" in (config.get("modules_to_save") or []) else None
    counts = heads[0] if heads else None
    task_names = list(config.get("task_names") or [])
    labels: dict[str, list[str]] = {}
    recipe_path = directory / RECIPE_NAME
    if base_model is None and recipe_path.is_file():
        recipe = Recipe.from_yaml(recipe_path)
        tokenizer = load_tokenizer(recipe.model)
        base = load_base_model(recipe.model, tokenizer, counts)
        base_path = None if recipe.model.name.startswith("tiny-") else resolve_model_path(recipe.model.name)
        labels = _recipe_labels(recipe, task_names)
    else:
        base_path = base_model or config.get("base_model_name_or_path")
        if not base_path:
            raise RecipeError(f"{directory} does not name its base model: pass --base-model PATH")
        base_path = resolve_model_path(base_path) if base_path in ("minilm", "smollm2") else base_path
        if base_path.startswith("tiny-"):
            raise RecipeError(f"{directory} was trained on a random {base_path} built by its recipe, which is missing")
        base_dir = str(resolve_pretrained_dir(base_path))
        base = _load_plain(base_dir, heads)
        tokenizer = _load_tokenizer(directory, base_dir)
    if counts is not None:
        labels = {name: names for name, names in labels.items() if name in task_names}
        labels = {n: v for n, v in labels.items() if len(v) == counts[task_names.index(n)]}
    model = MixtureModel.from_pretrained(base, directory)
    return LoadedAdapter(directory, model, tokenizer, base_path, labels)


def resolve_task(loaded: LoadedAdapter | Run, task: str | int) -> int:
    """The id of a task given by name or by id (a string of digits that is no task's name counts as an id).

    Raises:
        ValueError: no such task.
    """
    config = loaded.model.mixture_config
    if isinstance(task, str) and task not in (config.task_names or []) and task.isdigit():
        task = int(task)
    return config.task_index(task)


def export_adapter(
    loaded: LoadedAdapter,
    out: str | Path,
    task: str | int | None = None,
    merged: bool = False,
    minimal_rank: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export (PEFT LoRA) or merge one task, or every task when ``task`` is ``None``, with the tokenizer.

    Every task goes into its own subdirectory of ``out`` with a manifest ``loramix_exports.json`` (task ->
    subdirectory). The adapter's own directory is never replaced.

    Returns:
        The export record (one task) or the manifest (every task).

    Raises:
        FileExistsError: ``out`` is not empty (without ``overwrite``) or is the adapter's directory.
    """
    mixture = loaded.model
    protect = [loaded.directory]

    def write(directory: Path, task_id: int) -> dict[str, Any]:
        if merged:
            record = write_merged(mixture, directory, task_id, loaded.id2label(task_id))
        else:
            record = write_adapter(mixture, directory, task_id, minimal_rank, loaded.base_path)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(directory))
        return record

    if task is None:
        return export_all_tasks(mixture, out, write, overwrite=overwrite, protect=protect)
    mixture._require_mergeable()
    task_id = resolve_task(loaded, task)
    with staged_directory(out, overwrite, protect) as staging:
        return write(staging, task_id)


def save_merged(run: Run, task: str | int, directory: str | Path, overwrite: bool = False) -> Path:
    """Fold one task of a built run into the base weights and save it with its tokenizer.

    A causal LM is saved as its own class; a classifier's task as its ``AutoModelForSequenceClassification``
    with the task's labels.

    Returns:
        The output directory.
    """
    task_id = resolve_task(run, task)
    name = run.task_set.name(task_id)
    labels = run.task_set.labels(name)
    id2label = dict(enumerate(labels)) if labels else None
    write = functools.partial(write_merged, run.model, id2label=id2label)
    with staged_directory(directory, overwrite) as staging:
        write(staging, task_id)
        run.tokenizer.save_pretrained(str(staging))
    return Path(directory)
