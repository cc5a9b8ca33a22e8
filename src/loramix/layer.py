"""The adapted layer: a frozen linear map plus a routed low-rank delta over factor banks.

``h = W0 x + s · B · diag(g) · A x``: A (K_A × d_in) stacks every expert's down-projection rows, B
(d_out × K_B) every expert's up-projection columns, and the router's gate g weighs the K_B components.
Two GEMMs and one element-wise product, whatever the number of experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramix.config import MixtureConfig
from loramix.context import ContextHolder, RoutingContext
from loramix.methods.base import Method

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored d_in × d_out)."""
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and transformers' Conv1D are supported")


class MixtureLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` with a mixture of low-rank experts on top.

    Args:
        base_layer: the layer to adapt; it is kept (frozen) as ``self.base_layer``.
        config: the mixture's settings.
        method: the method class that sizes the banks and builds the router.
        holder: where the model puts the routing context of the call in progress.
        name: the layer's module name in the model (used for records and routing caches).
    """

    def __init__(
        self, base_layer: nn.Module, config: MixtureConfig, method: type[Method], holder: ContextHolder, name: str
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_dims(base_layer)
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.layer_name = name
        self.holder = holder
        self.scale = method.scale(config)
        k_a, k_b = method.bank_sizes(config)
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(k_a, self.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, k_b, dtype=weight.dtype, device=weight.device))
        a_index = method.a_index(config)
        self.register_buffer("a_index", a_index, persistent=False)
        self.router = method.make_router(config, self.in_features, self.out_features).to(weight.device)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.merged_task: int | None = None
        self.reset_lora_parameters(config.init_lora_weights, config.r)

    def reset_lora_parameters(self, init: str, rank: int) -> None:
        """A Kaiming-uniform (or normal, std 1/r) and B zero, so the delta starts at zero; then the router's
        own initialisation of the banks, if its method has one."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()
            self.router.reset_banks(self.lora_A, self.lora_B)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models such as T5 read ``layer.weight`` for its dtype)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def paired_A(self, task: int | None = None) -> torch.Tensor:
        """The A rows paired with each B column, FloatTensor[K_B, d_in] (after a task's transform, if any)."""
        factor_a = self.lora_A if task is None else self.router.transform_task_A(self.lora_A, task)
        return factor_a if self.a_index is None else factor_a[self.a_index]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + s · B diag(g) A dropout(x)`` for x of shape [batch, ..., d_in]."""
        result = self.base_layer(x, *args, **kwargs)
        context = self.holder.current
        if self.merged_task is not None:
            if (
                context is not None
                and context.task_ids is not None
                and bool((context.task_ids != self.merged_task).any())
            ):
                raise RuntimeError(
                    f"layer {self.layer_name} has task {self.merged_task} merged; unmerge before serving other tasks"
                )
            return result
        routing = context if context is not None else RoutingContext()
        gate = self.router(x, routing, self.layer_name)
        dropped = self.dropout(x).to(self.lora_A.dtype)
        hidden = self.router.transform(F.linear(dropped, self.lora_A), x, self.lora_A, routing)
        if self.a_index is not None:
            hidden = hidden[..., self.a_index]
        if gate is not None:
            if gate.dim() == 2 and hidden.dim() > 2:
                gate = gate.view(gate.shape[0], *([1] * (hidden.dim() - 2)), gate.shape[-1])
            hidden = hidden * gate
        if hidden.dtype != result.dtype:
            return result + (F.linear(hidden, self.lora_B) * self.scale).to(result.dtype)
        # result + s · hidden Bᵀ in one GEMM: the scale and the residual add ride on addmm's alpha and beta
        flat = torch.addmm(
            result.reshape(-1, self.out_features),
            hidden.reshape(-1, hidden.shape[-1]),
            self.lora_B.t(),
            alpha=self.scale,
        )
        return flat.view(result.shape)

    def delta_weight(self, task: int) -> torch.Tensor:
        """The fixed weight change of one task, ``s · B diag(g_t) A``, FloatTensor[d_out, d_in].

        Raises:
            TypeError: the method's gate does not depend on the task alone.
        """
        gate = self.router.task_gate(task).to(self.lora_B)
        return (self.lora_B * (gate * self.scale)) @ self.paired_A(task)

    def task_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain LoRA factors of one task with the scale folded into B: (A_t [r_t, d_in], B_t [d_out, r_t]).

        Only components with a non-zero gate are kept, so ``B_t @ A_t == delta_weight(task)``.
        """
        gate = self.router.task_gate(task).to(self.lora_B)
        keep = gate.nonzero().flatten()
        return self.paired_A(task)[keep], self.lora_B[:, keep] * (gate[keep] * self.scale)

    def _add_to_base(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        weight.data += (delta.T if self.fan_in_fan_out else delta).to(weight.dtype)

    @torch.no_grad()
    def merge(self, task: int) -> None:
        """Fold task ``task``'s delta into the base weight (in place); the forward then costs the base's."""
        if self.merged_task is not None:
            raise RuntimeError(f"layer {self.layer_name} already has task {self.merged_task} merged")
        self._add_to_base(self.delta_weight(task))
        self.merged_task = task

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if self.merged_task is None:
            return
        self._add_to_base(-self.delta_weight(self.merged_task))
        self.merged_task = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, K_A={self.lora_A.shape[0]}, K_B={self.lora_B.shape[1]}"
