"""``mtl_lora``: MTL-LoRA (arXiv 2410.09437; from its code).

``h = W0 x + (alpha / r) · [Σ_j softmax(w_t / τ)_j B_j] Λ_t A x``: one shared A (r × d_in, Kaiming), n
shared up-projections B_j (zero at start), and per task t a learned r × r matrix Λ_t (identity at start)
and mixing logits w_t over the B_j (τ = ``method_options["temperature"]``, default 0.1; n = ``num_experts``,
MTL-LoRA's default 3). ``method_options["diagonal"]: true`` keeps Λ_t diagonal.

In bank form: the A bank has r rows and the B bank holds the n B_j side by side; the mixer applies Λ_t to
``A x`` and feeds the result to every B_j weighted by ``softmax(w_t / τ)_j``, so its task matrix is
``M_t = [w_1 Λ_t; …; w_n Λ_t]`` (n·r × r). Everything depends on the task alone, so a task merges, and
exports as a rank-n·r PEFT LoRA whose A is ``M_t A``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from loramix.context import RoutingContext
from loramix.gating import expert_gates
from loramix.methods.base import SharedDownProjection, register_method
from loramix.methods.options import MethodOptions, option
from loramix.mixers import Mixer

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


@dataclass(frozen=True)
class MTLLoRAOptions(MethodOptions):
    """MTL-LoRA's ``method_options``: τ of the mixing softmax, and a diagonal Λ_t."""

    temperature: float = option(0.1, above=0)
    diagonal: bool = False


class TaskTransformMixer(Mixer):
    """Per-task r × r transform of ``A x``, fed to n up-projections with per-task softmax weights."""

    def __init__(self, num_tasks: int, rank: int, num_up: int, temperature: float, diagonal: bool) -> None:
        super().__init__(rank, rank * num_up)
        self.rank = rank
        self.num_up = num_up
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

    def _gates(self, tasks: torch.Tensor) -> torch.Tensor:
        """Weights of the n·r B columns, FloatTensor[batch, n * r]: ``softmax(w_t / τ)_j`` over B_j's columns."""
        return expert_gates(torch.softmax(self.task_logits[tasks] / self.temperature, dim=-1), self.rank)

    def mix(self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor) -> torch.Tensor:
        tasks = context.task_ids_for(hidden.shape[0])
        matrices = self._matrices(tasks).to(hidden.dtype)  # [batch, r, r]
        flat = hidden.reshape(hidden.shape[0], -1, self.rank)
        transformed = torch.bmm(flat, matrices.transpose(1, 2))  # [batch, tokens, r]
        gates = self._gates(tasks).to(hidden.dtype)[:, None, :]
        mixed = transformed.repeat(1, 1, self.num_up) * gates
        return mixed.reshape(*hidden.shape[:-1], self.bank_b)

    def task_matrix(self, task: int) -> torch.Tensor:
        tasks = torch.tensor([task], device=self.task_logits.device)
        return self._gates(tasks)[0, :, None] * self._matrices(tasks)[0].repeat(self.num_up, 1)

    def task_gate(self, task: int) -> torch.Tensor:
        return self._gates(torch.tensor([task], device=self.task_logits.device))[0]


@register_method
class MTLLoRA(SharedDownProjection):
    """MTL-LoRA: shared A, per-task r × r transform, task-weighted mix of n shared B."""

    name = "mtl_lora"
    Options = MTLLoRAOptions

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        options = cls.options(config)
        return TaskTransformMixer(config.num_tasks, config.r, config.num_experts, options.temperature, options.diagonal)
