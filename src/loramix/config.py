"""Configuration of a mixture of low-rank experts.

A :class:`MixtureConfig` says which method to use, which modules of the base model it adapts, the size of
its factor banks and the settings of its router and auxiliary losses. It validates itself on construction
and round-trips through JSON and YAML.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "LORAMIX"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"MixtureConfig.{field_name}={value!r} is invalid: expected {allowed}")


@dataclass
class MixtureConfig:
    """Settings of a mixture of low-rank experts.

    Args:
        method: the method's registered name (see ``loramix.methods.available_methods()``).
        target_modules: which modules to adapt: a list of module-name suffixes (``["q_proj", "v_proj"]``),
            a regular expression matched against the full module name, or ``"all-linear"`` (every linear
            layer except the output head).
        exclude_modules: modules never adapted, given like ``target_modules`` (list of suffixes or regex).
        r: rank of one expert (for ``lora``, the rank of the single LoRA).
        num_experts: number of experts E. Methods whose experts are the tasks (``per_task_lora``) set it to
            ``num_tasks`` themselves.
        lora_alpha: LoRA scaling numerator; the scale is ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA).
        lora_dropout: dropout on the adapter's input.
        use_rslora: use rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        num_tasks: number of tasks T that ``task_ids`` may name (``0 <= task_id < T``).
        task_names: optional names of the tasks, in id order.
        task_embedding_dim: width of the task embedding of task-routed methods (MOELoRA).
        top_k: experts (or rank components) kept per token or sequence by top-k routers; ``None`` keeps all.
        aux_loss_weight: weight of the method's auxiliary loss (MoRE's contrastive loss, MoA's router
            cross-entropy, a load-balancing loss); ``None`` uses the method's default.
        method_options: settings only one method reads (validated by that method), e.g. MoRE's
            ``candidate_ranks``.
        modules_to_save: modules of the base model trained and saved in full (e.g. a classification head).
        init_lora_weights: ``"kaiming"`` (A Kaiming-uniform, B zero: the model starts equal to the base)
            or ``"gaussian"`` (A normal with std 1/r, B zero).
        base_model_name_or_path: recorded in the saved adapter config.
    """

    method: str = "lora"
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    r: int = 8
    num_experts: int = 1
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    num_tasks: int = 1
    task_names: list[str] | None = None
    task_embedding_dim: int = 64
    top_k: int | None = None
    aux_loss_weight: float | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    init_lora_weights: str = "kaiming"
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        from loramix.methods import available_methods, get_method

        if self.method not in available_methods():
            _fail("method", self.method, f"one of {sorted(available_methods())}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as err:
                    _fail("target_modules", self.target_modules, f"'all-linear', a list of names or a regex ({err})")
        elif not (
            isinstance(self.target_modules, (list, tuple))
            and self.target_modules
            and all(isinstance(name, str) and name for name in self.target_modules)
        ):
            _fail("target_modules", self.target_modules, "'all-linear', a regex or a non-empty list of module names")
        else:
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        for name in ("r", "num_experts", "num_tasks", "task_embedding_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "a positive integer")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            _fail("lora_alpha", self.lora_alpha, "a positive number")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora_dropout", self.lora_dropout, "a number in [0, 1)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            _fail("top_k", self.top_k, "None or a positive integer")
        if self.aux_loss_weight is not None and (
            not isinstance(self.aux_loss_weight, (int, float)) or self.aux_loss_weight < 0
        ):
            _fail("aux_loss_weight", self.aux_loss_weight, "None or a non-negative number")
        if self.task_names is not None:
            if len(self.task_names) != self.num_tasks or len(set(self.task_names)) != len(self.task_names):
                _fail("task_names", self.task_names, f"{self.num_tasks} distinct names (num_tasks)")
            self.task_names = list(self.task_names)
        if self.init_lora_weights not in ("kaiming", "gaussian"):
            _fail("init_lora_weights", self.init_lora_weights, "'kaiming' or 'gaussian'")
        if not isinstance(self.method_options, dict):
            _fail("method_options", self.method_options, "a dict")
        get_method(self.method).validate(self)

    @property
    def scale(self) -> float:
        """The LoRA scale s: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def task_index(self, task: int | str) -> int:
        """Return the id of a task given by id or by name.

        Raises:
            ValueError: the task is out of range or its name is unknown.
        """
        if isinstance(task, str):
            if not self.task_names or task not in self.task_names:
                raise ValueError(f"unknown task {task!r}; known tasks: {self.task_names}")
            return self.task_names.index(task)
        if not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task!r} is out of range: expected an id in [0, {self.num_tasks})")
        return task

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict (with ``peft_type`` for the adapter file)."""
        data = dataclasses.asdict(self)
        data["peft_type"] = PEFT_TYPE
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixtureConfig:
        """Build a config from a dict, rejecting unknown keys by name."""
        data = {key: value for key, value in data.items() if key != "peft_type"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MixtureConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        """Write the config as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> MixtureConfig:
        """Read a config written by :meth:`to_json` (or ``adapter_config.json``)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_yaml(self, path: str | Path) -> None:
        """Write the config as YAML."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))

    @classmethod
    def from_yaml(cls, path: str | Path) -> MixtureConfig:
        """Read a config from YAML."""
        import yaml

        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})
