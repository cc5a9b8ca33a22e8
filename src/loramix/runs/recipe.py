"""Recipes: one YAML file saying which model, mixture, data and training settings a run uses.

.. code-block:: yaml

    name: more                     # label of the run in reports (default: the mixture's method)
    output_dir: runs/more
    model:
      name: minilm                 # minilm | smollm2 | tiny-bert | tiny-llama | a local path or hub name
      task_type: classification    # classification (a head per task) or generation (causal LM)
      max_length: 128
    mixture: {method: more, r: 8, target_modules: [query, value]}   # MixtureConfig fields
    data:
      tasks:
        - {bigbench: multiemo, max_examples: 400}
        - {jsonl: data/reviews.jsonl, task: reviews}
        - {hf: path/saved_with_save_to_disk, task: qa, text_field: question, target_field: answer}
      validation: 50               # per task: a count or a fraction
      test: 100
      sampler: proportional        # proportional | temperature | uniform | more
    training: {max_steps: 200, batch_size: 16, learning_rate: 3.0e-4}   # TrainingSettings fields
    stages:                        # optional; StageSettings fields
      - {name: experts, max_steps: 100, trainable: ["lora_"]}
    eval: {split: test, batch_size: 32, max_new_tokens: 16}
    init_adapter: runs/moa/adapter # optional: start from a trained adapter (MoA: grow it by the new tasks)

``mixture.num_tasks`` and ``task_names`` are filled in from the data; ``num_experts: tasks`` means one
expert per task. Every section rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loramix.runs.settings import RecipeError, StageSettings, TrainingSettings, _check_keys, _positive_int

TASK_TYPES = ("classification", "generation")
SOURCE_KINDS = ("bigbench", "jsonl", "hf")
SAMPLERS = ("proportional", "temperature", "uniform", "more")
BIGBENCH_MODES = ("auto", "classification", "generation")
#: ``data:`` settings fixed for the whole run: the split is made once, before the first stage.
SPLIT_KEYS = {"validation", "test", "split_seed", "max_train"}


def _text(name: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{name}={value!r} is invalid: expected a non-empty string")
    return value


@dataclass
class ModelSpec:
    """The base model (the ``model:`` section).

    Args:
        name: ``minilm`` (all-MiniLM-L6-v2) or ``smollm2`` (SmolLM2-135M-Instruct) from
            :mod:`loramix.assets`; ``tiny-bert`` or ``tiny-llama``, small random models built from a config
            for tests (with MiniLM's tokenizer); or a local directory or hub name.
        task_type: ``classification`` (encoder + a head per task) or ``generation`` (causal LM).
        max_length: longest input in tokens.
        classifier_dropout: dropout before the classification heads.
        pooling: how a classifier pools the encoder's outputs: ``mean`` (default; the mean over tokens) or
            ``pooler`` (the architecture's own pooler, one copy per task: BERT's first token, dense, tanh),
            which lets ``loramix export|merge`` write a task as ``AutoModelForSequenceClassification``.
        init_seed: seed of the randomly initialised parts (tiny models, heads, adapters).
    """

    name: str
    task_type: str = "classification"
    max_length: int = 128
    classifier_dropout: float = 0.1
    pooling: str = "mean"
    init_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"model.name={self.name!r} is invalid: expected a model name or path")
        if self.task_type not in TASK_TYPES:
            raise RecipeError(f"model.task_type={self.task_type!r} is invalid: expected one of {TASK_TYPES}")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 8:
            raise RecipeError(f"model.max_length={self.max_length!r} is invalid: expected an integer >= 8")
        dropout = self.classifier_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise RecipeError(f"model.classifier_dropout={dropout!r} is invalid: expected a number in [0, 1)")
        _positive_int("model", "init_seed", self.init_seed, minimum=0)
        if self.pooling not in ("mean", "pooler"):
            raise RecipeError(f"model.pooling={self.pooling!r} is invalid: expected 'mean' or 'pooler'")


@dataclass
class SourceSpec:
    """One task source (an entry of ``data.tasks``): exactly one of ``bigbench``, ``jsonl``, ``hf``.

    Args:
        bigbench: a BIG-bench task (``multiemo``) or subtask (``multiemo/all_text_en``).
        jsonl: a JSON Lines file (one task with ``task``, else each line's ``task`` field).
        hf: a ``save_to_disk`` directory or a hub dataset name (needs ``task``).
        task: the task's name (for ``bigbench``: rename the task).
        subtasks: BIG-bench subtasks to read.
        mode: BIG-bench ``auto``, ``classification`` or ``generation``.
        max_examples: keep the first this many BIG-bench examples.
        split: the hub dataset's split.
        config: the hub dataset's configuration.
        text_field: input field(s) of ``jsonl``/``hf`` records.
        label_field: classification label field.
        target_field: generation target field.
        labels: label names.
    """

    bigbench: str | None = None
    jsonl: str | None = None
    hf: str | None = None
    task: str | None = None
    subtasks: list[str] | None = None
    mode: str = "auto"
    max_examples: int | None = None
    split: str = "train"
    config: str | None = None
    text_field: str | list[str] = "text"
    label_field: str = "label"
    target_field: str = "target"
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in SOURCE_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise RecipeError(f"data.tasks: each entry needs exactly one of {SOURCE_KINDS}, got {given or 'none'}")
        if self.hf is not None and not self.task:
            raise RecipeError(f"data.tasks: the hf source {self.hf!r} needs a task name (task: ...)")
        where = f"data.tasks[{self.kind}: {getattr(self, self.kind)!r}]"
        if not isinstance(getattr(self, self.kind), str):
            raise RecipeError(f"{where} is invalid: expected a file, directory or dataset name")
        if self.task is not None and (not isinstance(self.task, str) or not self.task):
            raise RecipeError(f"{where}.task={self.task!r} is invalid: expected a non-empty task name")
        if self.mode not in BIGBENCH_MODES:
            raise RecipeError(f"{where}.mode={self.mode!r} is invalid: expected one of {BIGBENCH_MODES}")
        if self.max_examples is not None:
            _positive_int(where, "max_examples", self.max_examples)
        if self.labels is not None and (
            not isinstance(self.labels, list) or not all(isinstance(label, (str, int)) for label in self.labels)
        ):
            raise RecipeError(f"{where}.labels={self.labels!r} is invalid: expected a list of label names")

    @property
    def kind(self) -> str:
        """``bigbench``, ``jsonl`` or ``hf``."""
        return next(kind for kind in SOURCE_KINDS if getattr(self, kind) is not None)


def _split_size(name: str, value: Any, counts_only: bool = False) -> None:
    """Check a split setting: a count, a fraction in [0, 1) (unless ``counts_only``), or a mapping task -> one."""
    values = value.values() if isinstance(value, dict) else [value]
    for item in values:
        count = isinstance(item, int) and not isinstance(item, bool) and item >= 0
        fraction = not counts_only and isinstance(item, float) and 0 <= item < 1
        if not (count or fraction):
            expected = "a count >= 0" if counts_only else "a count >= 0 or a fraction in [0, 1)"
            raise RecipeError(f"data.{name}={value!r} is invalid: expected {expected}, or a mapping task -> one")


@dataclass
class DataSpec:
    """The tasks, their splits and the sampler (the ``data:`` section; stages may override it).

    Args:
        tasks: the task sources, in task-id order.
        validation: validation examples per task (a count or a fraction).
        test: test examples per task (a count or a fraction).
        split_seed: seed of the split.
        max_train: at most this many training examples per task.
        only_tasks: train on these tasks only (e.g. in one stage); validation keeps them all.
        sampler: ``proportional``, ``temperature``, ``uniform`` or ``more``.
        temperature: the ``temperature`` sampler's temperature.
        mixed: mixed-task batches (``None``: the sampler's default; ``more`` uses one task per batch).
        instructions: text put before the inputs of a task, by task name.
        limit_train: train on at most this many examples of each task (the first ones of its training
            split), or a mapping task -> count limiting the named tasks only; the split stays as it is.
            Meant for a stage's ``data:`` (e.g. a small replay of earlier domains while MoA's routers
            learn a new one).
    """

    tasks: list[SourceSpec] = field(default_factory=list)
    validation: int | float = 0.1
    test: int | float = 0.1
    split_seed: int = 0
    max_train: int | None = None
    only_tasks: list[str] | None = None
    sampler: str = "proportional"
    temperature: float = 2.0
    mixed: bool | None = None
    instructions: dict[str, str] | None = None
    limit_train: int | dict[str, int] | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise RecipeError("data.tasks is empty: list at least one task source")
        if self.sampler not in SAMPLERS:
            raise RecipeError(f"data.sampler={self.sampler!r} is invalid: expected one of {SAMPLERS}")
        for name in ("validation", "test"):
            _split_size(name, getattr(self, name))
        if self.max_train is not None:
            _split_size("max_train", self.max_train, counts_only=True)
        if self.limit_train is not None:
            _split_size("limit_train", self.limit_train, counts_only=True)
        if not isinstance(self.split_seed, int) or isinstance(self.split_seed, bool):
            raise RecipeError(f"data.split_seed={self.split_seed!r} is invalid: expected an integer")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise RecipeError(f"data.temperature={self.temperature!r} is invalid: expected a number > 0")
        if self.mixed is not None and not isinstance(self.mixed, bool):
            raise RecipeError(f"data.mixed={self.mixed!r} is invalid: expected true, false or null")
        if self.only_tasks is not None and (
            not isinstance(self.only_tasks, list) or not all(isinstance(task, str) for task in self.only_tasks)
        ):
            raise RecipeError(f"data.only_tasks={self.only_tasks!r} is invalid: expected a list of task names")
        if self.instructions is not None and (
            not isinstance(self.instructions, dict)
            or not all(isinstance(key, str) and isinstance(value, str) for key, value in self.instructions.items())
        ):
            raise RecipeError(f"data.instructions={self.instructions!r} is invalid: expected a mapping task -> text")

    @classmethod
    def from_dict(cls, data: dict[str, Any], section: str = "data") -> DataSpec:
        """Build from a ``data:`` mapping, rejecting unknown keys by name."""
        _check_keys(section, data, cls)
        sources = data.get("tasks") or []
        if not isinstance(sources, list):
            raise RecipeError(f"{section}.tasks must be a list of task sources")
        parsed = []
        for index, source in enumerate(sources):
            if isinstance(source, SourceSpec):
                parsed.append(source)
                continue
            _check_keys(f"{section}.tasks[{index}]", source, SourceSpec)
            parsed.append(SourceSpec(**source))
        return cls(**{**data, "tasks": parsed})

    def overridden(self, overrides: dict[str, Any] | None, stage: str) -> DataSpec:
        """A copy with a stage's ``data:`` overrides applied."""
        if not overrides:
            return self
        section = f"stages[{stage}].data"
        _check_keys(section, overrides, DataSpec)
        if "tasks" in overrides:
            raise RecipeError(f"{section}.tasks: a stage cannot change the tasks; use only_tasks")
        fixed = sorted(SPLIT_KEYS & set(overrides))
        if fixed:
            raise RecipeError(f"{section}: a stage cannot change the split ({fixed}); set them in data:")
        return dataclasses.replace(self, **overrides)


@dataclass
class EvalSpec:
    """How ``loramix eval`` and validation score a run (the ``eval:`` section).

    Args:
        split: ``test`` or ``validation`` (what ``loramix eval`` reports).
        batch_size: examples per evaluation batch.
        max_new_tokens: tokens generated per example (generation tasks).
    """

    split: str = "test"
    batch_size: int = 32
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.split not in ("test", "validation"):
            raise RecipeError(f"eval.split={self.split!r} is invalid: expected 'test' or 'validation'")
        _positive_int("eval", "batch_size", self.batch_size)
        _positive_int("eval", "max_new_tokens", self.max_new_tokens)


@dataclass
class Recipe:
    """A whole run: model, mixture, data, training, stages, evaluation, output.

    ``init_adapter`` (optional) is a trained adapter directory the run starts from instead of a fresh
    mixture: its tasks must be the first tasks of ``data``, and the data's further tasks are added with the
    method's ``grow_tasks`` (MoA: one new expert and router output each, earlier ones kept bit for bit).
    The ``mixture`` section must agree with the adapter's config.
    """

    model: ModelSpec
    mixture: dict[str, Any]
    data: DataSpec
    training: TrainingSettings = field(default_factory=TrainingSettings)
    stages: list[StageSettings] = field(default_factory=list)
    eval: EvalSpec = field(default_factory=EvalSpec)
    output_dir: str = "runs/loramix"
    name: str | None = None
    init_adapter: str | None = None

    @property
    def label(self) -> str:
        """The run's name in reports: ``name``, else the mixture's method."""
        return self.name or str(self.mixture.get("method", "lora"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Build and validate a recipe from a mapping (a parsed YAML file).

        Raises:
            RecipeError: a section or key is unknown, missing or invalid (the message names it).
        """
        _check_keys("the recipe", data, cls)
        for required in ("model", "mixture", "data"):
            if required not in data:
                raise RecipeError(f"the recipe has no {required!r} section")
        _check_keys("model", data["model"], ModelSpec)
        if not isinstance(data["mixture"], dict):
            raise RecipeError("mixture must be a mapping of MixtureConfig fields")
        stages = data.get("stages") or []
        if not isinstance(stages, list):
            raise RecipeError("stages must be a list of stage mappings")
        names = [
            stage.get("name", f"stage{index + 1}") if isinstance(stage, dict) else None
            for index, stage in enumerate(stages)
        ]
        if len(set(names)) != len(names):
            raise RecipeError(f"stages: names must be distinct, got {names}")
        eval_section = data.get("eval") or {}
        _check_keys("eval", eval_section, EvalSpec)
        return cls(
            model=ModelSpec(**data["model"]),
            mixture=dict(data["mixture"]),
            data=DataSpec.from_dict(data["data"]),
            training=TrainingSettings.from_dict(data.get("training") or {}),
            stages=[StageSettings.from_dict(stage, index) for index, stage in enumerate(stages)],
            eval=EvalSpec(**eval_section),
            output_dir=_text("output_dir", data.get("output_dir", "runs/loramix")),
            name=None if data.get("name") is None else _text("name", data["name"]),
            init_adapter=None if data.get("init_adapter") is None else _text("init_adapter", data["init_adapter"]),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read a recipe file.

        Raises:
            RecipeError: the file is not a YAML mapping or the recipe is invalid (the message names the file).
        """
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise RecipeError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping of sections")
        try:
            return cls.from_dict(data)
        except RecipeError as error:
            raise RecipeError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what :meth:`from_dict` reads)."""
        data = dataclasses.asdict(self)
        data["training"]["adam_betas"] = list(self.training.adam_betas)
        data["data"]["tasks"] = [
            {key: value for key, value in dataclasses.asdict(source).items() if value != getattr(SourceSpec, key, None)}
            for source in self.data.tasks
        ]
        return data

    def to_yaml(self, path: str | Path) -> None:
        """Write the recipe as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
