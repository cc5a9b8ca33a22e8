"""MoA procedures: stage 1 (all domain experts in one run), stage 2 (routers), adding a domain.

From the command line both stages are one recipe (``loramix train recipes/moa_smollm2.yaml``) and adding a
domain is another (``init_adapter``; ``loramix add-domain``). These Python helpers run the same trainer
(:class:`loramix.train.Trainer`) on tokenized examples by domain.

Typical use::

    model = get_mixture_model(base, MixtureConfig(method="moa", num_tasks=4, num_experts=4, r=8))
    train_experts(model, examples_by_domain, StageSettings(steps=300, lr=1e-3))   # stage 1
    train_routers(model, examples_by_domain, StageSettings(steps=100, lr=1e-2))   # stage 2
    model.generate(**prompts)                        # the router picks each sequence's expert
    with route_by(model, "label"):                   # a known domain overrides it
        model.generate(**prompts, task_ids=domains)
    add_domain(model, new_examples, replay, StageSettings(...), StageSettings(...), name="dates")
"""

from loramix.moa.batches import DomainStreams, TokenizedExample, collate
from loramix.moa.grow import add_domain, grow_domain
from loramix.moa.routing import (
    current_route_by,
    domain_routers,
    route_by,
    router_accuracy,
    set_gate,
    set_route_by,
)
from loramix.moa.training import StageSettings, domain_lm_loss, train_adapters, train_experts, train_routers

__all__ = [
    "DomainStreams",
    "StageSettings",
    "TokenizedExample",
    "add_domain",
    "collate",
    "current_route_by",
    "domain_lm_loss",
    "domain_routers",
    "grow_domain",
    "route_by",
    "router_accuracy",
    "set_gate",
    "set_route_by",
    "train_adapters",
    "train_experts",
    "train_routers",
]
