"""Pad token features into batches of tensors, and a dataset that encodes examples on access."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from loramix.data.sources import DataError, Example
from loramix.data.templates import IGNORE_INDEX

Features = Mapping[str, Any]


class MultiTaskDataset(Dataset):
    """A map-style dataset of examples, encoded by a template when an item is read.

    Args:
        examples: Examples with ``task_id`` set (see :meth:`TaskSet.assign`).
        template: A callable turning an example into features (a template of
            :mod:`loramix.data.templates`); None returns the examples themselves.
    """

    def __init__(self, examples: Sequence[Example], template: Callable[[Example], Features] | None = None):
        self.examples = list(examples)
        self.template = template

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Features | Example:
        example = self.examples[index]
        return example if self.template is None else self.template(example)

    @property
    def task_ids(self) -> list[int]:
        """The task id of every example, in order (what the samplers need)."""
        if any(example.task_id is None for example in self.examples):
            raise DataError("some examples have no task_id; pass them through TaskSet.assign")
        return [example.task_id for example in self.examples]


class MultiTaskCollator:
    """Pad features (or examples, through a template) into a batch of tensors.

    Args:
        pad_token_id: The id padding ``input_ids``; or a tokenizer whose ``pad_token_id`` (else
            ``eos_token_id``) is used.
        template: Applied to items that are :class:`Example`; features pass through unchanged.
        padding_side: ``"right"`` for training; ``"left"`` for batched generation from prompts.
        pad_to_multiple_of: Round the padded length up to a multiple of this (tensor-core friendly).

    Raises:
        DataError: When a tokenizer has neither a pad nor an end-of-sequence token.
    """

    def __init__(
        self,
        pad_token_id: int | Any,
        template: Callable[[Example], Features] | None = None,
        padding_side: Literal["right", "left"] = "right",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if not isinstance(pad_token_id, int):
            tokenizer = pad_token_id
            pad_token_id = tokenizer.pad_token_id
            if pad_token_id is None:
                pad_token_id = tokenizer.eos_token_id
            if pad_token_id is None:
                raise DataError("the tokenizer has neither a pad token nor an end-of-sequence token")
        if padding_side not in ("right", "left"):
            raise DataError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.template = template
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            if self.padding_side == "right":
                out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            else:
                out[i, length - len(row) :] = torch.as_tensor(row, dtype=torch.long)
        return out

    def __call__(self, items: Sequence[Features | Example]) -> dict[str, torch.Tensor]:
        """Collate a batch.

        Args:
            items: Features with ``input_ids`` (list[int]), optional ``attention_mask``, ``task_ids``
                (int) and optional ``labels`` (an int class id, or a list[int] of token labels as long
                as ``input_ids``); or examples, encoded with ``template``.

        Returns:
            ``input_ids`` and ``attention_mask``: LongTensor[batch, seq]; ``task_ids``: LongTensor[batch];
            ``labels`` when the items have them: LongTensor[batch] of class ids, or LongTensor[batch, seq]
            of token labels padded with -100.

        Raises:
            DataError: For an empty batch, examples without a template, or token labels whose length
                differs from ``input_ids``.
        """
        if not items:
            raise DataError("cannot collate an empty batch")
        features = []
        for item in items:
            if isinstance(item, Example):
                if self.template is None:
                    raise DataError("the collator got examples but has no template to encode them")
                item = self.template(item)
            features.append(item)

        input_ids = [list(feature["input_ids"]) for feature in features]
        length = max(len(row) for row in input_ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        masks = [list(feature.get("attention_mask") or [1] * len(feature["input_ids"])) for feature in features]
        batch = {
            "input_ids": self._pad(input_ids, length, self.pad_token_id),
            "attention_mask": self._pad(masks, length, 0),
            "task_ids": torch.tensor([int(feature["task_ids"]) for feature in features], dtype=torch.long),
        }
        if "labels" in features[0]:
            labels = [feature["labels"] for feature in features]
            if isinstance(labels[0], int):
                batch["labels"] = torch.tensor(labels, dtype=torch.long)
            else:
                for row, ids in zip(labels, input_ids, strict=True):
                    if len(row) != len(ids):
                        raise DataError(f"token labels of length {len(row)} for {len(ids)} input ids")
                batch["labels"] = self._pad(labels, length, IGNORE_INDEX)
        return batch
