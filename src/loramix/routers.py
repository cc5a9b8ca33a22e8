"""The generic routers: diagonal mixers whose gate comes from the task or from each token.

Each returns the gate over the K rank components of the layer's B bank (``M = diag(g)``, see
:class:`~loramix.mixers.Router`). Auxiliary losses go into the routing context. Routers whose gate depends
on the task alone are ``mergeable`` and give it in :meth:`~loramix.mixers.Mixer.task_gate`.
"""

from __future__ import annotations

import torch
from torch import nn

from loramix.context import RoutingContext
from loramix.gating import balance_loss, expert_gates, one_hot_gates, token_mask, top_k_weights
from loramix.mixers import Router, shared_pairing, weighted


class ConstantRouter(Router):
    """Every component always on: a plain LoRA shared by all tasks (``mix`` is the identity)."""

    needs_task_ids = False

    def route(self, x: torch.Tensor, context: RoutingContext) -> None:
        return None

    def task_gate(self, task: int) -> torch.Tensor:
        return torch.ones(self.num_components)


class TaskOneHotRouter(Router):
    """Hard routing by task: task t uses expert ``expert_of_task[t]`` (r components each), nothing else.

    Args:
        expert_of_task: LongTensor[T], the expert of each task.
        num_experts: E.
        rank: r, components per expert.
    """

    def __init__(self, expert_of_task: torch.Tensor, num_experts: int, rank: int) -> None:
        super().__init__(num_experts * rank)
        self.num_experts = num_experts
        self.rank = rank
        self.register_buffer("expert_of_task", expert_of_task.clone().long(), persistent=False)

    def route(self, x: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        tasks = context.task_ids_for(x.shape[0])
        return one_hot_gates(self.expert_of_task[tasks], self.num_experts, self.rank).to(x.dtype)

    def task_gate(self, task: int) -> torch.Tensor:
        return one_hot_gates(self.expert_of_task[task : task + 1], self.num_experts, self.rank)[0]


class TaskSoftmaxRouter(Router):
    """MOELoRA's task gate: ``softmax(W_g · Embedding(t))`` over E experts, each weight repeated r times.

    Args:
        num_tasks: T.
        num_experts: E.
        rank: r, components per expert.
        embedding_dim: width of the task embedding.
    """

    def __init__(self, num_tasks: int, num_experts: int, rank: int, embedding_dim: int) -> None:
        super().__init__(num_experts * rank)
        self.rank = rank
        self.task_embedding = nn.Embedding(num_tasks, embedding_dim)
        self.gate = nn.Linear(embedding_dim, num_experts, bias=False)

    def expert_weights(self, tasks: torch.Tensor) -> torch.Tensor:
        """Softmax weights FloatTensor[batch, E] of LongTensor[batch] tasks."""
        return torch.softmax(self.gate(self.task_embedding(tasks)), dim=-1)

    def route(self, x: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        tasks = context.task_ids_for(x.shape[0])
        return expert_gates(self.expert_weights(tasks), self.rank).to(x.dtype)

    def task_gate(self, task: int) -> torch.Tensor:
        device = self.task_embedding.weight.device
        return expert_gates(self.expert_weights(torch.tensor([task], device=device))[0], self.rank)


class TokenSoftmaxRouter(Router):
    """Per-token softmax over E experts (each r components), optionally top-k with renormalised weights.

    Used by HydraLoRA (dense), MixLoRA and MALoRA (top-k with a load-balancing loss in
    ``aux_losses["balance"]``). The router's weight is the layer's :meth:`~loramix.mixers.Mixer.scorer`, so
    its logits come out of the A GEMM; the expert weights scale each expert's r components by broadcasting
    (no [..., E * r] gate is built).

    Args:
        in_features: d_in of the layer (the router reads the layer input).
        num_experts: E.
        rank: r, components per expert.
        top_k: experts kept per token (``None``: all, dense).
        balance: add the load-balancing loss in training.
        pairing: the A row of each B column (see :class:`~loramix.mixers.Router`); ``None``: one each.
    """

    mergeable = False
    needs_task_ids = False

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        rank: int,
        top_k: int | None,
        balance: bool,
        pairing: torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_experts * rank, pairing)
        self.rank = rank
        self.top_k = top_k if top_k is not None and top_k < num_experts else None
        self.balance = balance
        self.proj = nn.Linear(in_features, num_experts, bias=False)
        # every expert reads the same r rows of A (HydraLoRA's shared down-projection): broadcast, no gather
        self.shared_rows = pairing is not None and torch.equal(pairing.long(), shared_pairing(rank, num_experts))

    def scorer(self) -> nn.Linear:
        return self.proj

    def expert_weights(
        self, x: torch.Tensor, context: RoutingContext, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-token expert weights FloatTensor[..., E] (top-k renormalised), adding the balance loss in training.

        ``logits`` are the router's ``W_r x`` when already computed (folded into the A GEMM), else computed here.
        """
        if logits is None:
            logits = self.proj(x.to(self.proj.weight.dtype))
        probs = torch.softmax(logits.float(), dim=-1)
        if self.top_k is None:
            weights, chosen = probs, torch.ones_like(probs)
        else:
            weights, chosen = top_k_weights(probs, self.top_k)
        if self.balance and self.training:
            context.aux_losses["balance"].append(balance_loss(probs, chosen, token_mask(x, context)))
        return weights

    def route(self, x: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        return expert_gates(self.expert_weights(x, context), self.rank).to(x.dtype)

    def mix(self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor) -> torch.Tensor:
        return weighted(*self.mix_factors(hidden, x, context, lora_A))

    def mix_factors(
        self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, logits = self.split_scores(hidden, x)
        return self.expert_components(hidden), self.expert_weights(x, context, logits).to(x.dtype)

    def expert_components(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each expert's r components of ``hidden`` [..., K_A]: [..., E, r] ([..., 1, r] when all share A's rows)."""
        if self.shared_rows:
            return hidden.unsqueeze(-2)
        if self.pairing is not None:
            return hidden[..., self.pairing].view(*hidden.shape[:-1], -1, self.rank)
        return hidden.view(*hidden.shape[:-1], -1, self.rank)
