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

    def transform(
        self, hidden: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, context: RoutingContext
    ) -> torch.Tensor:
        """Map the down-projection ``hidden = A x`` (FloatTensor[batch, ..., K_A]) before ``a_index`` and the gate.

        Identity by default. A method whose mixer is not diagonal overrides it: MTL-LoRA's per-task r × r
        matrix, MALoRA's per-expert projections, conditional MixLoRA's factor selection (which reads the
        layer input ``x`` and the A bank ``lora_A``). A task-only router that overrides it also overrides
        :meth:`transform_task_A`.
        """
        return hidden

    def transform_task_A(self, lora_A: torch.Tensor, task: int) -> torch.Tensor:
        """The A bank as task ``task`` sees it after :meth:`transform`, FloatTensor[K_A, d_in]."""
        return lora_A

    def reset_banks(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Re-initialise the banks in place after the default init (MALoRA's SVD init); nothing by default."""

    def step_end(self) -> None:
        """Called by ``MixtureModel.step_end()`` after each optimizer step (e.g. SMoRA's bias update)."""


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


def token_mask(x: torch.Tensor, context: RoutingContext) -> torch.Tensor | None:
    """BoolTensor of x's leading shape marking real (non-pad) tokens, or ``None`` when unknown."""
    if x.dim() != 3:
        return None
    mask = context.mask_for(x.shape[0], x.shape[1])
    return None if mask is None else mask.bool()


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-style load-balancing loss ``E · Σ_e f_e · P_e`` over real tokens.

    Args:
        probs: FloatTensor[..., E], router probabilities.
        chosen: FloatTensor[..., E], 1 where a token is sent to an expert (k ones per token).
        mask: BoolTensor of the leading shape, or ``None`` for all tokens.

    Returns:
        A scalar; 1.0 when routing is perfectly uniform.
    """
    num_experts = probs.shape[-1]
    probs, chosen = probs.reshape(-1, num_experts), chosen.reshape(-1, num_experts)
    if mask is not None:
        keep = mask.reshape(-1)
        probs, chosen = probs[keep], chosen[keep]
    fraction = chosen.sum(0) / chosen.sum().clamp(min=1.0)
    return num_experts * (fraction * probs.mean(0)).sum()


class TokenSoftmaxRouter(Router):
    """Per-token softmax over E experts (each r components), optionally top-k with renormalised weights.

    Used by HydraLoRA (dense) and MixLoRA (top-k with a load-balancing loss in ``aux_losses["balance"]``).

    Args:
        in_features: d_in of the layer (the router reads the layer input).
        num_experts: E.
        rank: r, components per expert.
        top_k: experts kept per token (``None``: all, dense).
        balance: add the load-balancing loss in training.
    """

    task_only = False
    needs_task_ids = False

    def __init__(self, in_features: int, num_experts: int, rank: int, top_k: int | None, balance: bool) -> None:
        super().__init__(num_experts * rank)
        self.rank = rank
        self.top_k = top_k if top_k is not None and top_k < num_experts else None
        self.balance = balance
        self.proj = nn.Linear(in_features, num_experts, bias=False)

    def forward(self, x: torch.Tensor, context: RoutingContext, layer_name: str) -> torch.Tensor:
        probs = torch.softmax(self.proj(x.to(self.proj.weight.dtype)).float(), dim=-1)
        if self.top_k is None:
            weights, chosen = probs, torch.ones_like(probs)
        else:
            top_values, top_index = probs.topk(self.top_k, dim=-1)
            weights = torch.zeros_like(probs).scatter(-1, top_index, top_values / top_values.sum(-1, keepdim=True))
            chosen = torch.zeros_like(probs).scatter(-1, top_index, 1.0)
        if self.balance and self.training:
            context.aux_losses["balance"].append(balance_loss(probs, chosen, token_mask(x, context)))
        return weights.repeat_interleave(self.rank, dim=-1).to(x.dtype)
