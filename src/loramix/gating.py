"""Building blocks shared by the mixers: pooling, the straight-through trick, expert gates, top-k, balance.

Every function here is a pure tensor function (no data-dependent Python control flow, no ``.item()``), so
mixers built from them compile under ``torch.compile`` without graph breaks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loramix.context import RoutingContext

POOLINGS = ("first", "mean")


def token_mask(x: torch.Tensor, context: RoutingContext) -> torch.Tensor | None:
    """BoolTensor[batch, seq] marking the real (non-pad) tokens of a layer input [batch, seq, d], or ``None``.

    ``None`` when the input has no sequence dimension or the call's attention mask does not fit it.
    """
    if x.dim() != 3:
        return None
    mask = context.mask_for(x.shape[0], x.shape[1])
    return None if mask is None else mask.bool()


def pool_sequences(x: torch.Tensor, mask: torch.Tensor | None = None, pooling: str = "mean") -> torch.Tensor:
    """One vector per sequence from a layer input.

    Args:
        x: FloatTensor[batch, seq, d] (or [batch, d], returned as is).
        mask: Long/BoolTensor[batch, seq], 1 on real tokens, or ``None`` (every token counts).
        pooling: ``"mean"`` (mean over the real tokens) or ``"first"`` (the first token).

    Returns:
        FloatTensor[batch, d].
    """
    if x.dim() == 2:
        return x
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if pooling == "first":
        return x[:, 0]
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def straight_through(chosen: torch.Tensor) -> torch.Tensor:
    """``p − stopgrad(p) + 1``: the value 1 in the forward, the gradient of the probability ``p`` backwards.

    Multiplying a hard choice by it keeps the forward exact and lets the router that produced ``p`` learn.
    """
    return chosen - chosen.detach() + 1.0


def expert_gates(weights: torch.Tensor, rank: int) -> torch.Tensor:
    """Spread per-expert weights FloatTensor[..., E] over each expert's ``rank`` components: [..., E * rank]."""
    return weights.repeat_interleave(rank, dim=-1)


def one_hot_gates(experts: torch.Tensor, num_experts: int, rank: int) -> torch.Tensor:
    """Gates of hard choices: LongTensor[...] of experts -> FloatTensor[..., E * rank], ones on the chosen one."""
    return expert_gates(F.one_hot(experts, num_experts).float(), rank)


def top_k_weights(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``top_k`` largest probabilities of each row, renormalised to sum to 1.

    Args:
        probs: FloatTensor[..., E].
        top_k: how many to keep.

    Returns:
        (weights, chosen), both FloatTensor[..., E]: the renormalised weights (zero elsewhere) and 1 where kept.
    """
    top_values, top_index = probs.topk(top_k, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, top_index, top_values / top_values.sum(-1, keepdim=True))
    chosen = torch.zeros_like(probs).scatter(-1, top_index, 1.0)
    return weights, chosen


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-style load-balancing loss ``E · Σ_e f_e · P_e`` over real tokens.

    f_e is the fraction of token assignments that go to expert e, P_e the mean router probability of e.

    Args:
        probs: FloatTensor[..., E], router probabilities.
        chosen: FloatTensor[..., E], 1 where a token is sent to an expert (k ones per token).
        mask: BoolTensor of the leading shape, or ``None`` for all tokens.

    Returns:
        A scalar; 1.0 when routing is perfectly uniform.
    """
    num_experts = probs.shape[-1]
    probs, chosen = probs.reshape(-1, num_experts), chosen.reshape(-1, num_experts)
    if mask is None:
        mean_probs = probs.mean(0)
    else:
        keep = mask.reshape(-1, 1).to(probs.dtype)
        probs, chosen = probs * keep, chosen * keep
        mean_probs = probs.sum(0) / keep.sum().clamp(min=1.0)
    fraction = chosen.sum(0) / chosen.sum().clamp(min=1.0)
    return num_experts * (fraction * mean_probs).sum()
