"""Configuration of a mixture of low-rank experts.

A :class:`MixtureConfig` says which method to use, which modules of the base model it adapts, the size of
its factor banks and the settings of its router and auxiliary losses. It validates itself on construction
and round-trips through JSON and YAML.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loramix.checks import MAX_SIZE, ConfigError, is_count, is_number
from loramix.methods import available_methods, get_method

CONFIG_NAME = "loramix_config.json"
"""The file name of a saved mixture's config (its own name, so PEFT never mistakes it for a PEFT adapter)."""
LEGACY_CONFIG_NAME = "adapter_config.json"
"""PEFT's file name, which earlier loramix saves used for the mixture (with ``peft_type: "LORAMIX"``); still read."""
PEFT_TYPE = "LORAMIX"

__all__ = ["CONFIG_NAME", "LEGACY_CONFIG_NAME", "MAX_SIZE", "PEFT_TYPE", "ConfigError", "MixtureConfig"]


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"MixtureConfig.{field_name}={value!r} is invalid: expected {allowed}")


def _check_patterns(field_name: str, value: Any, allow_none: bool) -> Any:
    """Validate a ``target_modules``-like field: a regex string or a non-empty list of non-empty names."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if value != "all-linear" or field_name != "target_modules":
            try:
                re.compile(value)
            except re.error as err:
                _fail(field_name, value, f"a valid regex or a list of module names (re.error: {err})")
        return value
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(name, str) and name for name in value)):
        what = "'all-linear', a regex" if field_name == "target_modules" else "None, a regex"
        _fail(field_name, value, f"{what} or a non-empty list of module names")
    return list(value)


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
        top_k: accepted for the configs of earlier versions, which kept it here; it is moved into
            ``method_options["top_k"]`` (see :func:`moved_top_k`) and not kept as an attribute. Each method
            with top-k routing defines it there, with its own default and bound (``mixlora``, ``malora``:
            default 2, at most ``num_experts``; ``hydralora``: default dense; ``smora``: default 8, at most
            ``r``); the others refuse it.
        aux_loss_weight: weight of the method's auxiliary loss (MoRE's contrastive loss, MoA's router
            cross-entropy, a load-balancing loss); ``None`` uses the method's default.
        method_options: settings only one method reads (validated by that method), e.g. MoRE's
            ``candidate_ranks`` or a top-k router's ``top_k``.
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
    top_k: InitVar[int | None] = None
    aux_loss_weight: float | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    init_lora_weights: str = "kaiming"
    base_model_name_or_path: str | None = None

    def __post_init__(self, top_k: int | None) -> None:
        if top_k is not None:
            self.method_options = moved_top_k(self.method, top_k, self.method_options)
        self.validate()

    def validate(self) -> None:
        """Check every field (construction does; call it again after changing fields by hand).

        Numbers must be real numbers (not booleans, NaN or infinity), flags real booleans, lists real lists.

        Raises:
            ConfigError: a field is invalid; the message names it and what is allowed.
        """
        if not isinstance(self.method, str) or self.method not in available_methods():
            _fail("method", self.method, f"one of {sorted(available_methods())}")
        self.target_modules = _check_patterns("target_modules", self.target_modules, allow_none=False)
        self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules, allow_none=True)
        for name in ("r", "num_experts", "num_tasks"):
            value = getattr(self, name)
            if not is_count(value):
                _fail(name, value, f"a positive integer (at most {MAX_SIZE})")
        if not is_number(self.lora_alpha) or self.lora_alpha <= 0:
            _fail("lora_alpha", self.lora_alpha, "a finite positive number")
        if not is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora_dropout", self.lora_dropout, "a number in [0, 1)")
        if not isinstance(self.use_rslora, bool):
            _fail("use_rslora", self.use_rslora, "true or false (a boolean, not a string or number)")
        if self.aux_loss_weight is not None and (not is_number(self.aux_loss_weight) or self.aux_loss_weight < 0):
            _fail("aux_loss_weight", self.aux_loss_weight, "None or a finite non-negative number")
        if self.task_names is not None:
            if not isinstance(self.task_names, (list, tuple)) or not all(
                isinstance(name, str) and name for name in self.task_names
            ):
                _fail("task_names", self.task_names, "None or a list of non-empty task names (strings)")
            if len(self.task_names) != self.num_tasks or len(set(self.task_names)) != len(self.task_names):
                _fail("task_names", self.task_names, f"{self.num_tasks} distinct names (num_tasks)")
            self.task_names = list(self.task_names)
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(name, str) and name for name in self.modules_to_save
            ):
                _fail("modules_to_save", self.modules_to_save, "None or a list of module names")
            self.modules_to_save = list(self.modules_to_save)
        if not isinstance(self.init_lora_weights, str) or self.init_lora_weights not in ("kaiming", "gaussian"):
            _fail("init_lora_weights", self.init_lora_weights, "'kaiming' or 'gaussian'")
        if not isinstance(self.method_options, dict) or not all(isinstance(key, str) for key in self.method_options):
            _fail("method_options", self.method_options, "a mapping of option names to values")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            _fail("base_model_name_or_path", self.base_model_name_or_path, "None or a string")
        get_method(self.method).validate(self)

    @property
    def scale(self) -> float:
        """The LoRA scale s: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def task_index(self, task: int | str) -> int:
        """Return the id of a task given by id or by name.

        Args:
            task: an integer id in ``[0, num_tasks)`` or one of ``task_names``. Floats and booleans are not ids.

        Raises:
            ValueError: the task is out of range, its name is unknown, or it is neither an id nor a name.
        """
        if isinstance(task, str):
            if not self.task_names:
                raise ValueError(
                    f"unknown task {task!r}: this mixture has no task names; use an id in [0, {self.num_tasks})"
                )
            if task not in self.task_names:
                raise ValueError(f"unknown task {task!r}; known tasks: {self.task_names}")
            return self.task_names.index(task)
        if isinstance(task, bool) or not isinstance(task, numbers.Integral):
            raise ValueError(
                f"task {task!r} ({type(task).__name__}) is not a task: expected an integer id in "
                f"[0, {self.num_tasks}) or a task name{self._known_names()}"
            )
        if not 0 <= task < self.num_tasks:
            raise ValueError(
                f"task {int(task)} is out of range: expected an id in [0, {self.num_tasks}){self._known_names()}"
            )
        return int(task)

    def _known_names(self) -> str:
        return f" (known tasks: {self.task_names})" if self.task_names else ""

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict (with ``peft_type`` for the adapter file)."""
        data = dataclasses.asdict(self)
        data["peft_type"] = PEFT_TYPE
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixtureConfig:
        """Build a config from a dict, rejecting unknown keys by name.

        Raises:
            ConfigError: ``data`` is not a mapping, belongs to another PEFT type, has unknown keys or an
                invalid value.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a MixtureConfig must be a mapping of its fields; got {type(data).__name__}")
        peft_type = data.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise ConfigError(
                f"this is the config of a PEFT {peft_type} adapter, not of a loramix mixture "
                f"(peft_type {peft_type!r}, expected {PEFT_TYPE!r}): load it with peft.PeftModel.from_pretrained"
            )
        data = _moved_options({key: value for key, value in data.items() if key != "peft_type"})
        known = {f.name for f in dataclasses.fields(cls)} | {"top_k"}  # top_k: moved by the constructor
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise ConfigError(f"unknown MixtureConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        """Write the config as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> MixtureConfig:
        """Read a config written by :meth:`to_json` (or a saved mixture's ``loramix_config.json``).

        Raises:
            FileNotFoundError: no such file.
            ConfigError: the file is not valid JSON (naming the file and line) or holds an invalid config.
        """
        return cls._from_file(path, read_json_file(path))

    def to_yaml(self, path: str | Path) -> None:
        """Write the config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))

    @classmethod
    def from_yaml(cls, path: str | Path) -> MixtureConfig:
        """Read a config from YAML.

        Raises:
            FileNotFoundError: no such file.
            ConfigError: the file is not valid YAML (naming the file) or holds an invalid config.
        """
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a text file ({err.reason})") from None
        return cls._from_file(path, data or {})

    @classmethod
    def _from_file(cls, path: str | Path, data: Any) -> MixtureConfig:
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


def _moved_options(data: dict[str, Any]) -> dict[str, Any]:
    """Map fields that earlier versions kept in the config itself to the method options that now hold them.

    ``task_embedding_dim`` (written by every earlier save) is MOELoRA's ``method_options["task_embedding_dim"]``
    now; other methods never read it, so it is dropped for them.
    """
    if "task_embedding_dim" not in data:
        return data
    data = dict(data)
    width = data.pop("task_embedding_dim")
    options = data.get("method_options", {})
    if data.get("method") == "moelora" and isinstance(options, dict) and "task_embedding_dim" not in options:
        data["method_options"] = {**options, "task_embedding_dim": width}
    return data


def moved_top_k(method: Any, top_k: Any, options: Any) -> Any:
    """``method_options`` with a top-level ``top_k`` (where earlier versions kept it) moved in.

    The rule: the value must be a positive integer; a method with top-k routing (its options have a
    ``top_k``) gets it as ``method_options["top_k"]``, where its own bound is checked; a method without one
    refuses it; given both ways, the two must agree. An unknown method or malformed ``method_options`` is
    returned as is for :meth:`MixtureConfig.validate` to name.

    Raises:
        ConfigError: ``top_k`` is not a positive integer, the method has no top-k routing, or
            ``method_options["top_k"]`` differs.
    """
    if not is_count(top_k):
        _fail("top_k", top_k, "None or a positive integer (it is method_options['top_k'] now)")
    if not isinstance(method, str) or method not in available_methods() or not isinstance(options, dict):
        return options
    if "top_k" not in {option.name for option in dataclasses.fields(get_method(method).Options)}:
        raise ConfigError(
            f"MixtureConfig.top_k={top_k!r} is invalid: method {method!r} has no top-k routing (leave top_k unset)"
        )
    if "top_k" in options and (options["top_k"] != top_k or isinstance(options["top_k"], bool)):
        raise ConfigError(
            f"MixtureConfig.top_k={top_k!r} conflicts with method_options['top_k']={options['top_k']!r}: give "
            "top_k once, in method_options"
        )
    return {**options, "top_k": top_k}


def read_json_file(path: str | Path) -> Any:
    """Parse a JSON file, turning a syntax error into a ``ConfigError`` naming the file and line.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: the file is not valid UTF-8 JSON.
    """
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason})") from None
