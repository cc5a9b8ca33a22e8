"""Turn a recipe into the things a run needs: tokenizer, task set and splits, mixture model, batches."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramix import assets
from loramix.config import CONFIG_NAME, MixtureConfig, read_json_file
from loramix.data import (
    ClassificationTemplate,
    DataError,
    Example,
    GenerationTemplate,
    MultiTaskBatchSampler,
    MultiTaskCollator,
    MultiTaskDataset,
    Splits,
    TaskData,
    TaskSet,
    load_bigbench_task,
    load_hf_dataset,
    load_jsonl,
    split_examples,
)
from loramix.heads import MultiTaskSequenceClassifier
from loramix.model import MixtureModel, get_mixture_model, is_mixture_directory, mixture_config_file
from loramix.runs.batches import SampledBatches
from loramix.runs.recipe import SPLIT_KEYS, DataSpec, ModelSpec, Recipe, SourceSpec
from loramix.runs.runinfo import (
    RUN_FILE,
    SPLIT_FILE,
    data_files,
    describe_changes,
    examples_sha256,
    read_run_file,
    read_split,
    remove_split,
    run_fingerprint,
    write_split,
)
from loramix.runs.settings import RecipeError, StageSettings

TINY_MODELS = ("tiny-bert", "tiny-llama")


def resolve_model_path(name: str) -> str:
    """The directory or hub name of a model: ``minilm``/``smollm2`` through :mod:`loramix.assets`.

    Tiny models use MiniLM's tokenizer, so they resolve to MiniLM's directory.
    """
    if name in ("minilm", *TINY_MODELS):
        return str(assets.minilm_path())
    if name == "smollm2":
        return str(assets.smollm2_path())
    return name


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer of the recipe's model, with a pad token (the end-of-sequence one when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec.name))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_model(spec: ModelSpec, vocab_size: int, pad_token_id: int) -> torch.nn.Module:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    if spec.name == "tiny-bert":
        if spec.task_type != "classification":
            raise RecipeError("model.name='tiny-bert' is an encoder: use task_type: classification")
        return BertModel(BertConfig(vocab_size=vocab_size, max_position_embeddings=spec.max_length, **shape))
    if spec.task_type != "generation":
        raise RecipeError("model.name='tiny-llama' is a causal LM: use task_type: generation")
    config = LlamaConfig(
        vocab_size=vocab_size,
        num_key_value_heads=2,
        max_position_embeddings=spec.max_length,
        pad_token_id=pad_token_id,
        **shape,
    )
    return LlamaForCausalLM(config)


def load_base_model(spec: ModelSpec, tokenizer: Any, labels_per_task: list[int] | None) -> torch.nn.Module:
    """The model to wrap: an encoder with a head per task (classification) or a causal LM.

    Args:
        spec: the recipe's model section.
        tokenizer: its tokenizer (sizes the tiny models).
        labels_per_task: the number of labels of each task (classification only).

    Returns:
        A :class:`~loramix.heads.MultiTaskSequenceClassifier` or an ``AutoModelForCausalLM``.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(spec.init_seed)
    if spec.name in TINY_MODELS:
        model = _tiny_model(spec, len(tokenizer), tokenizer.pad_token_id or 0)
    elif spec.task_type == "classification":
        model = AutoModel.from_pretrained(resolve_model_path(spec.name))
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec.name))
    if spec.task_type == "generation":
        return model
    if not labels_per_task:
        raise RecipeError("model.task_type is classification but the data has no classification task")
    return MultiTaskSequenceClassifier(model, labels_per_task, dropout=spec.classifier_dropout, pooling=spec.pooling)


def _load_source(source: SourceSpec, index: int) -> list[TaskData]:
    where = f"data.tasks[{index}]"
    if source.kind == "bigbench":
        data = load_bigbench_task(
            source.bigbench,
            subtasks=source.subtasks,
            mode=source.mode,
            task_name=source.task,
            max_examples=source.max_examples,
        )
        return [data]
    fields = {
        "text_field": source.text_field,
        "label_field": source.label_field,
        "target_field": source.target_field,
        "labels": source.labels,
    }
    if source.kind == "jsonl":
        if not Path(source.jsonl).is_file():
            raise RecipeError(f"{where}.jsonl: file {source.jsonl} does not exist")
        return list(load_jsonl(source.jsonl, task=source.task, **fields).values())
    return [load_hf_dataset(source.hf, task=source.task, split=source.split, config=source.config, **fields)]


def _source_record(source: SourceSpec, tasks: list[TaskData]) -> dict[str, Any]:
    """A source's settings and content hash for the run's fingerprint (a JSONL file by its bytes)."""
    record = {"kind": source.kind, **dataclasses.asdict(source)}
    if source.kind == "jsonl":
        del record["jsonl"]
        record["file"] = str(Path(source.jsonl).resolve())
        record["sha256"] = assets.sha256_file(source.jsonl)
    else:
        record["sha256"] = examples_sha256(tasks)
    return record


def _check_task_keys(where: str, value: Any, names: list[str]) -> None:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names), key=str)
        if unknown:
            raise RecipeError(f"{where}: unknown tasks {unknown}; the data's tasks are {names}")


def read_data(spec: DataSpec) -> tuple[TaskSet, Splits, list[dict[str, Any]]]:
    """Read every source, number the tasks in order, split each task's examples and hash the sources.

    Returns:
        The task set, the train/validation/test examples (with ``task_id`` set) and one record per
        source (its settings and the SHA-256 of its file or content) for the run's fingerprint.

    Raises:
        RecipeError: a source is missing; a per-task setting (``validation``, ``test``, ``max_train``,
            ``instructions``) names a task the data lacks.
        loramix.data.DataError: bad data, by file and line; a task left without a training example.
    """
    tasks: list[TaskData] = []
    sources = []
    for index, source in enumerate(spec.tasks):
        loaded = _load_source(source, index)
        sources.append(_source_record(source, loaded))
        tasks.extend(loaded)
    task_set = TaskSet.from_task_data(tasks)
    for name in ("validation", "test", "max_train", "instructions"):
        _check_task_keys(f"data.{name}", getattr(spec, name), task_set.names)
    examples = task_set.assign([example for task in tasks for example in task.examples], require_all=True)
    splits = split_examples(
        examples, validation=spec.validation, test=spec.test, seed=spec.split_seed, max_train=spec.max_train
    )
    _check_trained(spec, tasks, splits)
    return task_set, splits, sources


def _check_trained(spec: DataSpec, tasks: list[TaskData], splits: Splits) -> None:
    """Raise a DataError naming the first task the split leaves without a training example."""
    trained = {example.task for example in splits.train}
    for task in tasks:
        if task.name not in trained:
            held = sum(1 for example in (*splits.validation, *splits.test) if example.task == task.name)
            raise DataError(
                f"task {task.name!r} has no training example after the split: {len(task.examples)} examples, "
                f"{held} held out for validation and test (data.validation={spec.validation!r}, "
                f"data.test={spec.test!r}, data.max_train={spec.max_train!r})"
            )


def extend_data(run: Run, source: SourceSpec) -> tuple[TaskSet, Splits, list[dict[str, Any]]]:
    """A trained run's tasks and split (as saved with it) plus those of one more source.

    The new tasks are split with the run's split settings; the split is seeded per task, so this is the
    split a recipe listing every source would give, while the earlier tasks' data files are not read.

    Returns:
        The grown task set, split and source records.

    Raises:
        loramix.data.DataError: a new task's name is taken, its data is bad, or it has no training example.
    """
    spec = run.recipe.data
    loaded = _load_source(source, len(spec.tasks))
    task_set = TaskSet.from_dict(run.task_set.to_dict())
    for task in loaded:
        task_set.add(task.name, task.labels)
    examples = task_set.assign([example for task in loaded for example in task.examples], require_all=False)
    new = split_examples(
        examples, validation=spec.validation, test=spec.test, seed=spec.split_seed, max_train=spec.max_train
    )
    _check_trained(spec, loaded, new)
    splits = Splits(*(list(old) + list(added) for old, added in zip(run.splits, new, strict=True)))
    return task_set, splits, [*run.sources, _source_record(source, loaded)]


def load_tasks(spec: DataSpec) -> tuple[TaskSet, Splits]:
    """Read every source, number the tasks in order and split each task's examples.

    Returns:
        The task set and the train/validation/test examples (with ``task_id`` set).

    Raises:
        RecipeError: a source is missing; ``loramix.data.DataError`` names bad data by file and line.
    """
    task_set, splits, _ = read_data(spec)
    return task_set, splits


def check_recipe_tasks(recipe: Recipe, task_set: TaskSet) -> None:
    """Check the stages' data overrides against the data's tasks (before anything is built or written).

    Raises:
        RecipeError: naming the field: an override that is invalid or changes the split, unknown tasks in
            a stage's ``only_tasks`` or ``instructions``.
    """
    names = task_set.names
    _check_task_keys("data.limit_train", recipe.data.limit_train, names)
    for stage in recipe.stages:
        overrides = stage.data or {}
        section = f"stages[{stage.name}].data"
        recipe.data.overridden(overrides, stage.name)  # validates the overridden section as a whole
        _check_task_keys(f"{section}.instructions", overrides.get("instructions"), names)
        _check_task_keys(f"{section}.limit_train", overrides.get("limit_train"), names)
        unknown = sorted(set(overrides.get("only_tasks") or ()) - set(names))
        if unknown:
            raise RecipeError(f"{section}.only_tasks: unknown tasks {unknown}; the data's tasks are {names}")


def check_stages(recipe: Recipe, model: MixtureModel) -> None:
    """Check every stage against the built model before training starts (not when the stage is reached).

    Raises:
        RecipeError: a stage's ``trainable``/``frozen`` patterns leave no parameter to train, or it has
            ``options`` the method takes none of.
    """
    candidates = [name for name, param in model.named_parameters() if param.requires_grad]
    takes_options = getattr(model.method, "start_stage", None) is not None
    for stage in recipe.stages:
        chosen = [
            name
            for name in candidates
            if (stage.trainable is None or any(re.search(pattern, name) for pattern in stage.trainable))
            and not any(re.search(pattern, name) for pattern in stage.frozen)
        ]
        if not chosen:
            raise RecipeError(
                f"stages[{stage.name}]: trainable={stage.trainable} frozen={stage.frozen} leave no parameter to "
                f"train; candidate names look like: {', '.join(candidates[:4])}"
            )
        if stage.options and not takes_options:
            raise RecipeError(
                f"stages[{stage.name}].options={stage.options!r}: method {model.mixture_config.method!r} "
                "takes no stage options (it has no start_stage)"
            )
        check = getattr(model.method, "check_stage_options", None)
        if check is not None:
            try:
                check(model.mixture_config, stage.options)
            except ValueError as error:
                raise RecipeError(f"stages[{stage.name}].options: {error}") from None


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def check_max_length(spec: ModelSpec, max_new_tokens: int = 0) -> None:
    """Check ``model.max_length`` (and, for generation, the ``eval.max_new_tokens`` generated after a prompt of
    that length) against the positions the model has (reads only its config).

    Raises:
        RecipeError: naming ``model.max_length`` (and ``eval.max_new_tokens``) and the model's limit.
    """
    if spec.name in TINY_MODELS:
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(spec.name))
    for name in POSITION_FIELDS:
        limit = getattr(config, name, None)
        if not isinstance(limit, int):
            continue
        if spec.max_length > limit:
            raise RecipeError(
                f"model.max_length={spec.max_length} is beyond the {limit} positions of model {spec.name!r} "
                f"({name} in its config): use at most {limit}"
            )
        if spec.max_length + max_new_tokens > limit:
            raise RecipeError(
                f"model.max_length={spec.max_length} + eval.max_new_tokens={max_new_tokens} is beyond the {limit} "
                f"positions of model {spec.name!r} ({name} in its config): a prompt of max_length tokens leaves "
                f"room for {limit - spec.max_length} new ones; lower either so that they add up to at most {limit}"
            )


def _new_tokens(recipe: Recipe) -> int:
    """The tokens generated after a prompt in evaluation (0 for classification)."""
    return recipe.eval.max_new_tokens if recipe.model.task_type == "generation" else 0


def mixture_config(recipe: Recipe, task_set: TaskSet) -> MixtureConfig:
    """The recipe's ``mixture`` section completed with the tasks (and the heads to train and save)."""
    data = dict(recipe.mixture)
    for filled in ("num_tasks", "task_names"):
        if filled in data:
            raise RecipeError(f"mixture.{filled} comes from the data; remove it from the recipe")
    data["num_tasks"] = len(task_set)
    data["task_names"] = task_set.names
    if data.get("num_experts") == "tasks":
        data["num_experts"] = len(task_set)
    if recipe.model.task_type == "classification":
        data["modules_to_save"] = sorted({*(data.get("modules_to_save") or []), "heads"})
    data.setdefault("base_model_name_or_path", recipe.model.name)
    try:
        return MixtureConfig.from_dict(data)
    except ValueError as error:
        raise RecipeError(f"mixture: {error}") from None


def make_template(recipe: Recipe, tokenizer: Any, data: DataSpec | None = None) -> Any:
    """The classification or generation template of the recipe's task type."""
    instructions = (data or recipe.data).instructions
    if recipe.model.task_type == "classification":
        return ClassificationTemplate(tokenizer, max_length=recipe.model.max_length, instructions=instructions)
    return GenerationTemplate(tokenizer, max_length=recipe.model.max_length, instructions=instructions)


def _limited(examples: list[Example], limit: int | Mapping[str, int]) -> list[Example]:
    """The first ``limit`` examples of each task (or of the tasks a mapping names), in the split's order."""
    kept: list[Example] = []
    counts: dict[str, int] = {}
    for example in examples:
        cap = limit.get(example.task) if isinstance(limit, Mapping) else limit
        if cap is None or counts.get(example.task, 0) < cap:
            counts[example.task] = counts.get(example.task, 0) + 1
            kept.append(example)
    return kept


def _grown_run(recipe: Recipe) -> Run:
    """The run of a recipe with ``init_adapter``: the trained run, grown by the data's further tasks.

    The earlier tasks and their split come from the adapter's saved run (``load_run``: no earlier data file
    is read), the further sources are read and split with the same settings (:func:`extend_data`), and
    the adapter grows by one expert per new task through its method's ``grow_tasks``.

    Raises:
        RecipeError: the directory holds no trained run; ``data.tasks`` does not start with the run's
            sources, or the split settings, the model or the ``mixture`` section differ from the run's (each
            named); the method cannot grow.
    """
    where = f"init_adapter={recipe.init_adapter!r}"
    earlier = load_run(recipe.init_adapter, is_trainable=True)
    old, new = earlier.recipe.data, recipe.data
    if new.tasks[: len(old.tasks)] != old.tasks:
        trained = [f"{source.kind}: {getattr(source, source.kind)} (task {source.task})" for source in old.tasks]
        raise RecipeError(f"data.tasks must start with the sources {where} was trained on, in order: {trained}")
    for key in sorted(SPLIT_KEYS):
        if getattr(new, key) != getattr(old, key):
            raise RecipeError(
                f"data.{key}={getattr(new, key)!r} differs from {getattr(old, key)!r} of {where}: "
                "the earlier tasks must keep their split"
            )
    for key in ("name", "task_type", "init_seed"):
        if getattr(recipe.model, key) != getattr(earlier.recipe.model, key):
            raise RecipeError(
                f"model.{key}={getattr(recipe.model, key)!r} differs from {getattr(earlier.recipe.model, key)!r} "
                f"of {where}"
            )
    run = earlier
    for source in new.tasks[len(old.tasks) :]:
        task_set, splits, sources = extend_data(run, source)
        run = Run(run.recipe, run.tokenizer, task_set, splits, run.model, sources)
    task_set = run.task_set
    for name in ("validation", "test", "max_train", "instructions"):
        _check_task_keys(f"data.{name}", getattr(new, name), task_set.names)
    check_recipe_tasks(recipe, task_set)
    check_max_length(recipe.model, _new_tokens(recipe))
    config = mixture_config(recipe, task_set)
    model = run.model
    added = task_set.names[len(earlier.task_set.names) :]
    saved = model.mixture_config
    differ = _config_differences(config, saved, grown=len(added))
    if differ:
        raise RecipeError(f"mixture: {'; '.join(differ)} (the recipe's vs those of {where})")
    if added:
        grow = getattr(model.method, "grow_tasks", None)
        if grow is None:
            raise RecipeError(f"{where}: method {saved.method!r} cannot add tasks {added}")
        grow(model, added, seed=recipe.model.init_seed)
    check_stages(recipe, model)
    return Run(recipe, run.tokenizer, task_set, run.splits, model, run.sources)


def _config_differences(config: MixtureConfig, saved: MixtureConfig, grown: int = 0) -> list[str]:
    """Fields of ``config`` that differ from ``saved`` (after ``saved`` gains ``grown`` tasks and experts)."""
    expected = {"num_tasks": saved.num_tasks + grown, "num_experts": saved.num_experts + grown}
    ignored = {"method_options", "base_model_name_or_path", "task_names"}
    differ = []
    for item in dataclasses.fields(config):
        if item.name in ignored:
            continue
        theirs = expected.get(item.name, getattr(saved, item.name))
        if getattr(config, item.name) != theirs:
            differ.append(f"{item.name}: {getattr(config, item.name)!r} vs {theirs!r}")
    return differ


@dataclass
class Run:
    """Everything built from a recipe.

    Attributes:
        recipe: the recipe.
        tokenizer: the model's tokenizer.
        task_set: the tasks, in id order.
        splits: train/validation/test examples.
        model: the mixture model.
        sources: one record per data source (settings and content hash), as the fingerprint holds them.
    """

    recipe: Recipe
    tokenizer: Any
    task_set: TaskSet
    splits: Splits
    model: MixtureModel
    sources: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What this run trains (see :func:`loramix.runs.runinfo.run_fingerprint`)."""
        return run_fingerprint(self.recipe, self.model.mixture_config.to_dict(), self.task_set, self.sources)

    def split(self, name: str) -> list[Example]:
        """The examples of split ``train``, ``validation`` or ``test``."""
        return list(getattr(self.splits, name))

    def batches(self, stage: StageSettings, rank: int, world_size: int) -> SampledBatches:
        """The training batches of one rank for a stage (the trainer's batch factory)."""
        data = self.recipe.data.overridden(stage.data, stage.name)
        examples = self.splits.train
        if data.only_tasks is not None:
            unknown = sorted(set(data.only_tasks) - set(self.task_set.names))
            if unknown:
                raise RecipeError(f"stages[{stage.name}].data.only_tasks: unknown tasks {unknown}")
            examples = [example for example in examples if example.task in data.only_tasks]
        if data.limit_train is not None:
            examples = _limited(examples, data.limit_train)
        dataset = MultiTaskDataset(examples, make_template(self.recipe, self.tokenizer, data))
        sampler = MultiTaskBatchSampler(
            dataset.task_ids,
            self.recipe.training.batch_size,
            strategy=data.sampler,
            temperature=data.temperature,
            mixed=data.mixed,
            seed=self.recipe.training.seed,
            num_replicas=world_size,
            rank=rank,
        )
        return SampledBatches(dataset, sampler, MultiTaskCollator(self.tokenizer))


def build_run(recipe: Recipe) -> Run:
    """Load the tokenizer and data and build the mixture model of a recipe.

    With ``init_adapter`` the model is that trained adapter, grown by the data's further tasks (see
    :func:`_grown_run`).

    Everything the recipe says is checked against the data and the model's config before a model is
    loaded; nothing is written.

    Raises:
        RecipeError: naming the field (tasks of ``instructions`` or of a stage, ``model.max_length``
            beyond the model's positions, the mixture config).
        loramix.data.DataError: bad data, by file and line, or a task without a training example.
    """
    if recipe.init_adapter is not None:
        return _grown_run(recipe)
    tokenizer = load_tokenizer(recipe.model)
    task_set, splits, sources = read_data(recipe.data)
    check_recipe_tasks(recipe, task_set)
    check_max_length(recipe.model, _new_tokens(recipe))
    labels = [task_set.num_labels(name) for name in task_set.names]
    if recipe.model.task_type == "classification" and not all(labels):
        generation = [name for name, count in zip(task_set.names, labels, strict=True) if not count]
        raise RecipeError(f"model.task_type is classification but tasks {generation} are generation tasks")
    config = mixture_config(recipe, task_set)
    base = load_base_model(recipe.model, tokenizer, labels)
    torch.manual_seed(recipe.model.init_seed)
    model = get_mixture_model(base, config)
    check_stages(recipe, model)
    return Run(recipe, tokenizer, task_set, splits, model, sources)


RECIPE_NAME = "recipe.yaml"


def save_run_recipe(recipe: Recipe, adapter_dir: str | Path, run: Run | None = None) -> None:
    """Store the recipe next to a trained adapter, so the adapter can be evaluated, merged or exported alone.

    With ``run``, its split (every example) and fingerprint go beside it too (``split.jsonl``,
    ``run.json``), so nothing needs the data files again; without, any split saved there before is
    removed (it would belong to another recipe).
    """
    recipe.to_yaml(Path(adapter_dir) / RECIPE_NAME)
    if run is None:
        remove_split(adapter_dir)
    else:
        write_split(adapter_dir, run.fingerprint, run.splits, data_files(run.sources))


def _reread_data(directory: Path, recipe: Recipe) -> tuple[TaskSet, Splits, list[dict[str, Any]]]:
    """The data of an adapter saved without its split: re-read and re-split, checked against its run file."""
    run_path = directory / RUN_FILE
    if not run_path.is_file():
        warnings.warn(
            f"{directory} has no saved split ({SPLIT_FILE}; written by an older loramix): re-reading and "
            "re-splitting the data files of its recipe, which gives the training split only while they are unchanged",
            stacklevel=3,
        )
        return read_data(recipe.data)
    saved = read_run_file(run_path)["fingerprint"]
    task_set, splits, sources = read_data(recipe.data)
    current = run_fingerprint(recipe, saved["mixture"], task_set, sources)
    changes = describe_changes({"data": saved["data"]}, {"data": current["data"]}, data_files(sources))
    if changes:
        raise DataError(
            f"{directory}: its {SPLIT_FILE} is missing and its data changed since training: {'; '.join(changes)}"
        )
    return task_set, splits, sources


def load_run(adapter_dir: str | Path, is_trainable: bool = False) -> Run:
    """Rebuild a trained run from its adapter directory (as ``loramix train`` writes it).

    The task set and split come from the directory's ``run.json`` and ``split.jsonl``: no data file is
    read. An adapter saved without them re-reads its recipe's data (with a warning, or an error naming
    the file when its ``run.json`` records other data hashes). The adapter is frozen unless ``is_trainable``.

    Raises:
        RecipeError: the directory holds no adapter or no recipe, or its split belongs to other tasks.
    """
    directory = Path(adapter_dir)
    if not (directory / RECIPE_NAME).is_file() or not is_mixture_directory(directory):
        raise RecipeError(f"{directory} is not a loramix adapter directory (no {RECIPE_NAME} or {CONFIG_NAME})")
    recipe = Recipe.from_yaml(directory / RECIPE_NAME)
    tokenizer = load_tokenizer(recipe.model)
    saved = read_split(directory)
    if saved is None:
        task_set, splits, sources = _reread_data(directory, recipe)
    else:
        task_set, splits, fingerprint = saved
        sources = fingerprint["data"]["tasks"]
        adapter_tasks = read_json_file(mixture_config_file(directory)).get("task_names")
        if adapter_tasks is not None and adapter_tasks != task_set.names:
            raise RecipeError(
                f"{directory}: {SPLIT_FILE} holds tasks {task_set.names} but the adapter was trained on {adapter_tasks}"
            )
    labels = [task_set.num_labels(name) for name in task_set.names]
    base = load_base_model(recipe.model, tokenizer, labels)
    model = MixtureModel.from_pretrained(base, directory, is_trainable=is_trainable)
    return Run(recipe, tokenizer, task_set, splits, model, sources)
