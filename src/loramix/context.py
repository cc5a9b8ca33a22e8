"""The routing context: what every adapted layer needs to know about the current call.

A :class:`RoutingContext` lives for exactly one ``forward`` (or one ``generate``) of a
:class:`~loramix.model.MixtureModel`; the model opens it with :meth:`ContextHolder.activate` and it is
cleared when the call returns or raises. Nothing is kept in module-level globals, so two models (or two
calls on different tasks) never see each other's routing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RoutingContext:
    """Per-call routing inputs and outputs.

    Attributes:
        task_ids: LongTensor[batch] of task ids, one per sequence, or ``None``.
        attention_mask: LongTensor[batch, seq] of the call's inputs (1 = real token), or ``None``.
        aux_losses: auxiliary losses appended by routers, by name; each a scalar tensor per layer.
        records: routing decisions routers want to expose (e.g. chosen rank per layer), by layer name.
        cache: per-layer state that must persist across the forwards of one ``generate`` call (e.g. a
            sequence route chosen on the prompt), by layer name.
    """

    task_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    aux_losses: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    records: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    def task_ids_for(self, batch_size: int) -> torch.Tensor:
        """Task ids aligned with a layer's batch dimension.

        ``generate`` with beams or ``num_return_sequences`` repeats each row n times consecutively; the
        ids are repeated the same way.

        Args:
            batch_size: the leading dimension of the layer's input.

        Returns:
            LongTensor[batch_size].

        Raises:
            ValueError: no task ids were given, or the batch is not a multiple of their number.
        """
        if self.task_ids is None:
            raise ValueError("this mixture routes by task: pass task_ids=LongTensor[batch] to the call")
        count = self.task_ids.shape[0]
        if batch_size == count:
            return self.task_ids
        if count and batch_size % count == 0:
            return self.task_ids.repeat_interleave(batch_size // count)
        raise ValueError(f"task_ids has {count} entries but the layer sees a batch of {batch_size}")

    def mask_for(self, batch_size: int, seq_len: int) -> torch.Tensor | None:
        """The attention mask if it matches a layer input of shape (batch, seq, ...), else ``None``."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.shape[1] != seq_len:
            return None
        if mask.shape[0] == batch_size:
            return mask
        if batch_size % mask.shape[0] == 0:
            return mask.repeat_interleave(batch_size // mask.shape[0], dim=0)
        return None


class ContextHolder:
    """Holds the context of the call in progress for the layers of one model."""

    def __init__(self) -> None:
        self.current: RoutingContext | None = None

    @contextmanager
    def activate(self, context: RoutingContext) -> Iterator[RoutingContext]:
        """Make ``context`` current for the duration of a ``with`` block, then clear it."""
        previous = self.current
        self.current = context
        try:
            yield context
        finally:
            self.current = previous
