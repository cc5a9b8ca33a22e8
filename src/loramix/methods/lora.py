"""``lora``: one LoRA of rank r shared by all tasks (the multi-task baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loramix.checks import ConfigError
from loramix.methods.base import Method, register_method
from loramix.mixers import Mixer
from loramix.routers import ConstantRouter

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


@register_method
class LoRA(Method):
    """A single LoRA, ``h = W0 x + s B A x``, identical for every task; ``num_experts`` must be 1."""

    name = "lora"

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        super().validate(config)
        if config.num_experts != 1:
            raise ConfigError(f"MixtureConfig.num_experts={config.num_experts} is invalid: 'lora' has 1 expert")

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        return ConstantRouter(config.r)
