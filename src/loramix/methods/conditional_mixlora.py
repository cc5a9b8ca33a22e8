"""``conditional_mixlora``: Conditional Mixture-of-LoRA (arXiv 2402.15896; from its code).

Each adapted layer holds pools of E rank-1 factors, ``{a_e} ⊂ R^{d_in}`` (the A bank) and
``{b_e} ⊂ R^{d_out}`` (the B bank), and builds a rank-r LoRA per sequence from them::

    z      = mean of the layer input over the sequence's non-pad tokens
    idx_A  = top-r(W_A z)                                   (independent selection of A factors)
    idx_B  = top-r(W_B z + Σ_k softmax(a_{idx_A[k]}ᵀ W_k))  (conditional selection of B factors)
    h      = W0 x + (alpha / r) Σ_k b_{idx_B[k]} a_{idx_A[k]}ᵀ x

The k-th best A factor pairs with the k-th best B factor (``r`` = ``config.r``, E = ``num_experts``).
``method_options["conditional"]: false`` drops the conditional term. The W_k start at zero, so the term
starts as a constant that does not change the ranking.

The release's hard top-r gives the selectors no gradient. loramix trains them with a straight-through
weight on each pair: ``ĝ_k = (p_A[k] − stopgrad p_A[k] + 1) · (p_B[k] − stopgrad p_B[k] + 1)`` with p the
softmax of the scores, so the forward equals the release's (every weight 1) and W_A, W_B and the W_k
receive the gradient of their chosen probabilities. Per sequence and input-dependent, so not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from loramix.checks import ConfigError
from loramix.context import RoutingContext
from loramix.gating import pool_sequences, straight_through, token_mask
from loramix.methods.base import Method, register_method
from loramix.methods.options import MethodOptions
from loramix.mixers import Mixer

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


@dataclass(frozen=True)
class ConditionalMixLoRAOptions(MethodOptions):
    """Conditional MixLoRA's ``method_options``: the conditional term of B's scores on or off."""

    conditional: bool = True


def _chosen_weight(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return straight_through(torch.softmax(scores, dim=-1).gather(-1, index))


class FactorSelectionMixer(Mixer):
    """Per-sequence top-r selection of A and B factors from pools of E, paired in score order."""

    mergeable = False
    needs_task_ids = False

    def __init__(self, in_features: int, pool_size: int, rank: int, conditional: bool) -> None:
        super().__init__(pool_size, pool_size)
        self.rank = rank
        self.select_a = nn.Linear(in_features, pool_size, bias=False)
        self.select_b = nn.Linear(in_features, pool_size, bias=False)
        self.condition = nn.Parameter(torch.zeros(rank, in_features, pool_size)) if conditional else None

    def selection(
        self, x: torch.Tensor, lora_A: torch.Tensor, context: RoutingContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chosen factors of each sequence.

        Args:
            x: FloatTensor[batch, seq, d_in] (or [batch, d_in]), the layer input.
            lora_A: FloatTensor[E, d_in], the A pool.
            context: supplies the attention mask for pooling.

        Returns:
            (idx_A, idx_B, weights), each [batch, r]: paired A and B factor ids and straight-through weights.
        """
        dtype = self.select_a.weight.dtype
        pooled = pool_sequences(x.to(dtype), token_mask(x, context))
        scores_a = self.select_a(pooled)
        index_a = scores_a.topk(self.rank, dim=-1).indices
        scores_b = self.select_b(pooled)
        if self.condition is not None:
            chosen_a = lora_A[index_a].to(dtype)  # [batch, r, d_in]
            affinity = torch.einsum("bkd,kde->bke", chosen_a, self.condition)
            scores_b = scores_b + torch.softmax(affinity, dim=-1).sum(1)
        index_b = scores_b.topk(self.rank, dim=-1).indices
        return index_a, index_b, _chosen_weight(scores_a, index_a) * _chosen_weight(scores_b, index_b)

    def mix(self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor) -> torch.Tensor:
        index_a, index_b, weights = self.selection(x, lora_A, context)
        middle = [1] * (hidden.dim() - 2)
        shape = (hidden.shape[0], *hidden.shape[1:-1], self.rank)
        picked = hidden.gather(-1, index_a.view(index_a.shape[0], *middle, self.rank).expand(shape))
        picked = picked * weights.view(weights.shape[0], *middle, self.rank).to(hidden.dtype)
        slots = index_b.view(index_b.shape[0], *middle, self.rank).expand(shape)
        return torch.zeros_like(hidden).scatter_add(-1, slots, picked)


@register_method
class ConditionalMixLoRA(Method):
    """Conditional MixLoRA: a per-sequence rank-r LoRA assembled from pools of E rank-1 factors."""

    name = "conditional_mixlora"
    Options = ConditionalMixLoRAOptions

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        super().validate(config)
        if config.r > config.num_experts:
            raise ConfigError(
                f"MixtureConfig.r={config.r} is invalid: 'conditional_mixlora' selects r factors from pools of "
                f"num_experts={config.num_experts}"
            )

    @classmethod
    def bank_sizes(cls, config: MixtureConfig) -> tuple[int, int]:
        return config.num_experts, config.num_experts

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        return FactorSelectionMixer(in_features, config.num_experts, config.r, cls.options(config).conditional)
