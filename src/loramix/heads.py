"""A multi-task sequence classifier: one shared encoder, one classification head per task.

With ``pooling="pooler"`` each task's head is what the architecture's own sequence-classification class
puts on the encoder (for BERT: the first token through a pooler, dropout, a linear classifier), with the
pooler trained per task, so one task of a trained mixture becomes a plain
``AutoModelForSequenceClassification`` (:meth:`MultiTaskSequenceClassifier.task_model`). The default,
``pooling="mean"``, averages the last hidden states (what sentence encoders such as all-MiniLM-L6-v2 were
trained for); no transformers class pools so, so its tasks run only in loramix.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from loramix.gating import pool_sequences

POOLINGS = ("mean", "pooler")


class TaskHead(nn.Module):
    """One task's head with ``pooling="pooler"``: a copy of the encoder's pooler and a linear classifier.

    Args:
        pooler: the module mapping the last hidden states to one vector per sequence.
        hidden: the encoder's hidden size.
        num_labels: the task's number of labels.
    """

    def __init__(self, pooler: nn.Module, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.pooler = pooler
        self.classifier = nn.Linear(hidden, num_labels)


class MultiTaskSequenceClassifier(nn.Module):
    """An encoder (any transformers ``AutoModel``) with a linear classifier (and a pooler) per task.

    Tasks may have different numbers of labels: logits are padded to the largest label set with ``-inf``
    in the columns a task does not have. Wrap it with :func:`loramix.get_mixture_model` and
    ``modules_to_save=["heads"]``; the mixture passes ``task_ids`` through to :meth:`forward`.

    Args:
        encoder: the backbone (e.g. ``BertModel``).
        labels_per_task: the number of labels of each task, in task-id order.
        dropout: dropout before the heads.
        pooling: ``"mean"`` (default): the mean of the last hidden states over real tokens, then the
            task's linear head (``heads[t]`` is an ``nn.Linear``); tasks export only as loramix models.
            ``"pooler"``: each task pools with its own copy of the encoder's pooler (BERT: the first token,
            a dense layer, tanh), as the architecture's ``...ForSequenceClassification`` does, so a task
            exports as that class (``heads[t]`` is a :class:`TaskHead`); the encoder's own pooler is
            removed (``encoder.pooler = None``) and the copies train with the heads.

    Raises:
        ValueError: a task has fewer than 2 labels, or the pooling is unknown or needs a pooler the encoder
            lacks.
    """

    def __init__(
        self, encoder: nn.Module, labels_per_task: list[int], dropout: float = 0.1, pooling: str = "mean"
    ) -> None:
        super().__init__()
        if not labels_per_task or min(labels_per_task) < 2:
            raise ValueError(f"labels_per_task={labels_per_task}: every task needs at least 2 labels")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is invalid: expected one of {POOLINGS}")
        if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
            raise ValueError(f"pooling='pooler' needs an encoder with a pooler; {type(encoder).__name__} has none")
        pooler = encoder.pooler if pooling == "pooler" else None
        if pooler is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.config = encoder.config
        self.pooling = pooling
        self.labels_per_task = list(labels_per_task)
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(
            TaskHead(copy.deepcopy(pooler) if pooler is not None else None, hidden, count) for count in labels_per_task
        )
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

    def pool(self, task: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s pooled representation FloatTensor[rows, hidden] of last hidden states [rows, seq, hidden]."""
        if self.pooling == "pooler":
            return self.heads[task].pooler(hidden)
        return pool_sequences(hidden, attention_mask)

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
        width = max(self.labels_per_task)
        logits = hidden.new_full((hidden.shape[0], width), float("-inf"))
        for task in task_ids.unique().tolist():
            rows = task_ids == task
            pooled = self.dropout(self.pool(task, hidden[rows], attention_mask[rows]))
            head = self.heads[task]
            classifier = head.classifier if isinstance(head, TaskHead) else head
            logits[rows, : self.labels_per_task[task]] = classifier(pooled).to(logits.dtype)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def task_model(self, task: int, id2label: dict[int, str] | None = None) -> nn.Module:
        """One task as the architecture's own ``AutoModelForSequenceClassification`` (a new model).

        The encoder's weights (as they are now: call it on a merged copy to carry a task's adapter) and the
        task's pooler and classifier are copied into it; its config has the task's ``num_labels`` and
        ``id2label``.

        Args:
            task: the task id.
            id2label: label names by class id (default ``LABEL_0``, ``LABEL_1``, ...).

        Returns:
            The sequence classifier, in this model's dtype and device and in eval mode.

        Raises:
            ValueError: the pooling is ``"mean"``, or the architecture's sequence-classification class does
                not put a linear classifier on this encoder.
            TypeError: the encoder still holds adapted (mixture) layers.
        """
        from transformers import AutoModelForSequenceClassification

        if self.pooling != "pooler":
            raise ValueError(
                "this classifier mean-pools its encoder's tokens, which no transformers sequence-classification "
                "class does; train it with pooling='pooler' (recipes: model.pooling: pooler) to export its tasks"
            )
        count = self.labels_per_task[task]
        names = dict(id2label) if id2label else {index: f"LABEL_{index}" for index in range(count)}
        if sorted(names) != list(range(count)):
            raise ValueError(f"id2label {names} does not name the {count} labels of task {task}")
        config = copy.deepcopy(self.encoder.config)
        config.num_labels = count
        config.id2label = {index: str(names[index]) for index in range(count)}
        config.label2id = {name: index for index, name in config.id2label.items()}
        config.classifier_dropout = self.dropout.p
        config.architectures = None
        model = AutoModelForSequenceClassification.from_config(config)
        backbone = getattr(model, model.base_model_prefix, None)
        classifier = getattr(model, "classifier", None)
        head = self.heads[task]
        if (
            type(backbone) is not type(self.encoder)
            or not isinstance(classifier, nn.Linear)
            or type(getattr(backbone, "pooler", None)) is not type(head.pooler)
        ):
            raise ValueError(
                f"{type(model).__name__} does not read a linear classifier on a {type(self.encoder).__name__}; "
                "loramix exports per-task heads only to architectures that do (e.g. BERT)"
            )
        state = self.encoder.state_dict()
        if any(".base_layer." in key for key in state):
            raise TypeError("the encoder still holds mixture layers: call task_model on MixtureModel.merge(task)")
        reference = next(self.encoder.parameters())
        model.to(device=reference.device, dtype=reference.dtype)
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if unexpected or any(not key.startswith("pooler.") for key in missing):
            raise ValueError(f"the encoder's weights do not fit {type(backbone).__name__}: {missing + unexpected}")
        backbone.pooler.load_state_dict(head.pooler.state_dict())
        classifier.load_state_dict(head.classifier.state_dict())
        return model.eval()
