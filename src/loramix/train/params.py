"""Which parameters train in a stage, and the AdamW parameter groups they form."""

from __future__ import annotations

import re

import torch
from torch import nn

from loramix.runs.settings import RecipeError, StageSettings, TrainingSettings


def stage_selection(candidates: list[str], stage: StageSettings) -> list[str]:
    """The candidate names that ``stage``'s ``trainable`` and ``frozen`` patterns let train (no side effect)."""
    return [
        name
        for name in candidates
        if (stage.trainable is None or any(re.search(pattern, name) for pattern in stage.trainable))
        and not any(re.search(pattern, name) for pattern in stage.frozen)
    ]


def select_trainable(model: nn.Module, candidates: list[str], stage: StageSettings) -> list[str]:
    """Set ``requires_grad`` of ``model``'s parameters for ``stage`` and return the names that train.

    Args:
        model: the mixture model.
        candidates: names of the parameters that may train (those the mixture made trainable).
        stage: the stage whose ``trainable`` and ``frozen`` patterns decide.

    Raises:
        RecipeError: the patterns leave no parameter to train.
    """
    allowed = set(candidates)
    chosen = stage_selection(candidates, stage)
    if not chosen:
        examples = ", ".join(candidates[:4])
        raise RecipeError(
            f"stages[{stage.name}]: trainable={stage.trainable} frozen={stage.frozen} leave no parameter to train; "
            f"candidate names look like: {examples}"
        )
    selected = set(chosen)
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected and name in allowed)
    return chosen


def build_optimizer(model: nn.Module, stage: StageSettings, settings: TrainingSettings) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, grouped by learning-rate multiplier and weight decay.

    Matrices (2 or more dimensions) get ``settings.weight_decay``; vectors and scalars (biases, norms,
    gates' biases) none. A parameter's learning rate is ``stage.learning_rate`` times the factor of the
    first ``stage.lr_multipliers`` pattern its name matches (1 if none).
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        factor = next(
            (float(value) for pattern, value in stage.lr_multipliers.items() if re.search(pattern, name)), 1.0
        )
        decay = settings.weight_decay if param.dim() >= 2 else 0.0
        groups.setdefault((factor, decay), []).append(param)
    return torch.optim.AdamW(
        [
            {"params": params, "lr": stage.learning_rate * factor, "weight_decay": decay}
            for (factor, decay), params in sorted(groups.items())
        ],
        lr=stage.learning_rate,
        betas=settings.adam_betas,
        eps=settings.adam_epsilon,
    )


def build_run_optimizer(
    model: nn.Module, candidates: list[str], stages: list[StageSettings], settings: TrainingSettings
) -> torch.optim.AdamW:
    """One AdamW over every candidate parameter for the whole run (all stages), so it is prepared once.

    Parameters are grouped by weight decay (matrices get ``settings.weight_decay``) and by their learning-rate
    factors in every stage; each group remembers those factors under ``"stage_lr_factors"``, and
    :func:`start_stage_lrs` sets the groups' learning rates when a stage starts. A parameter a stage leaves
    frozen gets no gradient and so no update.

    Args:
        model: the mixture model.
        candidates: names of the parameters that may train.
        stages: the run's resolved stages.
        settings: the run's settings (weight decay, betas, epsilon).
    """
    allowed = set(candidates)
    groups: dict[tuple[float, tuple[float, ...]], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if name not in allowed:
            continue
        factors = tuple(
            next((float(value) for pattern, value in stage.lr_multipliers.items() if re.search(pattern, name)), 1.0)
            for stage in stages
        )
        decay = settings.weight_decay if param.dim() >= 2 else 0.0
        groups.setdefault((decay, factors), []).append(param)
    first = stages[0].learning_rate
    return torch.optim.AdamW(
        [
            {"params": params, "lr": first * factors[0], "weight_decay": decay, "stage_lr_factors": list(factors)}
            for (decay, factors), params in sorted(groups.items())
        ],
        lr=first,
        betas=settings.adam_betas,
        eps=settings.adam_epsilon,
    )


def start_stage_lrs(optimizer: torch.optim.Optimizer, stage: StageSettings, index: int) -> None:
    """Set every group's peak learning rate for stage ``index`` and forget the previous stage's moments.

    Each stage starts AdamW afresh, as if it had its own optimizer: its moments and step counts are cleared.
    """
    optimizer.state.clear()
    for group in optimizer.param_groups:
        lr = stage.learning_rate * group["stage_lr_factors"][index]
        group["lr"] = lr
        group["initial_lr"] = lr
