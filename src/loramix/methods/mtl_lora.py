"""``mtl_lora``: MTL-LoRA (arXiv 2410.09437; from its code).

``h = W0 x + (alpha / r) · [Σ_j softmax(w_t / τ)_j B_j] Λ_t A x``: one shared A (r × d_in, Kaiming), n
shared up-projections B_j (zero at start), and per task t a learned r × r matrix Λ_t (identity at start)
and mixing logits w_t over the B_j (τ = ``method_options["temperature"]``, default 0.1; n = ``num_experts``,
MTL-LoRA's default 3). ``method_options["diagonal"]: true`` keeps Λ_t diagonal.

In bank form: the A bank has r rows, the router's :meth:`transform` applies Λ_t to ``A x`` row by row,
the B bank holds the n B_j side by side (column ``j·r + q`` pairs with row q), and the gate repeats
``softmax(w_t / τ)_j`` over B_j's r columns. Everything depends on the task alone, so a task merges, and
exports as a rank-n·r PEFT LoRA whose A is ``Λ_t A`` repeated per B_j.
"""

from __future__ import annotations

import torch
from torch import nn

from loramix.config import MixtureConfig, check_option, is_number
from loramix.context import RoutingContext
from loramix.methods.base import SharedDownProjection, register_method
from loramix.routers import Router

OPTIONS = ("temperature", "diagonal")


class TaskTransformRouter(Router):
    """Per-task r × r transform of ``A x`` and per-task softmax weights over n up-projections."""

    def __init__(self, num_tasks: int, rank: int, num_up: int, temperature: float, diagonal: bool) -> None:
        super().__init__(rank * num_up)
        self.rank = rank
        self.temperature = temperature
        self.diagonal = diagonal
        if diagonal:
            self.task_scale = nn.Parameter(torch.ones(num_tasks, rank))
        else:
            self.task_transform = nn.Parameter(torch.eye(rank).repeat(num_tasks, 1, 1))
        self.task_logits = nn.Parameter(torch.zeros(num_tasks, num_up))

    def _matrices(self, tasks: torch.Tensor) -> torch.Tensor:
        if self.diagonal:
            return torch.diag_embed(self.task_scale[tasks])
        return self.task_transform[tasks]

    def forward(self, x: torch.Tensor, context: RoutingContext, layer_name: str) -> torch.Tensor:
        tasks = context.task_ids_for(x.shape[0])
        weights = torch.softmax(self.task_logits[tasks] / self.temperature, dim=-1)
        return weights.repeat_interleave(self.rank, dim=-1).to(x.dtype)

    def transform(
        self, hidden: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, context: RoutingContext
    ) -> torch.Tensor:
        tasks = context.task_ids_for(hidden.shape[0])
        matrices = self._matrices(tasks).to(hidden.dtype)  # [batch, r, r]
        flat = hidden.reshape(hidden.shape[0], -1, self.rank)
        return torch.bmm(flat, matrices.transpose(1, 2)).reshape(hidden.shape)

    def transform_task_A(self, lora_A: torch.Tensor, task: int) -> torch.Tensor:
        device = lora_A.device
        return self._matrices(torch.tensor([task], device=device))[0].to(lora_A) @ lora_A

    def task_gate(self, task: int) -> torch.Tensor:
        weights = torch.softmax(self.task_logits[task] / self.temperature, dim=-1)
        return weights.repeat_interleave(self.rank)


@register_method
class MTLLoRA(SharedDownProjection):
    """MTL-LoRA: shared A, per-task r × r transform, task-weighted mix of n shared B."""

    name = "mtl_lora"
    options = OPTIONS

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        super().validate(config)
        temperature = config.method_options.get("temperature", 0.1)
        check_option(cls.name, "temperature", temperature, is_number(temperature) and temperature > 0, "a number > 0")
        diagonal = config.method_options.get("diagonal", False)
        check_option(cls.name, "diagonal", diagonal, isinstance(diagonal, bool), "true or false (a boolean)")

    @classmethod
    def make_router(cls, config: MixtureConfig, in_features: int, out_features: int) -> Router:
        options = config.method_options
        return TaskTransformRouter(
            config.num_tasks,
            config.r,
            config.num_experts,
            float(options.get("temperature", 0.1)),
            bool(options.get("diagonal", False)),
        )
