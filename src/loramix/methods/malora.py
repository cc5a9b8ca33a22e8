"""``malora``: MALoRA, Mixture of Asymmetric Low-Rank Adaptation (arXiv 2410.22782; from the paper).

A token-level top-k mixture of N LoRA experts whose down-projections share one subspace per layer::

    ΔW_t = B_t P_t S_A       S_A: d × d_in (shared), P_t: r̄ × d, B_t: d_out × r̄ (per expert)
    h    = W0 x + (alpha / r̄) Σ_{t ∈ topk} G_t(x) B_t P_t S_A x,   G = TopK(softmax(W_g x))

with d = ``method_options["subspace_rank"]`` (default r·N / 2, i.e. λ = 1/2) and the parameters saved by
sharing the subspace widening each up-projection to r̄ = r + (r·N − d) / N (r = 8, N = 8, d = 32 gives
r̄ = 12). B_t starts at zero. Initialisation: N Kaiming-uniform matrices W_t (r̄ × d_in) are stacked and
truncated to rank d by SVD, ``[W_1; …; W_N] ≈ U Σ V₀ᵀ``; then ``S_A = β V₀ᵀ`` and
``P_t = (U Σ)[rows of t] / β`` so that each expert starts at the best rank-d approximation of its Kaiming
matrix (β = ``method_options["balance_factor"]``, default 1). The router's load-balancing loss goes to
``aux_losses["balance"]`` with weight ``aux_loss_weight`` (default 0.001; 0.01 in the paper's appendix).

In bank form: the A bank is S_A (d rows), the mixer applies the stacked P_t (N·r̄ × d) to ``S_A x`` and
gates the result per token, and the B bank holds the B_t side by side. Token-level, so not mergeable.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from loramix.context import RoutingContext
from loramix.methods.base import Method, register_method
from loramix.methods.options import TopKOptions, option
from loramix.mixers import Mixer
from loramix.routers import TokenSoftmaxRouter

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


class SubspaceMixer(TokenSoftmaxRouter):
    """MALoRA's mixer: the per-expert projections P_t from the shared subspace, gated by a top-k token router."""

    def __init__(
        self, in_features: int, num_experts: int, wide_rank: int, subspace_rank: int, top_k: int, beta: float
    ) -> None:
        super().__init__(in_features, num_experts, wide_rank, top_k=top_k, balance=True)
        self.bank_a = subspace_rank
        self.beta = beta
        self.expert_proj = nn.Parameter(torch.zeros(num_experts * wide_rank, subspace_rank))

    def mix_factors(
        self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, logits = self.split_scores(hidden, x)
        wide = hidden @ self.expert_proj.T.to(hidden.dtype)
        return self.expert_components(wide), self.expert_weights(x, context, logits).to(x.dtype)

    @torch.no_grad()
    def init_banks(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        subspace_rank, in_features = lora_A.shape
        stacked = torch.empty(self.expert_proj.shape[0], in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(stacked, a=math.sqrt(5))
        left, singular, right_t = torch.linalg.svd(stacked, full_matrices=False)
        lora_A.copy_(self.beta * right_t[:subspace_rank])
        self.expert_proj.copy_(left[:, :subspace_rank] * singular[:subspace_rank] / self.beta)


@dataclass(frozen=True)
class MALoRAOptions(TopKOptions):
    """MALoRA's ``method_options``: ``top_k`` (experts kept per token, default 2), d, the shared subspace's
    rank (default r·N / 2), and β."""

    default_top_k: ClassVar[int | None] = 2
    subspace_rank: int | None = option(None, low=1)
    balance_factor: float = option(1.0, above=0)

    def resolve(self, method: str, config: MixtureConfig) -> MALoRAOptions:
        self = super().resolve(method, config)
        total = config.r * config.num_experts
        if self.subspace_rank is None:
            return dataclasses.replace(self, subspace_rank=max(1, total // 2))
        if self.subspace_rank > total:
            self.fail(method, "subspace_rank", self.subspace_rank, f"an integer in [1, r * num_experts = {total}]")
        return self


@register_method
class MALoRA(Method):
    """MALoRA: shared down-projection subspace, per-expert projections, widened up-projections, top-k tokens."""

    name = "malora"
    Options = MALoRAOptions
    default_aux_loss_weight = 0.001

    @classmethod
    def sizes(cls, config: MixtureConfig) -> tuple[int, int]:
        """(d, r̄): the shared subspace's rank and each expert's widened rank."""
        subspace = cls.options(config).subspace_rank
        return subspace, config.r + (config.r * config.num_experts - subspace) // config.num_experts

    @classmethod
    def bank_sizes(cls, config: MixtureConfig) -> tuple[int, int]:
        subspace, wide = cls.sizes(config)
        return subspace, wide * config.num_experts

    @classmethod
    def scale(cls, config: MixtureConfig) -> float:
        return config.lora_alpha / cls.sizes(config)[1]

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        subspace, wide = cls.sizes(config)
        options = cls.options(config)
        return SubspaceMixer(in_features, config.num_experts, wide, subspace, options.top_k, options.balance_factor)
