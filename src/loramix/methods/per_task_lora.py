"""``per_task_lora``: one LoRA expert per task, each sequence routed hard to its own task's expert."""

from __future__ import annotations

import torch

from loramix.config import ConfigError, MixtureConfig
from loramix.methods.base import Method, register_method
from loramix.routers import Router, TaskOneHotRouter


@register_method
class PerTaskLoRA(Method):
    """E = T experts of rank r; task t trains and uses expert t only. ``num_experts`` must equal ``num_tasks``."""

    name = "per_task_lora"

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        super().validate(config)
        if config.num_experts != config.num_tasks:
            raise ConfigError(
                f"MixtureConfig.num_experts={config.num_experts} is invalid: 'per_task_lora' needs one expert "
                f"per task (num_tasks={config.num_tasks})"
            )

    @classmethod
    def make_router(cls, config: MixtureConfig, in_features: int, out_features: int) -> Router:
        return TaskOneHotRouter(torch.arange(config.num_tasks), config.num_experts, config.r)
