"""MoA's stages from Python: thin wrappers that run :class:`loramix.train.Trainer` for one stage.

The same stages run from a recipe with ``loramix train`` (``recipes/moa_smollm2.yaml``): a stage with
``options: {route_by: label}`` trains the experts, each on its own domain's rows, and one with
``options: {route_by: router}`` trains the routers (see :meth:`loramix.methods.moa.MoA.start_stage`).
These helpers take tokenized examples by domain instead of a recipe's data, feed the trainer batches
with a fixed number of rows of every domain (:class:`~loramix.moa.batches.DomainStreams`), and write
the trainer's logs and checkpoint to a temporary directory that is removed afterwards.

The objective is the trainer's: the mean token loss over the batch (plus η · the router loss in stage
2). Stage 1 has no gradient clipping (a global norm would couple the experts), and AdamW is
element-wise, so with equal-length rows an expert's weights do not depend on the other domains' data;
experts of domains a stage does not train are held bit-identical.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loramix.methods.moa import ROUTER_LOSS
from loramix.moa.batches import IGNORE_INDEX, DomainStreams, TokenizedExample
from loramix.moa.routing import current_route_by, domain_routers, set_route_by
from loramix.model import MixtureModel
from loramix.runs.settings import StageSettings as TrainerStage
from loramix.runs.settings import TrainingSettings
from loramix.train.trainer import Trainer, TrainerState

StepLogger = Callable[[int, dict[str, float]], None]
EXPERT_PATTERN = r"\.lora_[AB]$"
ROUTER_PATTERN = r"\.router\."


@dataclass
class StageSettings:
    """Settings of one MoA stage run from Python (translated to a one-stage trainer run).

    Args:
        steps: optimiser steps.
        per_domain_batch: rows of each domain in a batch.
        lr: peak learning rate of what the stage trains (experts in stage 1, routers in stage 2).
        expert_lr: stage 2 only: learning rate of the experts; 0 freezes them.
        weight_decay: AdamW's decoupled weight decay (matrices only, as in the trainer).
        warmup_fraction: share of the steps with a linear warm-up; the rate then decays linearly to 0.
        max_length: tokens per row (every row is padded to it).
        pad_token_id: id written in padded positions.
        seed: seed of the per-domain shuffles and of the run.
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
    """Sum over domains of each domain's mean next-token loss on its target tokens (for reports).

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


def _run(
    model: MixtureModel,
    domains: Mapping[int, Sequence[TokenizedExample]],
    settings: StageSettings,
    stage: TrainerStage,
    trained: list[torch.nn.Parameter],
    log: StepLogger | None,
) -> list[float]:
    """Train ``trained`` for one trainer stage on domain-balanced batches; restore every flag afterwards."""
    _check(settings)
    streams = DomainStreams(
        domains, settings.per_domain_batch, settings.max_length, settings.pad_token_id, settings.seed
    )
    training = TrainingSettings(
        max_steps=settings.steps,
        batch_size=settings.per_domain_batch * len(domains),
        learning_rate=settings.lr,
        weight_decay=settings.weight_decay,
        schedule="linear",
        warmup_steps=max(1, int(settings.steps * settings.warmup_fraction)),
        max_grad_norm=None,
        mixed_precision="no",
        seed=settings.seed,
        log_every=max(1, settings.steps),
        keep_last=1,
        progress_bar=False,
    )
    eta = model.method.aux_loss_weight(model.mixture_config)

    def report(state: TrainerState) -> None:
        record = state.history[-1]
        metrics = {"lm_loss": record["loss"]}
        if f"aux_{ROUTER_LOSS}" in record:
            metrics["lm_loss"] = record["loss"] - eta * record[f"aux_{ROUTER_LOSS}"]
            metrics["router_loss"] = record[f"aux_{ROUTER_LOSS}"]
        log(state.stage_step - 1, metrics)

    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    was_training = model.training
    chosen = {id(param) for param in trained}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    try:
        with tempfile.TemporaryDirectory(prefix="loramix-moa-") as directory:
            trainer = Trainer(
                model,
                training,
                lambda _stage, _rank, _world: streams,
                directory,
                stages=[stage],
                callbacks=[report] if log is not None else [],
            )
            state = trainer.train()
    finally:
        model.train(was_training)
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
        if model.mixture_config.method == "moa":
            for router in domain_routers(model).values():
                router.release_experts()
    return [record["loss"] for record in state.history]


def _check(settings: StageSettings) -> None:
    if not isinstance(settings.steps, int) or settings.steps < 1:
        raise ValueError(f"StageSettings.steps={settings.steps!r} is invalid: expected an integer >= 1")
    if not settings.lr > 0:
        raise ValueError(f"StageSettings.lr={settings.lr!r} is invalid: expected a number > 0")


def _expert_banks(model: MixtureModel) -> list[torch.nn.Parameter]:
    return [param for layer in model.mixture_layers().values() for param in (layer.lora_A, layer.lora_B)]


def train_adapters(
    model: MixtureModel,
    domains: Mapping[int, Sequence[TokenizedExample]],
    settings: StageSettings,
    log: StepLogger | None = None,
) -> list[float]:
    """Train every adapter bank of any mixture (routing as configured) on domain-balanced batches.

    The baseline of the MoA benchmark (one LoRA on all domains mixed).

    Args:
        model: any mixture.
        domains: tokenized examples by domain id.
        settings: the stage's settings.
        log: called with ``(step, {"lm_loss": ...})`` after every step.

    Returns:
        The loss of every step.
    """
    stage = TrainerStage(name="adapters", trainable=[EXPERT_PATTERN])
    return _run(model, domains, settings, stage, _expert_banks(model), log)


def train_experts(
    model: MixtureModel,
    domains: Mapping[int, Sequence[TokenizedExample]],
    settings: StageSettings,
    log: StepLogger | None = None,
) -> list[float]:
    """Stage 1: train the experts of ``domains`` in one run, each row routed hard to its domain's expert.

    The trainer stage has ``options: {route_by: label, train_experts: <domains>}``: experts of domains
    not in ``domains`` are held byte-identical. Routers are not touched; the routing mode is restored
    afterwards.

    Args:
        model: an ``moa`` mixture.
        domains: tokenized examples (``input_ids``, ``labels``) by domain id.
        settings: the stage's settings (``lr`` is the experts' rate).
        log: called with ``(step, {"lm_loss": ...})`` after every step.

    Returns:
        The loss of every step.

    Raises:
        ValueError: a domain id is out of range.
    """
    num_domains = model.mixture_config.num_tasks
    unknown = [domain for domain in domains if not 0 <= domain < num_domains]
    if unknown:
        raise ValueError(f"domains {unknown} are out of range: this mixture has domains 0..{num_domains - 1}")
    previous = current_route_by(model)
    stage = TrainerStage(
        name="experts",
        trainable=[EXPERT_PATTERN],
        options={"route_by": "label", "train_experts": sorted(domains)},
    )
    try:
        return _run(model, domains, settings, stage, _expert_banks(model), log)
    finally:
        set_route_by(model, previous)


def train_routers(
    model: MixtureModel,
    domains: Mapping[int, Sequence[TokenizedExample]],
    settings: StageSettings,
    log: StepLogger | None = None,
) -> list[float]:
    """Stage 2: train the routers on LM loss + η · CE(router logits, domain), experts frozen or slow.

    The trainer stage has ``options: {route_by: router}`` and, with ``expert_lr > 0``, the experts train at
    ``lr_multipliers`` ``expert_lr / lr``.

    Args:
        model: an ``moa`` mixture; it routes by its router afterwards.
        domains: tokenized examples by domain id (for a new domain, a small replay of the earlier ones).
        settings: ``lr`` is the routers' rate, ``expert_lr`` the experts' (0 freezes them).
        log: called with ``(step, {"lm_loss": ..., "router_loss": ...})`` after every step.

    Returns:
        The loss of every step.
    """
    _check(settings)
    routers = [param for router in domain_routers(model).values() for param in router.parameters()]
    trained = list(routers)
    stage = TrainerStage(name="routers", trainable=[ROUTER_PATTERN], options={"route_by": "router"})
    if settings.expert_lr > 0:
        trained += _expert_banks(model)
        stage = TrainerStage(
            name="routers",
            trainable=[ROUTER_PATTERN, EXPERT_PATTERN],
            lr_multipliers={EXPERT_PATTERN: settings.expert_lr / settings.lr},
            options={"route_by": "router"},
        )
    return _run(model, domains, settings, stage, trained, log)
