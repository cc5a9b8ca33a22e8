"""``moa``: Mixture-of-LoRAs (MoA, arXiv 2403.03432), one LoRA expert per domain and a sequence router.

Each adapted layer holds E = ``num_tasks`` experts of rank r (expert e owns rows ``e*r:(e+1)*r`` of A and
the same columns of B) and a :class:`DomainRouter`. ``task_ids`` are always the domain labels.

Two routing modes, set by ``method_options["route_by"]`` (change it with :func:`loramix.moa.route_by`):

- ``"label"``: each sequence uses its own domain's expert, like ``per_task_lora``. Stage 1 trains all
  experts in one run this way; at inference a known domain overrides the router. The gate then depends
  on the domain alone, so a domain merges into the base weights or exports as a PEFT LoRA.
- ``"router"`` (default, stage 2 and inference): the router picks per sequence. When ``task_ids`` are
  given they are only the router's training labels: η · CE(router logits, domain) is added to
  ``aux_losses["router"]`` (η = ``aux_loss_weight``, default 1.0) and each layer's accuracy goes to
  ``records``. Merging raises: the route depends on the input.

Decisions where the paper is silent:

- **One router per adapted module**, not one per transformer block: in this core a router belongs to its
  layer. The q/k/v (and gate/up) projections of a block see the same input, so their routers are
  redundant classifiers of the same features; each one's accuracy is reported.
- **Pooling**: the layer input averaged over non-pad tokens (``context.mask_for``; all tokens when no mask
  fits), detached, so the router's loss never reshapes the experts or earlier layers, and scaled to unit
  RMS (no learned weight), so one learning rate suits every layer: the inputs of q/k/v, o and down
  projections differ in scale by orders of magnitude, and unscaled routers oscillated in stage 2.
- **Gate**: ``"top1"`` (default) uses the argmax expert with weight exactly 1 in the forward and a
  straight-through gradient of its probability (the LM loss also teaches the router); ``"soft"`` weighs
  every expert by its softmax probability.
- **Generate**: the route chosen on the prompt is cached in ``context.cache`` (by layer name) and reused for
  every decoding step, which sees a single token. The cache is read only without autograd (``generate``
  runs under ``no_grad``), so a checkpointed layer recomputed in the backward pass routes again, to the
  same result, with its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from loramix.context import RoutingContext
from loramix.gating import expert_gates, one_hot_gates, pool_sequences, straight_through
from loramix.methods.base import Method, register_method, require_one_expert_per_task
from loramix.methods.options import MethodOptions, option
from loramix.mixers import Mixer, Router

if TYPE_CHECKING:
    from loramix.config import MixtureConfig

ROUTE_BY = ("router", "label")
GATES = ("top1", "soft")
ROUTER_LOSS = "router"


@dataclass(frozen=True)
class MoAOptions(MethodOptions):
    """MoA's ``method_options``: the routing mode and the gate (see the module docstring)."""

    route_by: str = option("router", choices=ROUTE_BY)
    gate: str = option("top1", choices=GATES)


class DomainRouter(Router):
    """MoA's sequence-level router: a linear softmax classifier over domains on the pooled layer input.

    Args:
        in_features: d_in of the adapted layer.
        num_domains: E, one expert per domain.
        rank: r, components per expert.
        route_by: ``"router"`` or ``"label"`` (see the module docstring).
        gate: ``"top1"`` or ``"soft"``.
    """

    def __init__(self, in_features: int, num_domains: int, rank: int, route_by: str, gate: str) -> None:
        super().__init__(num_domains * rank)
        self.num_domains = num_domains
        self.rank = rank
        self.route_by = route_by
        self.gate = gate
        self.classifier = nn.Linear(in_features, num_domains)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    @property
    def mergeable(self) -> bool:
        """With ``route_by="label"`` the gate depends on the domain alone (mergeable)."""
        return self.route_by == "label"

    @property
    def needs_task_ids(self) -> bool:
        """Only label routing requires ``task_ids``; the router uses them as labels when given."""
        return self.route_by == "label"

    def expert_gates(self, experts: torch.Tensor) -> torch.Tensor:
        """One-hot gates LongTensor[batch] -> FloatTensor[batch, E*r]."""
        return one_hot_gates(experts, self.num_domains, self.rank)

    def logits(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Router logits FloatTensor[batch, E] of a layer input FloatTensor[batch, seq, d_in]."""
        pooled = pool_sequences(x.detach(), mask).to(self.classifier.weight.dtype)
        return self.classifier(pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6))

    def route(self, x: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        """Gate FloatTensor[batch, E*r] for the layer input x of shape [batch, seq, d_in]."""
        if self.route_by == "label":
            return self.expert_gates(context.task_ids_for(x.shape[0])).to(x.dtype)
        cached = context.cache.get(self.layer_name)
        if cached is not None and not torch.is_grad_enabled() and cached.shape[0] == x.shape[0]:
            return cached
        seq_len = x.shape[1] if x.dim() > 2 else 1
        logits = self.logits(x, context.mask_for(x.shape[0], seq_len))
        probs = torch.softmax(logits.float(), dim=-1)
        experts = probs.argmax(dim=-1)
        if self.gate == "soft":
            gate = expert_gates(probs, self.rank).to(x.dtype)
        else:
            chosen = probs.gather(1, experts[:, None])
            gate = (self.expert_gates(experts) * straight_through(chosen)).to(x.dtype)
        self._record(context, logits, experts)
        context.cache[self.layer_name] = gate.detach()
        return gate

    def _record(self, context: RoutingContext, logits: torch.Tensor, experts: torch.Tensor) -> None:
        """Leave the chosen experts (and, with labels, the router loss and accuracy) in the context.

        The accuracy stays a 0-dim tensor (no host sync in the forward; :func:`loramix.moa.router_accuracy`
        reads it as a float).
        """
        record: dict[str, Any] = {"experts": experts.detach().cpu()}
        if context.task_ids is not None:
            labels = context.task_ids_for(logits.shape[0])
            context.aux_losses[ROUTER_LOSS].append(F.cross_entropy(logits.float(), labels))
            record["accuracy"] = (experts == labels).float().mean().detach()
        context.records[self.layer_name] = record

    def task_gate(self, task: int) -> torch.Tensor:
        """The gate of one domain, FloatTensor[E*r]; only with ``route_by="label"``.

        Raises:
            TypeError: the router picks the expert from the input.
        """
        if not self.mergeable:
            raise TypeError(
                "moa routes by its router, so a domain has no fixed weights; switch to label routing "
                "(loramix.moa.route_by(model, 'label')) to merge or export a domain"
            )
        return self.expert_gates(torch.tensor([task], device=self.classifier.weight.device))[0]


@register_method
class MoA(Method):
    """Mixture-of-LoRAs: E = T domain experts of rank r and a :class:`DomainRouter` per adapted layer.

    ``method_options``: ``route_by`` (``"router"`` | ``"label"``, default ``"router"``) and ``gate``
    (``"top1"`` | ``"soft"``, default ``"top1"``). ``num_experts`` must equal ``num_tasks``.
    """

    name = "moa"
    Options = MoAOptions
    default_aux_loss_weight = 1.0

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        super().validate(config)
        require_one_expert_per_task(config, cls.name, task_word="domain")

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        options = cls.options(config)
        return DomainRouter(in_features, config.num_tasks, config.r, options.route_by, options.gate)
