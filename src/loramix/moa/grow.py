"""Adding a domain to a trained MoA model without touching its earlier experts."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from loramix.config import ConfigError, MixtureConfig
from loramix.methods.moa import MoA
from loramix.moa.batches import TokenizedExample
from loramix.moa.routing import domain_routers
from loramix.moa.training import StageSettings, StepLogger, train_experts, train_routers
from loramix.model import MixtureModel


def _grown_config(config: MixtureConfig, name: str | None) -> MixtureConfig:
    names = config.task_names
    if names is not None or name is not None:
        names = list(names or [f"domain_{index}" for index in range(config.num_tasks)])
        if name is None or name in names:
            raise ConfigError(f"the new domain needs a name not in {names}; got {name!r}")
        names.append(name)
    return dataclasses.replace(
        config,
        num_tasks=config.num_tasks + 1,
        num_experts=config.num_experts + 1,
        task_names=names,
        method_options=dict(config.method_options),
    )


@torch.no_grad()
def grow_domain(model: MixtureModel, name: str | None = None, seed: int = 0) -> int:
    """Append one expert to every layer's bank and one output to every router.

    The new expert's A rows are Kaiming-uniform (as at creation) and its B columns zero, so the model's
    outputs do not change for the earlier domains under label routing. Router rows of earlier domains are
    kept; the new domain's row starts at zero. Earlier experts are copied bit for bit.

    Args:
        model: an ``moa`` mixture (changed in place).
        name: the new domain's name; required when the domains have names.
        seed: seed of the new expert's initialisation.

    Returns:
        The new domain's id (the old number of domains).
    """
    routers = domain_routers(model)
    config = _grown_config(model.mixture_config, name)
    generator = torch.Generator().manual_seed(seed)
    for layer_name, layer in model.mixture_layers().items():
        old_a, old_b = layer.lora_A, layer.lora_B
        new_a = torch.empty(config.r, layer.in_features, dtype=old_a.dtype)
        nn.init.kaiming_uniform_(new_a, a=math.sqrt(5), generator=generator)
        new_b = torch.zeros(layer.out_features, config.r, dtype=old_b.dtype, device=old_b.device)
        layer.lora_A = nn.Parameter(torch.cat([old_a, new_a.to(old_a.device)]), requires_grad=old_a.requires_grad)
        layer.lora_B = nn.Parameter(torch.cat([old_b, new_b], dim=1), requires_grad=old_b.requires_grad)
        old_router = routers[layer_name]
        router = MoA.make_mixer(config, layer.in_features, layer.out_features).to(old_router.classifier.weight)
        router.layer_name = layer_name
        router.classifier.weight[:-1].copy_(old_router.classifier.weight)
        router.classifier.bias[:-1].copy_(old_router.classifier.bias)
        router.requires_grad_(old_router.classifier.weight.requires_grad)
        layer.router = router
    model.mixture_config = config
    return config.num_tasks - 1


def add_domain(
    model: MixtureModel,
    examples: Sequence[TokenizedExample],
    replay: Mapping[int, Sequence[TokenizedExample]],
    expert_settings: StageSettings,
    router_settings: StageSettings,
    name: str | None = None,
    log: StepLogger | None = None,
) -> int:
    """Add a domain: train its expert on its data alone, append it, then retrain the routers with replay.

    1. :func:`grow_domain` appends a fresh expert and a router output.
    2. :func:`~loramix.moa.training.train_experts` trains the new expert on ``examples`` only (label
       routing); every earlier expert is restored after each step, so it stays byte-identical.
    3. :func:`~loramix.moa.training.train_routers` retrains the routers on ``examples`` plus ``replay``
       (a small sample of each earlier domain's examples), experts frozen unless
       ``router_settings.expert_lr > 0`` (then earlier experts change too: keep it 0 for no forgetting).

    Args:
        model: a trained ``moa`` mixture (changed in place); it routes by its router afterwards.
        examples: the new domain's tokenized examples (``input_ids``, ``labels``).
        replay: a few tokenized examples of each earlier domain, by domain id.
        expert_settings: settings of step 2.
        router_settings: settings of step 3.
        name: the new domain's name (required when the domains have names).
        log: called with ``(step, metrics)`` in both training steps.

    Returns:
        The new domain's id.
    """
    domain = grow_domain(model, name, seed=expert_settings.seed)
    train_experts(model, {domain: examples}, expert_settings, log)
    train_routers(model, {**replay, domain: examples}, router_settings, log)
    return domain
