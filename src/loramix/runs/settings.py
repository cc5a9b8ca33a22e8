"""Settings of a training run and of its stages, validated with errors that name the bad key."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from loramix.runs.schedules import SCHEDULES

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


class RecipeError(ValueError):
    """A recipe or settings value is invalid; the message names the key and what is allowed."""


def _check_keys(section: str, data: dict[str, Any], cls: type) -> None:
    if not isinstance(data, dict):
        raise RecipeError(f"{section} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown} in {section}; known keys: {sorted(known)}")


def _positive_int(section: str, name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RecipeError(f"{section}.{name}={value!r} is invalid: expected an integer >= {minimum}")


def _number(section: str, name: str, value: Any, minimum: float = 0.0) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not minimum <= value < math.inf:
        raise RecipeError(f"{section}.{name}={value!r} is invalid: expected a finite number >= {minimum}")


def _patterns(section: str, name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RecipeError(f"{section}.{name}={value!r} is invalid: expected a list of regular expressions")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            raise RecipeError(f"{section}.{name}: {pattern!r} is not a regular expression ({error})") from None


@dataclass
class TrainingSettings:
    """How to train (the ``training:`` section of a recipe); stages may override the optimisation part.

    Args:
        max_steps: optimizer steps (of the single stage when the recipe lists none).
        batch_size: examples per process per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step; the global batch is
            ``batch_size * gradient_accumulation_steps * processes``.
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices (parameters of 2 or more dimensions) only.
        adam_betas: AdamW's betas.
        adam_epsilon: AdamW's epsilon.
        schedule: ``constant``, ``linear`` or ``cosine`` decay after warm-up.
        warmup_steps: steps of linear warm-up.
        min_lr_ratio: the decay's final learning rate as a fraction of the peak.
        max_grad_norm: clip the global gradient norm to this (``None`` or 0: no clipping).
        mixed_precision: ``auto`` (bf16 where the GPU supports it, else full precision), ``no``, ``bf16``
            or ``fp16``.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        use_cpu: train on the CPU even where an accelerator is available.
        seed: seed of every random generator (weights of new modules, dropout, data order).
        log_every: steps between log lines.
        eval_every: steps between validations (0: only at the end of each stage).
        save_every: steps between checkpoints (0: only at the end of each stage).
        keep_last: checkpoints kept (``None``: all).
        find_unused_parameters: let DDP handle parameters a step leaves unused (per-task heads of tasks
            absent from a batch, unchosen experts).
        progress_bar: show a tqdm bar on the main process.
    """

    max_steps: int = 100
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    schedule: str = "linear"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    use_cpu: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_last: int | None = 2
    find_unused_parameters: bool = True
    progress_bar: bool = True

    def __post_init__(self) -> None:
        section = "training"
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every"):
            _positive_int(section, name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            _positive_int(section, name, getattr(self, name), minimum=0)
        if self.keep_last is not None:
            _positive_int(section, "keep_last", self.keep_last)
        for name in ("learning_rate", "weight_decay", "adam_epsilon", "min_lr_ratio"):
            _number(section, name, getattr(self, name))
        if self.max_grad_norm is not None:
            _number(section, "max_grad_norm", self.max_grad_norm)
        if len(self.adam_betas) != 2 or not all(0 <= beta < 1 for beta in self.adam_betas):
            raise RecipeError(f"training.adam_betas={self.adam_betas!r} is invalid: expected two numbers in [0, 1)")
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"training.schedule={self.schedule!r} is invalid: expected one of {SCHEDULES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise RecipeError(
                f"training.mixed_precision={self.mixed_precision!r} is invalid: expected one of {MIXED_PRECISION}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSettings:
        """Build from a recipe's ``training:`` mapping, rejecting unknown keys by name."""
        _check_keys("training", data, cls)
        if "adam_betas" in data:
            data = {**data, "adam_betas": tuple(data["adam_betas"])}
        return cls(**data)


def check_precision(settings: TrainingSettings) -> None:
    """Check that ``training.mixed_precision`` can run where this run trains (before anything is written).

    fp16 needs a CUDA GPU: on the CPU it would silently train in full precision. bf16 needs a GPU that
    supports it when one is used (the CPU runs bf16 autocast).

    Raises:
        RecipeError: naming ``training.mixed_precision`` and the device.
    """
    setting = settings.mixed_precision
    on_cpu = settings.use_cpu or not torch.cuda.is_available()
    if setting == "fp16" and on_cpu:
        where = "training.use_cpu is true" if settings.use_cpu else "no CUDA GPU is available"
        raise RecipeError(
            f"training.mixed_precision='fp16' needs a CUDA GPU, but {where}: fp16 would silently train in fp32; "
            "use 'bf16', 'no' or 'auto'"
        )
    if setting == "bf16" and not on_cpu and not torch.cuda.is_bf16_supported():
        raise RecipeError("training.mixed_precision='bf16' is not supported by this GPU: use 'fp16', 'no' or 'auto'")


@dataclass
class StageSettings:
    """One stage of training: its length, optimisation and which parameters train.

    Which parameters train is given by regular expressions matched (``re.search``) against the names of
    the mixture model's parameters (e.g. ``base_model.encoder.layer.0.attention.self.query.lora_A``).
    Only parameters the mixture made trainable (adapter banks, routers, ``modules_to_save``) are
    candidates; the frozen base never trains.

    Args:
        name: a label for logs and checkpoints.
        max_steps: optimizer steps of this stage; ``None`` takes ``training.max_steps``.
        learning_rate: peak learning rate; ``None`` takes ``training.learning_rate``.
        warmup_steps: ``None`` takes ``training.warmup_steps``.
        schedule: ``None`` takes ``training.schedule``.
        max_grad_norm: ``None`` takes ``training.max_grad_norm``; 0 turns clipping off for this stage (MoA's
            stage 1: a global norm would couple the experts of different domains).
        trainable: patterns of the parameters that train (``None``: all candidates).
        frozen: patterns of candidates kept frozen in this stage (applied after ``trainable``).
        lr_multipliers: pattern -> factor of the learning rate for matching parameters (first match
            wins), e.g. ``{"lora_": 0.1}`` to move experts slowly while routers learn.
        data: overrides of the recipe's ``data:`` section for this stage (tasks, sampler ...).
        options: handed to the method's ``start_stage(model, options)`` when the stage starts (after a
            resume's checkpoint is restored), checked before training by its ``check_stage_options`` when
            it has one; e.g. MoA's ``{route_by: label}`` (stage 1), ``{route_by: router}`` (stage 2),
            ``train_experts: [domains]`` (hold every other expert bit-identical).
    """

    name: str = "train"
    max_steps: int | None = None
    learning_rate: float | None = None
    warmup_steps: int | None = None
    schedule: str | None = None
    max_grad_norm: float | None = None
    trainable: list[str] | None = None
    frozen: list[str] = field(default_factory=list)
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        section = f"stages[{self.name}]"
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"stages: name={self.name!r} is invalid: expected a non-empty string")
        if self.max_steps is not None:
            _positive_int(section, "max_steps", self.max_steps)
        if self.warmup_steps is not None:
            _positive_int(section, "warmup_steps", self.warmup_steps, minimum=0)
        if self.learning_rate is not None:
            _number(section, "learning_rate", self.learning_rate)
        if self.max_grad_norm is not None:
            _number(section, "max_grad_norm", self.max_grad_norm)
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise RecipeError(f"{section}.schedule={self.schedule!r} is invalid: expected one of {SCHEDULES}")
        _patterns(section, "trainable", self.trainable)
        _patterns(section, "frozen", self.frozen)
        if not isinstance(self.lr_multipliers, dict):
            raise RecipeError(f"{section}.lr_multipliers must map patterns to numbers")
        _patterns(section, "lr_multipliers", list(self.lr_multipliers))
        for pattern, factor in self.lr_multipliers.items():
            _number(section, f"lr_multipliers[{pattern!r}]", factor)
        if self.data is not None and not isinstance(self.data, dict):
            raise RecipeError(f"{section}.data must be a mapping of data settings")
        if not isinstance(self.options, dict):
            raise RecipeError(f"{section}.options must be a mapping")

    @classmethod
    def from_dict(cls, data: dict[str, Any], index: int = 0) -> StageSettings:
        """Build from one entry of a recipe's ``stages:`` list, rejecting unknown keys by name."""
        name = data.get("name", f"stage{index + 1}") if isinstance(data, dict) else None
        _check_keys(f"stages[{index}]", data, cls)
        return cls(**{**data, "name": name})

    def resolved(self, training: TrainingSettings) -> StageSettings:
        """A copy with every ``None`` optimisation field filled from ``training``."""
        return dataclasses.replace(
            self,
            max_steps=self.max_steps if self.max_steps is not None else training.max_steps,
            learning_rate=self.learning_rate if self.learning_rate is not None else training.learning_rate,
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else training.warmup_steps,
            schedule=self.schedule if self.schedule is not None else training.schedule,
            max_grad_norm=self.max_grad_norm if self.max_grad_norm is not None else training.max_grad_norm,
        )
