"""Turn a recipe into the things a run needs: tokenizer, task set and splits, mixture model, batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramix.config import MixtureConfig
from loramix.data import (
    ClassificationTemplate,
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
from loramix.model import MixtureModel, get_mixture_model
from loramix.train.batches import SampledBatches
from loramix.train.recipe import DataSpec, ModelSpec, Recipe, SourceSpec
from loramix.train.settings import RecipeError, StageSettings

TINY_MODELS = ("tiny-bert", "tiny-llama")


def resolve_model_path(name: str) -> str:
    """The directory or hub name of a model: ``minilm``/``smollm2`` through :mod:`loramix.assets`.

    Tiny models use MiniLM's tokenizer, so they resolve to MiniLM's directory.
    """
    from loramix import assets

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


def load_tasks(spec: DataSpec) -> tuple[TaskSet, Splits]:
    """Read every source, number the tasks in order and split each task's examples.

    Returns:
        The task set and the train/validation/test examples (with ``task_id`` set).

    Raises:
        RecipeError: a source is missing; ``loramix.data.DataError`` names bad data by file and line.
    """
    tasks: list[TaskData] = []
    for index, source in enumerate(spec.tasks):
        tasks.extend(_load_source(source, index))
    task_set = TaskSet.from_task_data(tasks)
    examples = task_set.assign([example for task in tasks for example in task.examples], require_all=True)
    splits = split_examples(
        examples, validation=spec.validation, test=spec.test, seed=spec.split_seed, max_train=spec.max_train
    )
    return task_set, splits


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


@dataclass
class Run:
    """Everything built from a recipe.

    Attributes:
        recipe: the recipe.
        tokenizer: the model's tokenizer.
        task_set: the tasks, in id order.
        splits: train/validation/test examples.
        model: the mixture model.
    """

    recipe: Recipe
    tokenizer: Any
    task_set: TaskSet
    splits: Splits
    model: MixtureModel

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
    """Load the tokenizer and data and build the mixture model of a recipe."""
    tokenizer = load_tokenizer(recipe.model)
    task_set, splits = load_tasks(recipe.data)
    labels = [task_set.num_labels(name) for name in task_set.names]
    if recipe.model.task_type == "classification" and not all(labels):
        generation = [name for name, count in zip(task_set.names, labels, strict=True) if not count]
        raise RecipeError(f"model.task_type is classification but tasks {generation} are generation tasks")
    base = load_base_model(recipe.model, tokenizer, labels)
    torch.manual_seed(recipe.model.init_seed)
    model = get_mixture_model(base, mixture_config(recipe, task_set))
    return Run(recipe, tokenizer, task_set, splits, model)


RECIPE_NAME = "recipe.yaml"


def save_run_recipe(recipe: Recipe, adapter_dir: str | Path) -> None:
    """Store the recipe next to a trained adapter, so the adapter can be evaluated, merged or exported alone."""
    recipe.to_yaml(Path(adapter_dir) / RECIPE_NAME)


def load_run(adapter_dir: str | Path) -> Run:
    """Rebuild a trained run from its adapter directory (as ``loramix train`` writes it).

    Raises:
        RecipeError: the directory holds no adapter or no recipe.
    """
    directory = Path(adapter_dir)
    if not (directory / RECIPE_NAME).is_file() or not (directory / "adapter_config.json").is_file():
        raise RecipeError(f"{directory} is not a loramix adapter directory (no {RECIPE_NAME} or adapter_config.json)")
    recipe = Recipe.from_yaml(directory / RECIPE_NAME)
    tokenizer = load_tokenizer(recipe.model)
    task_set, splits = load_tasks(recipe.data)
    labels = [task_set.num_labels(name) for name in task_set.names]
    base = load_base_model(recipe.model, tokenizer, labels)
    model = MixtureModel.from_pretrained(base, directory)
    return Run(recipe, tokenizer, task_set, splits, model)
