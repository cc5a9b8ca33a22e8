"""Routers: each computes the mixer gate ``g`` of an adapted layer for the current call.

A router returns the gate over the K rank components of the layer's B bank (``M = diag(g)``):
a FloatTensor[batch, K] when it decides per sequence or per task, or a tensor of the input's leading shape
plus K (``[batch, seq, K]``) when it decides per token. Auxiliary losses go into the routing context.
Routers whose gate depends on the task alone set ``task_only = True`` and implement
:meth:`Router.task_gate`, which is what lets a task merge into the base weights.
"""

from __future__ import annotations

import torch
from torch import nn

from loramix.context import RoutingContext


class Router(nn.Module):
    """Base class of routers.

    Attributes:
        task_only: the gate is a function of the task id alone (mergeable, exportable per task).
        needs_task_ids: calls must pass ``task_ids``.
    """

    task_only: bool = True
    needs_task_ids: bool = True

    def __init__(self, num_components: int) -> None:
        super().__init__()
        self.num_components = num_components

    def forward(self, x: torch.Tensor, context: RoutingContext, layer_name: str) -> torch.Tensor | None:
        """Gate for input ``x`` (shape [batch, ..., d_in]); ``None`` means all ones."""
        raise NotImplementedError

    def task_gate(self, task: int) -> torch.Tensor:
        """The gate of one task, FloatTensor[K]; only for routers with ``task_only``."""
        raise TypeError(f"{type(self).__name__} routes on the input, not on the task alone")


class ConstantRouter(Router):
    """Every component always on: a plain LoRA shared by all tasks."""

    needs_task_ids = False

    def forward(self, x: torch.Tensor, context: RoutingContext, layer_name: str) -> None:
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

    def expert_gates(self, experts: torch.Tensor) -> torch.Tensor:
        """One-hot gates over components for LongTensor[batch] of experts -> FloatTensor[batch, E*r]."""
        onehot = nn.functional.one_hot(experts, self.num_experts).float()
        return onehot.repeat_interleave(self.rank, dim=-1)

    def forward(self, x: torch.Tensor, context: RoutingContext, layer_name: str) -> torch.Tensor:
        tasks = context.task_ids_for(x.shape[0])
        return self.expert_gates(self.expert_of_task[tasks]).to(x.dtype)

    def task_gate(self, task: int) -> torch.Tensor:
        return self.expert_gates(self.expert_of_task[task : task + 1])[0]


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

    def forward(self, x: torch.Tensor, context: RoutingContext, layer_name: str) -> torch.Tensor:
        tasks = context.task_ids_for(x.shape[0])
        return self.expert_weights(tasks).repeat_interleave(self.rank, dim=-1).to(x.dtype)

    def task_gate(self, task: int) -> torch.Tensor:
        device = self.task_embedding.weight.device
        weights = self.expert_weights(torch.tensor([task], device=device))[0]
        return weights.repeat_interleave(self.rank)
