"""What the trainer reads batches from, and a small in-memory implementation of it.

The trainer needs, per rank, an iterable of batch dicts (``input_ids``, ``attention_mask``, ``labels``,
``task_ids``, ...) that can tell where it stands (``state_dict``) and continue from there after a restart
(``load_state_dict``): that is :class:`BatchSource`. ``loramix.data``'s samplers with a collator provide
one for real multi-task data; :class:`TensorBatches` serves ready-made tensors (tests, small scripts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    """Batches of one rank, resumable.

    Iterating yields batches until the data is exhausted (one epoch) or forever; the trainer starts a new
    iteration when one ends. After ``load_state_dict(state)``, a new iteration yields exactly the batches
    that followed the moment ``state_dict()`` was taken. States must be JSON-serialisable.
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def stack_examples(examples: Sequence[Batch]) -> Batch:
    """Stack examples of equal shapes into a batch: each key's tensors gain a leading batch dimension."""
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


class TensorBatches:
    """Shuffled batches over a list of examples, sharded by rank, resumable.

    Each step draws a *global* batch of ``batch_size * world_size`` examples from a seeded permutation of
    the whole list (the same on every rank) and gives rank ``r`` its ``r``-th slice, so ``world_size``
    processes see together exactly the examples one process would see with the global batch size. The
    last incomplete global batch of an epoch is dropped.

    Args:
        examples: the examples, each a dict of tensors (``input_ids`` LongTensor[seq], ``labels``,
            ``task_ids`` LongTensor[] ...).
        batch_size: examples per rank per batch.
        seed: seed of the shuffle (epoch ``e`` uses ``seed + e``).
        rank: this process's rank.
        world_size: the number of processes.
        shuffle: shuffle each epoch (otherwise keep the list's order).
        collate: turns a list of examples into a batch (default: :func:`stack_examples`).

    Raises:
        ValueError: fewer examples than one global batch.
    """

    def __init__(
        self,
        examples: Sequence[Batch],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        collate: Callable[[Sequence[Batch]], Batch] = stack_examples,
    ) -> None:
        if len(examples) < batch_size * world_size:
            raise ValueError(f"{len(examples)} examples are fewer than one global batch ({batch_size} x {world_size})")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.collate = collate
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def __iter__(self) -> Iterator[Batch]:
        global_size = self.batch_size * self.world_size
        order = self._order()
        while self.position + global_size <= len(order):
            start = self.position + self.rank * self.batch_size
            self.position += global_size
            yield self.collate([self.examples[index] for index in order[start : start + self.batch_size]])
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position"}``: the epoch and the index of the next global batch's first example."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state given by :meth:`state_dict`."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class SampledBatches:
    """Batches of a dataset drawn by a resumable batch sampler and padded by a collator.

    Args:
        dataset: indexable items (``loramix.data.MultiTaskDataset``: features of encoded examples).
        sampler: yields lists of indices for this rank and has ``state_dict``/``load_state_dict``
            (``loramix.data.MultiTaskBatchSampler``).
        collate: turns a list of items into a batch of tensors (``loramix.data.MultiTaskCollator``).
    """

    def __init__(self, dataset: Sequence[Any], sampler: Any, collate: Callable[[Sequence[Any]], Batch]) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.collate = collate

    def __iter__(self) -> Iterator[Batch]:
        indices: Iterable[list[int]] = self.sampler
        for batch in indices:
            yield self.collate([self.dataset[index] for index in batch])

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the sampler's state."""
        self.sampler.load_state_dict(state)
