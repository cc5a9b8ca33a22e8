"""Adding a domain to a trained MoA model without touching its earlier experts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loramix.methods.moa import MoA
from loramix.moa.batches import TokenizedExample
from loramix.moa.routing import domain_routers
from loramix.moa.training import StageSettings, StepLogger, train_experts, train_routers
from loramix.model import MixtureModel


def grow_domain(model: MixtureModel, name: str | None = None, seed: int = 0) -> int:
    """Append one expert to every layer's bank and one output to every router (:meth:`MoA.grow_tasks`).

    The new expert's A rows are initialised as at creation and its B columns are zero, so the model's
    outputs for the earlier domains do not change under label routing. Earlier experts and router rows
    are kept bit for bit; the new router row starts at zero.

    Args:
        model: an ``moa`` mixture (changed in place).
        name: the new domain's name; required when the domains have names.
        seed: seed of the new expert's initialisation.

    Returns:
        The new domain's id (the old number of domains).
    """
    domain_routers(model)
    return MoA.grow_tasks(model, [name], seed=seed)[0]


def add_domain(
    model: MixtureModel,
    examples: Sequence[TokenizedExample],
    replay: Mapping[int, Sequence[TokenizedExample]],
    expert_settings: StageSettings,
    router_settings: StageSettings,
    name: str | None = None,
    log: StepLogger | None = None,
) -> int:
    """Add a domain: train its expert on its data alone, then retrain the routers with replay.

    1. :func:`grow_domain` appends a fresh expert and a router output.
    2. :func:`~loramix.moa.training.train_experts` trains the new expert on ``examples`` only (label
       routing); every earlier expert is held (restored after each step), so it stays byte-identical.
    3. :func:`~loramix.moa.training.train_routers` retrains the routers on ``examples`` plus ``replay``
       (a small sample of each earlier domain's examples), experts frozen unless
       ``router_settings.expert_lr > 0`` (then earlier experts change too: keep it 0 for no forgetting).

    Both steps run on :class:`loramix.train.Trainer`. A recipe does the same with ``init_adapter`` and two
    stages (see ``loramix add-domain`` and the README).

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
