"""MoA's two training stages as small AdamW loops over :class:`~loramix.moa.batches.DomainStreams`.

Stage 1 (:func:`train_experts`) trains every domain's expert in one run with hard label routing: one
base-model pass per batch serves all domains. The loss is the sum over domains of each domain's mean
token loss, there is no gradient clipping (a global norm would couple the experts) and AdamW is
element-wise, so an expert's weights depend on its own domain's data only, to the bit.

Stage 2 (:func:`train_routers`) trains the routers with LM loss + η · CE(router logits, domain), the
experts frozen (``expert_lr=0``) or updated at a small learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loramix.methods.moa import ROUTER_LOSS
from loramix.moa.batches import IGNORE_INDEX, DomainStreams, TokenizedExample
from loramix.moa.routing import domain_routers, route_by, set_route_by
from loramix.model import MixtureModel

StepLogger = Callable[[int, dict[str, float]], None]


@dataclass
class StageSettings:
    """Settings of one MoA training stage.

    Args:
        steps: optimiser steps.
        per_domain_batch: rows of each domain in a batch.
        lr: peak learning rate of what the stage trains (experts in stage 1, routers in stage 2).
        expert_lr: stage 2 only: learning rate of the experts; 0 freezes them.
        weight_decay: AdamW's decoupled weight decay.
        warmup_fraction: share of the steps with a linear warm-up; the rate then decays linearly to 0.
        max_length: tokens per row (every row is padded to it).
        pad_token_id: id written in padded positions.
        seed: seed of the per-domain shuffles.
    """

    steps: int = 100
    per_domain_batch: int = 2
    lr: float = 1e-3
    expert_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    max_length: int = 96
    pad_token_id: int = 0
    seed: int = 0


def domain_lm_loss(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Sum over domains of each domain's mean next-token loss on its target tokens.

    Args:
        logits: FloatTensor[batch, seq, vocab].
        labels: LongTensor[batch, seq], ``-100`` where no loss is taken.
        task_ids: LongTensor[batch], the domain of each row.

    Returns:
        A scalar; a domain's term depends on its own rows only.
    """
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    row_loss = token_loss.sum(dim=1)
    row_count = (targets != IGNORE_INDEX).sum(dim=1)
    total = logits.new_zeros((), dtype=torch.float32)
    for domain in task_ids.unique().tolist():
        rows = task_ids == domain
        total = total + row_loss[rows].sum() / row_count[rows].sum().clamp_min(1)
    return total


def _schedule(settings: StageSettings) -> Callable[[int], float]:
    warmup = max(1, int(settings.steps * settings.warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))

    return factor


def model_device(model: MixtureModel) -> torch.device:
    """The device of the model's adapters."""
    return next(iter(model.mixture_layers().values())).lora_A.device


def _expert_banks(model: MixtureModel) -> list[nn.Parameter]:
    return [param for layer in model.mixture_layers().values() for param in (layer.lora_A, layer.lora_B)]


def _expert_slices(model: MixtureModel, domains: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A rows, B columns) of the given experts in every layer, as views."""
    rank = model.mixture_config.r
    slices = []
    for layer in model.mixture_layers().values():
        for domain in domains:
            span = slice(domain * rank, (domain + 1) * rank)
            slices.append((layer.lora_A[span], layer.lora_B[:, span]))
    return slices


def _streams(domains: Mapping[int, Sequence[TokenizedExample]], settings: StageSettings) -> DomainStreams:
    return DomainStreams(domains, settings.per_domain_batch, settings.max_length, settings.pad_token_id, settings.seed)


def _run(
    model: MixtureModel,
    streams: DomainStreams,
    groups: list[dict],
    settings: StageSettings,
    with_router_loss: bool,
    after_step: Callable[[], None] | None,
    log: StepLogger | None,
) -> list[float]:
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings))
    eta = model.method.aux_loss_weight(model.mixture_config)
    device = model_device(model)
    was_training = model.training
    model.train()
    losses = []
    try:
        for step in range(settings.steps):
            batch = {key: value.to(device) for key, value in streams.next_batch().items()}
            labels, task_ids = batch.pop("labels"), batch.pop("task_ids")
            outputs = model(**batch, task_ids=task_ids)
            lm_loss = domain_lm_loss(outputs.logits, labels, task_ids)
            loss = lm_loss
            metrics = {"lm_loss": float(lm_loss.detach())}
            if with_router_loss:
                router_loss = model.last_aux_losses[ROUTER_LOSS]
                loss = loss + eta * router_loss
                metrics["router_loss"] = float(router_loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            model.step_end()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
            if log is not None:
                log(step, metrics)
    finally:
        model.train(was_training)
    return losses


def train_adapters(
    model: MixtureModel,
    domains: Mapping[int, Sequence[TokenizedExample]],
    settings: StageSettings,
    log: StepLogger | None = None,
) -> list[float]:
    """Train every adapter bank of any mixture (routing as configured) on domain-balanced batches.

    The baseline loop of the MoA benchmark (one LoRA on all domains mixed) and the core of
    :func:`train_experts`.

    Args:
        model: any mixture.
        domains: tokenized examples by domain id.
        settings: the stage's settings.
        log: called with ``(step, {"lm_loss": ...})`` after every step.

    Returns:
        The loss of every step.
    """
    return _run(model, _streams(domains, settings), [{"params": _expert_banks(model)}], settings, False, None, log)


def train_experts(
    model: MixtureModel,
    domains: Mapping[int, Sequence[TokenizedExample]],
    settings: StageSettings,
    log: StepLogger | None = None,
) -> list[float]:
    """Stage 1: train the experts of ``domains`` in one run, each row routed hard to its domain's expert.

    Experts of domains not in ``domains`` are restored after every step from a copy taken before
    training, so they stay byte-identical whatever AdamW does (weight decay, moments). Routers are not
    touched.

    Args:
        model: an ``moa`` mixture.
        domains: tokenized examples (``input_ids``, ``labels``) by domain id.
        settings: the stage's settings (``lr`` is the experts' rate).
        log: called with ``(step, {"lm_loss": ...})`` after every step.

    Returns:
        The loss of every step.
    """
    num_domains = model.mixture_config.num_tasks
    unknown = [domain for domain in domains if not 0 <= domain < num_domains]
    if unknown:
        raise ValueError(f"domains {unknown} are out of range: this mixture has domains 0..{num_domains - 1}")
    frozen = [domain for domain in range(num_domains) if domain not in domains]
    views = _expert_slices(model, frozen)
    snapshots = [(a.detach().clone(), b.detach().clone()) for a, b in views]

    def restore() -> None:
        with torch.no_grad():
            for (a_view, b_view), (a_copy, b_copy) in zip(views, snapshots, strict=True):
                a_view.copy_(a_copy)
                b_view.copy_(b_copy)

    streams = _streams(domains, settings)
    banks = _expert_banks(model)
    flags = [param.requires_grad for param in banks]
    for param in banks:
        param.requires_grad_(True)
    try:
        with route_by(model, "label"):
            return _run(model, streams, [{"params": banks}], settings, False, restore if frozen else None, log)
    finally:
        for param, flag in zip(banks, flags, strict=True):
            param.requires_grad_(flag)


def train_routers(
    model: MixtureModel,
    domains: Mapping[int, Sequence[TokenizedExample]],
    settings: StageSettings,
    log: StepLogger | None = None,
) -> list[float]:
    """Stage 2: train the routers on LM loss + η · CE(router logits, domain), experts frozen or slow.

    Args:
        model: an ``moa`` mixture; it routes by its router afterwards.
        domains: tokenized examples by domain id (for a new domain, a small replay of the earlier ones).
        settings: ``lr`` is the routers' rate, ``expert_lr`` the experts' (0 freezes them).
        log: called with ``(step, {"lm_loss": ..., "router_loss": ...})`` after every step.

    Returns:
        The loss of every step.
    """
    streams = _streams(domains, settings)
    routers = [param for router in domain_routers(model).values() for param in router.parameters()]
    banks = _expert_banks(model)
    flags = [param.requires_grad for param in banks + routers]
    for param in routers:
        param.requires_grad_(True)
    for param in banks:
        param.requires_grad_(settings.expert_lr > 0)
    groups = [{"params": routers}]
    if settings.expert_lr > 0:
        groups.append({"params": banks, "lr": settings.expert_lr})
    set_route_by(model, "router")
    try:
        losses = _run(model, streams, groups, settings, True, None, log)
    finally:
        for param, flag in zip(banks + routers, flags, strict=True):
            param.requires_grad_(flag)
    return losses
