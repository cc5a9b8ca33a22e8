"""``hydralora``: HydraLoRA (NeurIPS 2024), one shared down-projection A and E up-projection heads.

``h = W0 x + s Σ_i w_i(x) B_i A x`` with a dense per-token softmax router ``w(x) = softmax(W_r x)``. The
A bank has r rows (shared); the B bank has E·r columns, and the router pairs head i's column q with A's
row q. The route depends on the input, so a task cannot be merged or exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loramix.methods.base import SharedDownProjection, register_method
from loramix.methods.options import TopKOptions
from loramix.mixers import Mixer
from loramix.routers import TokenSoftmaxRouter

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


@dataclass(frozen=True)
class HydraLoRAOptions(TopKOptions):
    """HydraLoRA's ``method_options``: ``top_k``, heads kept per token (default: all, a dense router)."""


@register_method
class HydraLoRA(SharedDownProjection):
    """HydraLoRA: shared A, E B heads, dense token router."""

    name = "hydralora"
    Options = HydraLoRAOptions

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        return TokenSoftmaxRouter(
            in_features,
            config.num_experts,
            config.r,
            top_k=cls.options(config).top_k,
            balance=False,
            pairing=cls.pairing(config),
        )
