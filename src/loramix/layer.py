"""The adapted layer: a frozen linear map plus a mixed low-rank delta over factor banks.

``h = W0 x + s · B · mix(A · dropout(x))``: A (K_A × d_in) stacks every expert's down-projection rows, B
(d_out × K_B) every expert's up-projection columns, and the method's mixer (:mod:`loramix.mixers`) maps the
K_A down-projected components to the K_B components B projects up (for most methods a gate on each
component). Two GEMMs and the mixer's small work, whatever the number of experts. When the mixer depends on
the task alone, task t's delta is the fixed matrix ``s · B · M_t · A``, which merges or exports as a LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramix.config import ConfigError, MixtureConfig
from loramix.context import ContextHolder, RoutingContext
from loramix.methods.base import Method
from loramix.mixers import weighted

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored d_in × d_out)."""
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and transformers' Conv1D are supported")


def _init_down(bank: torch.Tensor, init: str, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initialise A rows in place: normal with std 1/r for ``"gaussian"``, else Kaiming-uniform; returns ``bank``."""
    if init == "gaussian":
        return nn.init.normal_(bank, std=1.0 / rank, generator=generator)
    return nn.init.kaiming_uniform_(bank, a=math.sqrt(5), generator=generator)


class MixtureLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` with a mixture of low-rank experts on top.

    The method's mixer is ``self.router`` (the name saved adapters and parameter patterns use). With
    block-diagonal banks (``Method.bank_blocks`` n > 1, MELoRA) the layer stores only the diagonal blocks:
    ``lora_A`` is [K_A, d_in / n] and ``lora_B`` [d_out / n, K_B]; :meth:`dense_banks` expands them.

    Args:
        base_layer: the layer to adapt; it is kept (frozen) as ``self.base_layer``.
        config: the mixture's settings.
        method: the method class that sizes the banks and builds the mixer.
        holder: where the model puts the routing context of the call in progress.
        name: the layer's module name in the model (used for records and routing caches).

    Raises:
        ConfigError: the method's bank blocks do not divide the layer's dimensions.

    Attributes:
        factored_up_projection: where the mixer gives its mix as factors (token routers), weigh and project up
            in one autograd function that keeps no [tokens, K_B] weighted copy for the backward (True, the
            default); False uses native ops, keeping the copy but fewer Python-level calls per step (set it on
            the class or a layer to compare where per-op overhead rules, as ``benchmarks/e2e_bench.py`` does).
    """

    factored_up_projection: bool = True

    def __init__(
        self, base_layer: nn.Module, config: MixtureConfig, method: type[Method], holder: ContextHolder, name: str
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_dims(base_layer)
        self.blocks = method.bank_blocks(config)
        if self.in_features % self.blocks or self.out_features % self.blocks:
            raise ConfigError(
                f"method {config.method!r} splits layer {name} ({self.in_features} -> {self.out_features}) into "
                f"{self.blocks} diagonal blocks, which must divide both sizes (change num_experts or target_modules)"
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.layer_name = name
        self.holder = holder
        self.scale = method.scale(config)
        k_a, k_b = method.bank_sizes(config)
        weight = base_layer.weight
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(k_a, self.in_features // self.blocks, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features // self.blocks, k_b, **factory))
        self.router = method.make_mixer(config, self.in_features, self.out_features).to(weight.device)
        self.router.layer_name = name
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.merged_task: int | None = None
        self.reset_lora_parameters(config.init_lora_weights, config.r)

    def reset_lora_parameters(self, init: str, rank: int) -> None:
        """A Kaiming-uniform (or normal, std 1/r) and B zero, so the delta starts at zero; then the mixer's
        own initialisation of the banks, if its method has one."""
        with torch.no_grad():
            _init_down(self.lora_A, init, rank)
            self.lora_B.zero_()
            self.router.init_banks(self.lora_A, self.lora_B)

    @torch.no_grad()
    def grow_experts(
        self, count: int, rank: int, init: str = "kaiming", generator: torch.Generator | None = None
    ) -> None:
        """Append ``count`` experts of rank ``rank``: ``count * rank`` rows to A, as many columns to B.

        New A rows are initialised as at creation (Kaiming-uniform, or normal with std 1/r for
        ``"gaussian"``), new B columns are zero, so the layer's output for the earlier experts does not
        change; earlier rows and columns are copied bit for bit. Dtype, device and ``requires_grad`` are
        kept. The mixer grows with them (its ``grow_experts(count)``).

        Raises:
            TypeError: the method's mixer cannot grow, or the banks are block-diagonal (checked first;
                nothing changes).
            ValueError: ``count`` or ``rank`` is not a positive integer.
        """
        grow = getattr(self.router, "grow_experts", None)
        if grow is None:
            raise TypeError(f"layer {self.layer_name}: {type(self.router).__name__} cannot grow experts")
        if self.blocks > 1:
            raise TypeError(f"layer {self.layer_name}: block-diagonal banks cannot grow experts")
        for name, value in (("count", count), ("rank", rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"grow_experts: {name}={value!r} is invalid: expected an integer >= 1")
        old_a, old_b = self.lora_A, self.lora_B
        new_a = _init_down(torch.empty(count * rank, self.in_features), init, rank, generator)
        new_b = torch.zeros(self.out_features, count * rank, dtype=old_b.dtype, device=old_b.device)
        self.lora_A = nn.Parameter(torch.cat([old_a, new_a.to(old_a)]), requires_grad=old_a.requires_grad)
        self.lora_B = nn.Parameter(torch.cat([old_b, new_b], dim=1), requires_grad=old_b.requires_grad)
        grow(count)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models such as T5 read ``layer.weight`` for its dtype)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    @property
    def mergeable(self) -> bool:
        """The mixer depends on the task alone, so a task merges into the base weights or exports as a LoRA."""
        return self.router.mergeable

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + s · B mix(A dropout(x))`` for x of shape [batch, ..., d_in]."""
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
        dropped = self.dropout(x).to(self.lora_A.dtype)
        if self.blocks > 1:
            hidden = self.router.mix(self._down_blocks(dropped), x, routing, self.lora_A)
            return result + (self._up_blocks(hidden) * self.scale).to(result.dtype)
        projected = self.router.project(dropped, x, self.lora_A)
        factors = self.router.mix_factors(projected, x, routing, self.lora_A) if self.factored_up_projection else None
        if factors is None:
            hidden = self.router.mix(projected, x, routing, self.lora_A)
        elif torch.promote_types(factors[0].dtype, factors[1].dtype) == result.dtype:
            return WeightedUpProjection.apply(result, *factors, self.lora_B, self.scale)
        else:
            hidden = weighted(*factors)
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

    def _down_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Block-diagonal ``A x``: block i of A (K_A / n rows) reads input slice i. [..., d_in] -> [..., K_A]."""
        blocks = self.lora_A.view(self.blocks, -1, self.lora_A.shape[1])
        slices = x.reshape(*x.shape[:-1], self.blocks, -1)
        return torch.einsum("...nd,nrd->...nr", slices, blocks).flatten(-2)

    def _up_blocks(self, hidden: torch.Tensor) -> torch.Tensor:
        """Block-diagonal ``B h``: block i of B (K_B / n columns) writes output slice i. [..., K_B] -> [..., d_out]."""
        blocks = self.lora_B.view(self.lora_B.shape[0], self.blocks, -1)
        per_block = hidden.reshape(*hidden.shape[:-1], self.blocks, -1)
        return torch.einsum("...nr,onr->...no", per_block, blocks).flatten(-2)

    def dense_banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The banks as dense matrices (A [K_A, d_in], B [d_out, K_B]), expanding block-diagonal ones."""
        if self.blocks == 1:
            return self.lora_A, self.lora_B
        factor_a = torch.block_diag(*self.lora_A.view(self.blocks, -1, self.lora_A.shape[1]))
        factor_b = torch.block_diag(*self.lora_B.view(self.lora_B.shape[0], self.blocks, -1).unbind(1))
        return factor_a, factor_b

    def task_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain LoRA factors of one task with the scale folded into B: (A_t [r_t, d_in], B_t [d_out, r_t]).

        ``A_t = M_t A`` and ``B_t = s · B``, restricted to the B columns the task uses (a non-zero row of the
        mixer's task matrix M_t), so ``B_t @ A_t == delta_weight(task)``.

        Raises:
            TypeError: the method's mixer routes on the input (not mergeable).
        """
        factor_a, factor_b = self.dense_banks()
        matrix = self.router.task_matrix(task).to(factor_b)
        keep = matrix.abs().sum(1).nonzero().flatten()
        return matrix[keep] @ factor_a, factor_b[:, keep] * self.scale

    def delta_weight(self, task: int) -> torch.Tensor:
        """The fixed weight change of one task, ``s · B M_t A``, FloatTensor[d_out, d_in].

        Raises:
            TypeError: the method's mixer routes on the input (not mergeable).
        """
        factor_a, factor_b = self.task_factors(task)
        return factor_b @ factor_a

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
        return (
            f"in={self.in_features}, out={self.out_features}, K_A={self.lora_A.shape[0]}, K_B={self.lora_B.shape[1]}"
            + (f", blocks={self.blocks}" if self.blocks > 1 else "")
        )


class WeightedUpProjection(torch.autograd.Function):
    """``result + s · weighted(components, weights) Bᵀ`` in one addmm, keeping no weighted copy for the backward.

    Autograd would keep the weighted components (the addmm's input, a K_B-wide tensor per token) besides
    the components and weights the weighting itself keeps; here the weighting is redone in the backward,
    one elementwise product, for B's gradient. Shapes: result [..., d_out], components [..., G, c] (may
    broadcast over G), weights [..., G], B [d_out, G·c]. The backward computes in the gradient's dtype
    (bf16 under autocast, as autograd would) and returns each gradient in its input's dtype.
    """

    @staticmethod
    def forward(  # noqa: ANN001
        ctx, result: torch.Tensor, components: torch.Tensor, weights: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        ctx.save_for_backward(components, weights, lora_B)
        ctx.scale = scale
        hidden = weighted(components, weights)
        flat = torch.addmm(
            result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), lora_B.t(), alpha=scale
        )
        return flat.view(result.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        components, weights, lora_B = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_result = grad_components = grad_weights = grad_b = None
        if needs[0]:
            grad_result = grad
        flat_grad = grad.reshape(-1, grad.shape[-1])
        if needs[1] or needs[2]:
            # d loss / d weighted(components, weights), as [..., G, c]
            grad_hidden = (flat_grad @ lora_B.to(grad.dtype)).mul_(ctx.scale).view(*weights.shape, -1)
            if needs[1]:
                grad_components = grad_hidden * weights.to(grad.dtype).unsqueeze(-1)
                grad_components = grad_components.sum_to_size(components.shape).to(components.dtype)
            if needs[2]:
                grad_weights = (grad_hidden * components.to(grad.dtype)).sum(-1).to(weights.dtype)
        if needs[3]:
            hidden = weighted(components.to(grad.dtype), weights.to(grad.dtype))
            grad_b = (flat_grad.t() @ hidden.reshape(-1, hidden.shape[-1])).mul_(ctx.scale).to(lora_B.dtype)
        return grad_result, grad_components, grad_weights, grad_b, None
