"""``mixlora``: MixLoRA (TUDB-Labs, MoE-PEFT), a token-level top-k mixture of LoRA experts.

Each adapted layer holds E LoRA experts of rank r and a router ``softmax(W_r x)`` per token; the top k
experts are kept and their weights renormalised: ``h = W0 x + s Σ_{e ∈ topk} w_e B_e A_e x``. A
load-balancing loss ``E · Σ_e f_e · P_e`` (f_e: fraction of token assignments to e, P_e: mean router
probability, over non-pad tokens) goes to ``aux_losses["balance"]`` in training; its weight is
``aux_loss_weight`` (default 0.01, the figure of MixLoRA's README; its configs use 0.001).

loramix differs from the release in two documented ways: every adapted module has its own router (the
release shares one router per FFN block across gate/up/down), and the experts are computed fused, as one
LoRA of rank E·r whose non-selected components are gated to zero, instead of gathering tokens per expert.
Choose ``target_modules`` for the FFN projections to match the paper's placement. The route depends on
the input, so a task cannot be merged or exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from loramix.methods.base import Method, register_method
from loramix.methods.options import TopKOptions
from loramix.mixers import Mixer
from loramix.routers import TokenSoftmaxRouter

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


@dataclass(frozen=True)
class MixLoRAOptions(TopKOptions):
    """MixLoRA's ``method_options``: ``top_k``, experts kept per token (default 2, at most ``num_experts``)."""

    default_top_k: ClassVar[int | None] = 2


@register_method
class MixLoRA(Method):
    """MixLoRA: top-k (default 2) token routing over E experts with a load-balancing loss."""

    name = "mixlora"
    Options = MixLoRAOptions
    default_aux_loss_weight = 0.01

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        top_k = cls.options(config).top_k
        return TokenSoftmaxRouter(in_features, config.num_experts, config.r, top_k=top_k, balance=True)
