"""Learning-rate schedules: a warm-up followed by a constant, linear or cosine decay."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "linear", "cosine")


class WarmupSchedule:
    """The multiplier of the base learning rate at an optimizer step.

    Rises linearly from 0 to 1 over ``warmup_steps``, then stays at 1 (``constant``), falls linearly to
    ``min_ratio`` at ``total_steps`` (``linear``) or follows a half cosine down to ``min_ratio``
    (``cosine``). It is a plain object (not a closure) so a ``LambdaLR`` holding it saves and loads.

    Args:
        kind: ``"constant"``, ``"linear"`` or ``"cosine"``.
        warmup_steps: steps of linear warm-up.
        total_steps: steps of the whole schedule (warm-up included).
        min_ratio: the multiplier at the end of a decay.

    Raises:
        ValueError: an unknown kind or inconsistent step counts.
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule {kind!r} is unknown; expected one of {SCHEDULES}")
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps} and total_steps={total_steps} must be >= 0 and >= 1")
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> LambdaLR:
    """A ``LambdaLR`` over every parameter group of ``optimizer`` following :class:`WarmupSchedule`."""
    return LambdaLR(optimizer, WarmupSchedule(kind, warmup_steps, total_steps, min_ratio))
