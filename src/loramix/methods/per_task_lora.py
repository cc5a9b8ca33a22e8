"""``per_task_lora``: one LoRA expert per task, each sequence routed hard to its own task's expert."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loramix.methods.base import Method, register_method, require_one_expert_per_task
from loramix.mixers import Mixer
from loramix.routers import TaskOneHotRouter

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


@register_method
class PerTaskLoRA(Method):
    """E = T experts of rank r; task t trains and uses expert t only. ``num_experts`` must equal ``num_tasks``."""

    name = "per_task_lora"

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        super().validate(config)
        require_one_expert_per_task(config, cls.name)

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        return TaskOneHotRouter(torch.arange(config.num_tasks), config.num_experts, config.r)
