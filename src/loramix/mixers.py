"""The mixer: the one place where a method's adapted layer differs from a plain LoRA.

Every adapted layer computes ``h = W0 x + s · B · mix(A · dropout(x))``. The banks A (K_A × d_in) and
B (d_out × K_B) and the scale s belong to the layer; everything method-specific belongs to its mixer:

- :meth:`Mixer.mix` maps the down-projection ``A x`` (FloatTensor[..., K_A]) to the B bank's components
  (FloatTensor[..., K_B]), reading the layer input, the routing context or the A bank itself when it
  needs them;
- :meth:`Mixer.project` computes that down-projection for the layer; mixers that score the layer input
  with a linear map of their own (token routers) stack it under A there, so one GEMM reads the input for
  both, and ``mix`` then receives [..., K_A + scores] and splits it (:meth:`Mixer.split_scores`);
- :meth:`Mixer.task_matrix` is the K_B × K_A matrix M_t that ``mix`` applies for task t when it depends on
  the task alone (``mergeable``): the layer's ``delta_weight``, ``merge`` and ``task_factors`` read nothing
  else. Mixers routed on the input are not mergeable and refuse it.

Most methods mix by a diagonal ``M = diag(g)`` after pairing each B column with an A row: such a mixer is a
:class:`Router`, and only computes the gate g (:meth:`Router.route`). Token routers also give their mix as
factors (:meth:`Mixer.mix_factors`: per-token weights and the components they weigh), so the layer can
weigh and project up in one step that keeps no weighted copy for the backward (:func:`weighted`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loramix.context import RoutingContext


class Mixer(nn.Module):
    """Base class of mixers.

    Args:
        bank_a: K_A, the rows of the layer's A bank.
        bank_b: K_B, the columns of the layer's B bank.

    Attributes:
        mergeable: ``mix`` depends on the task alone, so :meth:`task_matrix` is defined and a task merges
            into the base weights or exports as a plain LoRA.
        needs_task_ids: calls must pass ``task_ids``.
        layer_name: the adapted layer's module name, set by the layer (for records and routing caches).
    """

    mergeable: bool = True
    needs_task_ids: bool = True

    def __init__(self, bank_a: int, bank_b: int) -> None:
        super().__init__()
        self.bank_a = bank_a
        self.bank_b = bank_b
        self.layer_name = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "mix" in cls.__dict__ and "mix_factors" not in cls.__dict__:
            cls.mix_factors = Mixer.mix_factors  # a mix of its own is not the weighting an ancestor factored

    def mix(self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor) -> torch.Tensor:
        """The middle of the delta.

        Args:
            hidden: FloatTensor[batch, ..., K_A], the down-projection ``A dropout(x)``, as :meth:`project`
                returned it (with the scorer's outputs after the K_A columns where it folded them in).
            x: FloatTensor[batch, ..., d_in], the layer input (for routing on the input).
            context: the call's routing context (task ids, attention mask, losses, records).
            lora_A: the layer's A bank (for mixers that score its factors: conditional MixLoRA).

        Returns:
            FloatTensor[batch, ..., K_B], what the B bank projects up.
        """
        raise NotImplementedError

    def scorer(self) -> nn.Linear | None:
        """The bias-free linear map that scores the layer input for routing (``None``: the mixer has none).

        :meth:`project` folds it into the A GEMM; :meth:`split_scores` gives its output back to ``mix``.
        """
        return None

    def mix_factors(
        self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`mix` as factors, ``(components [..., G, c], weights [..., G])`` with ``mix`` equal to
        ``weighted(components, weights)`` (G groups of c components, G·c = K_B; components may broadcast
        over G), or ``None`` where the mix is not such a weighting (the default). Same arguments and side
        effects as :meth:`mix` (auxiliary losses, records): a caller calls one of the two, once.

        A subclass that overrides :meth:`mix` without this method gets the default back.
        """
        return None

    def project(self, dropped: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        """What the layer passes to :meth:`mix` as ``hidden``: ``A dropout(x)``, FloatTensor[..., K_A].

        When the mixer has a :meth:`scorer` that reads the same tensor (no dropout applied, same dtype as the
        A bank), its weight is stacked under A and one GEMM returns [..., K_A + scores]: the input is read
        once forward and once per backward product instead of twice, and the scorer's skinny GEMMs go.
        """
        scorer = self.scorer()
        if scorer is None or dropped is not x or scorer.weight.dtype != lora_A.dtype:
            return F.linear(dropped, lora_A)
        return StackedProjection.apply(x, lora_A, scorer.weight)

    def split_scores(self, hidden: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``A dropout(x)`` [..., K_A], the scorer's output [..., S]) from what :meth:`project` returned.

        A ``hidden`` of width K_A (the scorer was not folded in, or a caller passed ``A x`` itself) gets its
        scores from the scorer here, on ``x`` cast to the scorer's dtype.
        """
        scorer = self.scorer()
        if hidden.shape[-1] == self.bank_a:
            return hidden, scorer(x.to(scorer.weight.dtype))
        return hidden[..., : self.bank_a], hidden[..., self.bank_a :]

    def task_matrix(self, task: int) -> torch.Tensor:
        """M_t, FloatTensor[K_B, K_A]: ``mix(hidden) == hidden @ M_tᵀ`` for every row of task ``task``.

        Raises:
            TypeError: the mixer routes on the input (not ``mergeable``).
        """
        raise self.not_mergeable()

    def task_gate(self, task: int) -> torch.Tensor:
        """The weight of each B column for task ``task``, FloatTensor[K_B] (for reports of the routing).

        Raises:
            TypeError: the mixer routes on the input (not ``mergeable``).
        """
        raise self.not_mergeable()

    def not_mergeable(self) -> TypeError:
        """The error raised when a task's fixed matrix is asked of a mixer routed on the input."""
        return TypeError(f"{type(self).__name__} routes on the input, so a task has no fixed weights")

    def init_banks(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Re-initialise the banks in place after the layer's default init (A Kaiming, B zero); nothing here."""

    def step_end(self) -> None:
        """Called by ``MixtureModel.step_end()`` after each optimizer step (e.g. SMoRA's bias update)."""


def weighted(components: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``components [..., G, c]`` times ``weights [..., G]``, flattened to [..., G·c]: a factored mix."""
    return (components * weights.unsqueeze(-1)).flatten(-2)


class StackedProjection(torch.autograd.Function):
    """``x @ [A; W]ᵀ`` in one GEMM, keeping A and W (the parameters) for the backward, not their stack.

    ``F.linear(x, torch.cat([A, W]))`` would keep the stacked copy alive until the backward, one more
    K_A + S by d_in tensor per adapted layer; here the stack is a temporary of the forward and rebuilt in the
    backward for the input's gradient. The backward computes in the gradient's dtype (bf16 under autocast,
    as autograd would) and returns each gradient in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bank: torch.Tensor, scorer: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, bank, scorer)
        return F.linear(x, torch.cat([bank, scorer]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, bank, scorer = ctx.saved_tensors
        grad_x = grad_bank = grad_scorer = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ torch.cat([bank, scorer]).to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            stacked = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(grad.dtype)
            rows = bank.shape[0]
            grad_bank = stacked[:rows].to(bank.dtype) if ctx.needs_input_grad[1] else None
            grad_scorer = stacked[rows:].to(scorer.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_bank, grad_scorer


class Router(Mixer):
    """A diagonal mixer, ``M = diag(g) · P``: P pairs each B column with one A row, g weighs the columns.

    Subclasses compute the gate g in :meth:`route`; mergeable ones give a task's gate in :meth:`task_gate`.

    Args:
        num_components: K_B, the columns of the layer's B bank (the gate's width).
        pairing: LongTensor[K_B], the A row each B column pairs with (shared down-projections: HydraLoRA,
            MoDE), or ``None`` when K_A == K_B and column j pairs with row j.
    """

    def __init__(self, num_components: int, pairing: torch.Tensor | None = None) -> None:
        bank_a = num_components if pairing is None else int(pairing.max()) + 1
        super().__init__(bank_a, num_components)
        self.num_components = num_components
        self.register_buffer("pairing", None if pairing is None else pairing.long(), persistent=False)

    def route(self, x: torch.Tensor, context: RoutingContext) -> torch.Tensor | None:
        """The gate for input ``x`` of shape [batch, ..., d_in].

        Returns:
            FloatTensor[batch, K_B] (one gate per sequence), FloatTensor[batch, ..., K_B] (per token), or
            ``None`` for all ones.
        """
        raise NotImplementedError

    def mix(self, hidden: torch.Tensor, x: torch.Tensor, context: RoutingContext, lora_A: torch.Tensor) -> torch.Tensor:
        # Not given as factors (mix_factors): the up-projection keeps the gated [tokens, K_B] copy. Factoring it
        # saved 13 MiB of 859 on SmolLM2 (MOELoRA, batch 4 x 128) but made a step where per-op overhead rules
        # 12-22% slower (e2e_bench --quick: per-task LoRA, MOELoRA, MoA), the regime of a GPU's launches.
        gate = self.route(x, context)
        if self.pairing is not None:
            hidden = hidden[..., self.pairing]
        if gate is None:
            return hidden
        if gate.dim() == 2 and hidden.dim() > 2:
            gate = gate.view(gate.shape[0], *([1] * (hidden.dim() - 2)), gate.shape[-1])
        return hidden * gate

    def task_matrix(self, task: int) -> torch.Tensor:
        gate = self.task_gate(task)
        pairing = torch.arange(self.bank_b, device=gate.device) if self.pairing is None else self.pairing
        return torch.eye(self.bank_a, dtype=gate.dtype, device=gate.device)[pairing] * gate[:, None]


def shared_pairing(rank: int, num_experts: int) -> torch.Tensor:
    """Pairing of E up-projections of ``rank`` columns with one shared down-projection of ``rank`` rows:
    column ``e·r + q`` pairs with row q, LongTensor[E * r]."""
    return torch.arange(rank, device="cpu").repeat(num_experts)
