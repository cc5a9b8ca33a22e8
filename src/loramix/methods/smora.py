"""``smora``: SMoRA, Single-ranked Mixture of Experts LoRA (arXiv 2501.15103; from its code).

Every rank-1 component of one LoRA of rank R (``config.r``) is an expert. Per token::

    g   = sigmoid(W_r x)                    ∈ R^R
    s   = g + b                             (b: a non-learned balance bias)
    idx = top-k(s)                          (k = ``method_options["top_k"]``, default min(8, R))
    ĝ_i = k · s_i / Σ_{j ∈ idx} s_j         for i ∈ idx, 0 elsewhere
    h   = W0 x + (alpha / k) Σ_{i ∈ idx} ĝ_i B[:, i] A[i, :] x

After each optimizer step (``MixtureModel.step_end()``), ``b_i += u · sign(mean count − count_i)`` over
the tokens routed since the last step, summed over all processes in distributed training
(u = ``method_options["bias_update_rate"]``, default 1e-5): load balance without an auxiliary loss. The
bias is saved with the adapter. Token-level, so not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from loramix.checks import ConfigError
from loramix.context import RoutingContext
from loramix.gating import token_mask
from loramix.methods.base import Method, register_method
from loramix.methods.options import TopKOptions, option
from loramix.mixers import Mixer, Router, weighted

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


@dataclass(frozen=True)
class SMoRAOptions(TopKOptions):
    """SMoRA's ``method_options``: ``top_k``, rank-1 experts kept per token (default 8, at most ``r``), and u,
    the step of the balance bias."""

    top_k_of: ClassVar[str] = "r"
    default_top_k: ClassVar[int | None] = 8
    bias_update_rate: float = option(1e-5, low=0)


class RankRouter(Router):
    """SMoRA's per-token top-k over rank-1 components with a balance bias."""

    mergeable = False
    needs_task_ids = False

    def __init__(self, in_features: int, rank: int, top_k: int, update_rate: float) -> None:
        super().__init__(rank)
        self.top_k = top_k
        self.update_rate = update_rate
        self.proj = nn.Linear(in_features, rank, bias=False)
        self.register_buffer("balance_bias", torch.zeros(rank))
        self.register_buffer("counts", torch.zeros(rank), persistent=False)

    def scorer(self) -> nn.Linear:
        return self.proj

    def mix(self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor) -> torch.Tensor:
        return weighted(*self.mix_factors(hidden, x, context, lora_A))

    def mix_factors(
        self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, logits = self.split_scores(hidden, x)
        return hidden.unsqueeze(-1), self.route(x, context, logits)  # R groups of one component

    def route(self, x: torch.Tensor, context: RoutingContext, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The per-token gate FloatTensor[..., R]; ``logits`` (``W_r x``) are computed here unless given."""
        if logits is None:
            logits = self.proj(x.to(self.proj.weight.dtype))
        scores = torch.sigmoid(logits.float()) + self.balance_bias
        top_values, top_index = scores.topk(self.top_k, dim=-1)
        weights = self.top_k * top_values / top_values.sum(-1, keepdim=True)
        gate = torch.zeros_like(scores).scatter(-1, top_index, weights)
        if self.training:
            chosen = torch.zeros_like(scores).scatter(-1, top_index, 1.0)
            mask = token_mask(x, context)
            if mask is not None:
                chosen = chosen * mask.unsqueeze(-1).to(chosen.dtype)
            self.counts += chosen.reshape(-1, self.num_components).sum(0).detach()
        return gate.to(x.dtype)

    @torch.no_grad()
    def step_end(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.counts)  # every rank updates its bias from the global counts
        if self.counts.sum() > 0:
            self.balance_bias += self.update_rate * torch.sign(self.counts.mean() - self.counts)
        self.counts.zero_()


@register_method
class SMoRA(Method):
    """SMoRA: each rank is an expert; top-k per token; bias-based load balance; scale alpha / k."""

    name = "smora"
    Options = SMoRAOptions

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        super().validate(config)
        if config.num_experts != 1:
            raise ConfigError(
                f"MixtureConfig.num_experts={config.num_experts} is invalid: 'smora' makes each of the r ranks an "
                "expert; set r and leave num_experts at 1"
            )

    @classmethod
    def top_k(cls, config: MixtureConfig) -> int:
        """k, the rank-1 experts kept per token."""
        return cls.options(config).top_k

    @classmethod
    def scale(cls, config: MixtureConfig) -> float:
        return config.lora_alpha / cls.top_k(config)

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        return RankRouter(in_features, config.r, cls.top_k(config), cls.options(config).bias_update_rate)
