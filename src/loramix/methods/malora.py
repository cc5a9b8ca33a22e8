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

import math

import torch
from torch import nn

from loramix.config import MixtureConfig, check_option, is_count, is_number
from loramix.context import RoutingContext
from loramix.methods.base import Method, register_method
from loramix.mixers import Mixer
from loramix.routers import TokenSoftmaxRouter

OPTIONS = ("subspace_rank", "balance_factor")


class SubspaceMixer(TokenSoftmaxRouter):
    """MALoRA's mixer: the per-expert projections P_t from the shared subspace, gated by a top-k token router."""

    def __init__(
        self, in_features: int, num_experts: int, wide_rank: int, subspace_rank: int, top_k: int, beta: float
    ) -> None:
        super().__init__(in_features, num_experts, wide_rank, top_k=top_k, balance=True)
        self.bank_a = subspace_rank
        self.beta = beta
        self.expert_proj = nn.Parameter(torch.zeros(num_experts * wide_rank, subspace_rank))

    def mix(self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.expert_proj.T.to(hidden.dtype)) * self.route(x, context)

    @torch.no_grad()
    def init_banks(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        subspace_rank, in_features = lora_A.shape
        stacked = torch.empty(self.expert_proj.shape[0], in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(stacked, a=math.sqrt(5))
        left, singular, right_t = torch.linalg.svd(stacked, full_matrices=False)
        lora_A.copy_(self.beta * right_t[:subspace_rank])
        self.expert_proj.copy_(left[:, :subspace_rank] * singular[:subspace_rank] / self.beta)


def _sizes(config: MixtureConfig) -> tuple[int, int]:
    """(d, r̄): the shared subspace's rank and each expert's widened rank."""
    total = config.r * config.num_experts
    subspace = int(config.method_options.get("subspace_rank", max(1, total // 2)))
    return subspace, config.r + (total - subspace) // config.num_experts


@register_method
class MALoRA(Method):
    """MALoRA: shared down-projection subspace, per-expert projections, widened up-projections, top-k tokens."""

    name = "malora"
    top_k_of = "num_experts"
    options = OPTIONS
    default_aux_loss_weight = 0.001

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        super().validate(config)
        total = config.r * config.num_experts
        subspace = config.method_options.get("subspace_rank", max(1, total // 2))
        check_option(
            cls.name,
            "subspace_rank",
            subspace,
            is_count(subspace, 1, total),
            f"an integer in [1, r * num_experts = {total}]",
        )
        beta = config.method_options.get("balance_factor", 1.0)
        check_option(cls.name, "balance_factor", beta, is_number(beta) and beta > 0, "a finite number > 0")

    @classmethod
    def bank_sizes(cls, config: MixtureConfig) -> tuple[int, int]:
        subspace, wide = _sizes(config)
        return subspace, wide * config.num_experts

    @classmethod
    def scale(cls, config: MixtureConfig) -> float:
        return config.lora_alpha / _sizes(config)[1]

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        subspace, wide = _sizes(config)
        top_k = 2 if config.top_k is None else config.top_k
        beta = float(config.method_options.get("balance_factor", 1.0))
        return SubspaceMixer(in_features, config.num_experts, wide, subspace, top_k, beta)
