"""``mode``: MoDE, Mixture of Dyadic Experts (arXiv 2408.01505; written from secondary notes, no code).

A shared down-projection ``A = [a_1..a_r]`` (r rows) and, for every rank slot j and expert i, an
up-projection vector ``b_j^i``; a router per rank slot, ``R_j(x) = softmax(W_{R,j} x)`` over m experts:
``h = W0 x + s Σ_i Σ_j R_j^i(x) · b_j^i (a_j · x)``. The B bank's column ``i·r + j`` holds ``b_j^i`` and
pairs with A's row j. With one expert it is LoRA. Token-level, so not mergeable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from loramix.context import RoutingContext
from loramix.methods.base import SharedDownProjection, register_method
from loramix.mixers import Mixer, Router

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


class DyadicRouter(Router):
    """One softmax over m experts per rank slot, per token; gate laid out expert-major (``i·r + j``)."""

    mergeable = False
    needs_task_ids = False

    def __init__(self, in_features: int, num_experts: int, rank: int, pairing: torch.Tensor) -> None:
        super().__init__(num_experts * rank, pairing)
        self.num_experts = num_experts
        self.rank = rank
        self.proj = nn.Linear(in_features, rank * num_experts, bias=False)

    def route(self, x: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        logits = self.proj(x.to(self.proj.weight.dtype)).float()
        logits = logits.reshape(*logits.shape[:-1], self.rank, self.num_experts)
        probs = torch.softmax(logits, dim=-1)  # [..., r, m]: each slot's weights over experts
        return probs.transpose(-1, -2).flatten(-2).to(x.dtype)


@register_method
class MoDE(SharedDownProjection):
    """MoDE: shared A, per-slot routers over m experts' up-projection vectors."""

    name = "mode"

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        return DyadicRouter(in_features, config.num_experts, config.r, cls.pairing(config))
