"""A multi-task sequence classifier: one shared encoder, one classification head per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


class MultiTaskSequenceClassifier(nn.Module):
    """An encoder (any transformers ``AutoModel``) with mean pooling and a linear head per task.

    Tasks may have different numbers of labels: logits are padded to the largest label set with ``-inf``
    in the columns a task does not have. Wrap it with :func:`loramix.get_mixture_model` and
    ``modules_to_save=["heads"]``; the mixture passes ``task_ids`` through to :meth:`forward`.

    Args:
        encoder: the backbone; its output's ``last_hidden_state`` is pooled.
        labels_per_task: the number of labels of each task, in task-id order.
        dropout: dropout before the heads.
    """

    def __init__(self, encoder: nn.Module, labels_per_task: list[int], dropout: float = 0.1) -> None:
        super().__init__()
        if not labels_per_task or min(labels_per_task) < 2:
            raise ValueError(f"labels_per_task={labels_per_task}: every task needs at least 2 labels")
        self.encoder = encoder
        self.config = encoder.config
        self.labels_per_task = list(labels_per_task)
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(hidden, count) for count in labels_per_task)
        self.register_buffer(
            "label_mask",
            torch.arange(max(labels_per_task))[None, :] < torch.tensor(labels_per_task)[:, None],
            persistent=False,
        )

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint the encoder's layers (see ``MixtureModel.activation_checkpointing_enable``)."""
        if hasattr(self.encoder, "activation_checkpointing_enable"):
            self.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)
        else:
            self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Classify each sequence with its own task's head.

        Args:
            input_ids: LongTensor[batch, seq].
            attention_mask: LongTensor[batch, seq].
            task_ids: LongTensor[batch].
            labels: LongTensor[batch] of class ids within each row's task, or ``None``.

        Returns:
            ``SequenceClassifierOutput`` with logits FloatTensor[batch, max_labels] and, with labels, the
            mean cross-entropy.
        """
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = self.dropout((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        width = max(self.labels_per_task)
        logits = pooled.new_full((pooled.shape[0], width), float("-inf"))
        for task in task_ids.unique().tolist():
            rows = task_ids == task
            logits[rows, : self.labels_per_task[task]] = self.heads[task](pooled[rows]).to(logits.dtype)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
