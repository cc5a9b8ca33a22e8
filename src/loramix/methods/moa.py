"""``moa``: Mixture-of-LoRAs (MoA, arXiv 2403.03432), one LoRA expert per domain and a sequence router.

Each adapted layer holds E = ``num_tasks`` experts of rank r (expert e owns rows ``e*r:(e+1)*r`` of A and
the same columns of B) and a :class:`DomainRouter`. ``task_ids`` are always the domain labels.

Two routing modes, set by ``method_options["route_by"]`` of the model's config, the one place the mode
lives: every router reads it from there at each call (change it with :func:`loramix.moa.set_route_by`,
:func:`loramix.moa.route_by`, or a recipe stage's ``options: {route_by: ...}``, see :meth:`MoA.start_stage`):

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

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from loramix.checks import ConfigError
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

    The routing mode and the gate are not stored here: they are read at every call from the config the
    router was built with (the model's ``mixture_config``), so one assignment there switches every layer.

    Args:
        in_features: d_in of the adapted layer.
        config: the mixture's config (``num_tasks`` domains, rank ``r``, ``method_options``); kept by reference.
    """

    def __init__(self, in_features: int, config: MixtureConfig) -> None:
        super().__init__(config.num_tasks * config.r)
        self.config = config
        self.num_domains = config.num_tasks
        self.rank = config.r
        self.classifier = nn.Linear(in_features, self.num_domains)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self._held: list[tuple] = []

    @property
    def route_by(self) -> str:
        """``"router"`` or ``"label"``, read from the config's ``method_options``."""
        return self.config.method_options.get("route_by", MoAOptions.route_by)

    @property
    def gate(self) -> str:
        """``"top1"`` or ``"soft"``, read from the config's ``method_options``."""
        return self.config.method_options.get("gate", MoAOptions.gate)

    @property
    def mergeable(self) -> bool:
        """With ``route_by="label"`` the gate depends on the domain alone (mergeable)."""
        return self.route_by == "label"

    @property
    def needs_task_ids(self) -> bool:
        """Only label routing requires ``task_ids``; the router uses them as labels when given."""
        return self.route_by == "label"

    @torch.no_grad()
    def grow_experts(self, count: int) -> None:
        """Add ``count`` domains: the classifier gains zero rows, earlier rows are kept bit for bit.

        Keeps the classifier's dtype, device and ``requires_grad``; the gate widens by ``count * r``.
        """
        old = self.classifier
        grown = nn.Linear(old.in_features, old.out_features + count).to(old.weight)
        grown.weight.zero_()
        grown.bias.zero_()
        grown.weight[: old.out_features].copy_(old.weight)
        grown.bias[: old.out_features].copy_(old.bias)
        grown.requires_grad_(old.weight.requires_grad)
        self.classifier = grown
        self.num_domains += count
        self.num_components = self.bank_a = self.bank_b = self.num_domains * self.rank

    def hold_experts(self, banks: tuple[nn.Parameter, nn.Parameter], experts: list[int]) -> None:
        """Keep the given experts of the layer's banks (A rows, B columns) fixed: :meth:`step_end` restores them.

        Their values now are copied; after every optimizer step they are written back, so whatever the
        optimizer does (weight decay, moments) they stay bit-identical. An empty list releases them.

        Args:
            banks: the layer's ``(lora_A, lora_B)``.
            experts: the domain ids to hold.
        """
        lora_a, lora_b = banks
        held = []
        for expert in experts:
            start, stop = expert * self.rank, (expert + 1) * self.rank
            held.append(
                (
                    lora_a,
                    lora_b,
                    start,
                    stop,
                    lora_a[start:stop].detach().clone(),
                    lora_b[:, start:stop].detach().clone(),
                )
            )
        self._held = held

    def release_experts(self) -> None:
        """Stop holding experts (see :meth:`hold_experts`)."""
        self._held = []

    @torch.no_grad()
    def step_end(self) -> None:
        """Write the held experts back (see :meth:`hold_experts`)."""
        for lora_a, lora_b, start, stop, a_copy, b_copy in self._held:
            lora_a[start:stop].copy_(a_copy)
            lora_b[:, start:stop].copy_(b_copy)

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
    #: ``method_options`` that training stages set (:meth:`start_stage`); runs compare configs without them
    stage_settable_options = ("route_by", "gate")
    default_aux_loss_weight = 1.0

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        super().validate(config)
        require_one_expert_per_task(config, cls.name, task_word="domain")

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        return DomainRouter(in_features, config)

    #: keys of a recipe stage's ``options`` that :meth:`start_stage` reads
    STAGE_OPTIONS = ("route_by", "gate", "train_experts")

    @classmethod
    def check_stage_options(cls, config: MixtureConfig, options: dict[str, Any]) -> list[int]:
        """Check a stage's ``options`` against the config; return the ids of ``train_experts`` (all if absent).

        Raises:
            ConfigError: an unknown key, a routing mode or gate not allowed, or a ``train_experts`` entry that is
                no domain of the config (each named).
        """
        unknown = sorted(set(options) - set(cls.STAGE_OPTIONS))
        if unknown:
            raise ConfigError(f"moa stage options: unknown keys {unknown}; known: {list(cls.STAGE_OPTIONS)}")
        if "route_by" in options and options["route_by"] not in ROUTE_BY:
            raise ConfigError(
                f"moa stage options: route_by={options['route_by']!r} is invalid: expected one of {ROUTE_BY}"
            )
        if "gate" in options and options["gate"] not in GATES:
            raise ConfigError(f"moa stage options: gate={options['gate']!r} is invalid: expected one of {GATES}")
        chosen = options.get("train_experts")
        if chosen is None:
            return list(range(config.num_tasks))
        if not isinstance(chosen, list) or not chosen:
            raise ConfigError(f"moa stage options: train_experts={chosen!r} is invalid: expected a list of domains")
        names = list(config.task_names or [])
        ids = []
        for domain in chosen:
            if isinstance(domain, str) and domain in names:
                ids.append(names.index(domain))
            elif isinstance(domain, int) and not isinstance(domain, bool) and 0 <= domain < config.num_tasks:
                ids.append(domain)
            else:
                raise ConfigError(
                    f"moa stage options: train_experts entry {domain!r} is no domain of the mixture "
                    f"(names {names or 'none'}, ids 0..{config.num_tasks - 1})"
                )
        return ids

    @classmethod
    def start_stage(cls, model: Any, options: dict[str, Any]) -> None:
        """Set the routing of a training stage from a recipe stage's ``options`` (the trainer calls this).

        - ``route_by``: ``"label"`` (stage 1: each row trains its own domain's expert) or ``"router"``
          (stage 2: the routers learn from the domain labels through the ``router`` auxiliary loss);
          absent: unchanged. Written to the model's config, so the saved adapter routes the same way.
        - ``gate``: ``"top1"`` or ``"soft"``; absent: unchanged.
        - ``train_experts``: the domains (names or ids) whose experts may change in this stage; every other
          expert is held bit-identical (restored after each optimizer step, whatever weight decay or
          moments do). Absent: no expert is held.

        The trainer calls it after restoring a checkpoint, so held experts are those of the checkpoint.

        Raises:
            ConfigError: the options are invalid (see :meth:`check_stage_options`).
        """
        config = model.mixture_config
        trained = set(cls.check_stage_options(config, options))
        for key in ("route_by", "gate"):
            if key in options:
                config.method_options[key] = options[key]
        held = [domain for domain in range(config.num_tasks) if domain not in trained]
        for layer in model.mixture_layers().values():
            layer.router.hold_experts((layer.lora_A, layer.lora_B), held)

    @classmethod
    def grow_tasks(cls, model: Any, names: list[str | None], seed: int = 0) -> list[int]:
        """Add one domain (an expert in every layer, an output in every router) per entry of ``names``.

        Everything is checked before anything changes. New experts start with A initialised as at creation
        (seeded by ``seed``) and B zero, so label-routed outputs of earlier domains do not change; their
        router rows start at zero. Earlier experts and router rows are kept bit for bit. The config's
        ``num_tasks``, ``num_experts`` and ``task_names`` are updated in place in one assignment
        (routers read it by reference).

        Args:
            model: an ``moa`` :class:`~loramix.model.MixtureModel` (changed in place).
            names: the new domains' names (``None`` entries only while the domains have no names).
            seed: seed of the new experts' initialisation.

        Returns:
            The new domains' ids.

        Raises:
            ConfigError: a name is missing, repeated or taken.
        """
        config = model.mixture_config
        old_names = config.task_names
        if old_names is not None or any(name is not None for name in names):
            taken = list(old_names or [f"domain_{index}" for index in range(config.num_tasks)])
            for name in names:
                if not isinstance(name, str) or not name or name in taken:
                    raise ConfigError(f"each new domain needs a name not in {taken}; got {name!r}")
                taken.append(name)
            new_names = taken
        else:
            new_names = None
        count = len(names)
        grown = dataclasses.replace(
            config,
            num_tasks=config.num_tasks + count,
            num_experts=config.num_experts + count,
            task_names=new_names,
            method_options=dict(config.method_options),
        )
        generator = torch.Generator().manual_seed(seed)
        for layer in model.mixture_layers().values():
            layer.grow_experts(count, config.r, config.init_lora_weights, generator)
        for field in dataclasses.fields(config):
            setattr(config, field.name, getattr(grown, field.name))
        return list(range(config.num_tasks - count, config.num_tasks))
