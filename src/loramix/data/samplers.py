"""Seeded, resumable, shardable batch samplers over a multi-task dataset.

Strategies (``p_t`` is the probability of drawing task ``t``, ``n_t`` its number of examples):

- ``proportional``: every example once per epoch, in a seeded order (``p_t = n_t / sum(n)``, exactly).
- ``temperature``: ``p_t`` proportional to ``n_t ** (1 / temperature)`` (1 is proportional; large values
  tend to uniform).
- ``uniform``: ``p_t = 1 / T``.
- ``more``: MoRE's rule, ``p = softmax(n / sum(n))`` over tasks, one task per batch.

Batches are *mixed* (each example's task drawn on its own) or *single-task* (the whole global batch
from one task); ``more`` defaults to single-task, the others to mixed. The sampled strategies draw
examples of a task without replacement, reshuffling the task when it runs out.

Every rank builds the same global batch of ``batch_size * num_replicas`` indices from the seed and the
epoch, and keeps its own slice, so all ranks see one task per step in single-task mode. Batches always
have ``batch_size`` indices: a short last batch is dropped (``drop_last``) or filled by wrapping around.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

STRATEGIES = ("proportional", "temperature", "uniform", "more")


def task_probabilities(
    task_sizes: Sequence[int], strategy: str = "proportional", temperature: float = 2.0
) -> list[float]:
    """The probability of drawing each task under a sampling strategy.

    Args:
        task_sizes: Number of examples of each task, by task id. Tasks of size 0 get probability 0.
        strategy: One of ``proportional``, ``temperature``, ``uniform``, ``more``.
        temperature: The temperature of the ``temperature`` strategy (> 0).

    Returns:
        One probability per task, summing to 1.

    Raises:
        ValueError: For an unknown strategy, a temperature <= 0, a negative size or no example at all.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy {strategy!r}; choose one of {STRATEGIES}")
    if any(size < 0 for size in task_sizes) or sum(task_sizes) == 0:
        raise ValueError(f"task sizes must be non-negative with at least one example, got {list(task_sizes)}")
    total = sum(task_sizes)
    present = [size > 0 for size in task_sizes]
    if strategy == "proportional":
        weights = [size / total for size in task_sizes]
    elif strategy == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = [size ** (1.0 / temperature) for size in task_sizes]
    elif strategy == "uniform":
        weights = [1.0 if keep else 0.0 for keep in present]
    else:
        shares = [size / total for size in task_sizes]
        top = max(shares)
        weights = [math.exp(share - top) if keep else 0.0 for share, keep in zip(shares, present, strict=True)]
    norm = sum(weights)
    return [weight / norm for weight in weights]


class _TaskStream:
    """An endless, seeded stream of one task's indices: shuffled passes without replacement."""

    def __init__(self, indices: Sequence[int], rng: random.Random) -> None:
        self.indices = list(indices)
        self.rng = rng
        self.order: list[int] = []
        self.position = 0

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == len(self.order):
                self.order = list(self.indices)
                self.rng.shuffle(self.order)
                self.position = 0
            step = min(count - len(out), len(self.order) - self.position)
            out.extend(self.order[self.position : self.position + step])
            self.position += step
        return out


class MultiTaskBatchSampler:
    """Yield batches of example indices drawn from several tasks, reproducibly and resumably.

    Use it as a ``DataLoader``'s ``batch_sampler``. An epoch is a pure function of ``(seed, epoch)``,
    so :meth:`state_dict` needs only the epoch and the number of batches already handed out.

    Args:
        task_ids: The task id of each example of the dataset (``MultiTaskDataset.task_ids``).
        batch_size: Indices per batch on each rank.
        strategy: ``proportional``, ``temperature``, ``uniform`` or ``more`` (see the module doc).
        temperature: The temperature of the ``temperature`` strategy.
        mixed: Mixed batches (True) or one task per global batch (False); None: False for ``more``,
            True otherwise.
        seed: The sampling seed.
        num_replicas: Number of data-parallel ranks.
        rank: This process's rank, in ``0..num_replicas - 1``.
        drop_last: ``proportional`` only: drop short last batches instead of filling them by wrapping.
        batches_per_epoch: Batches per epoch for the sampled strategies; default
            ``ceil(len(task_ids) / (batch_size * num_replicas))``.

    Raises:
        ValueError: For an invalid strategy, size, rank, or an epoch without batches.
    """

    def __init__(
        self,
        task_ids: Sequence[int],
        batch_size: int,
        *,
        strategy: str = "proportional",
        temperature: float = 2.0,
        mixed: bool | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        batches_per_epoch: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if not task_ids:
            raise ValueError("no examples to sample from")
        if any(task_id < 0 for task_id in task_ids):
            raise ValueError("task ids must be non-negative")
        self.task_ids = [int(task_id) for task_id in task_ids]
        self.batch_size = batch_size
        self.strategy = strategy
        self.temperature = temperature
        self.mixed = (strategy != "more") if mixed is None else mixed
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.global_batch_size = batch_size * num_replicas

        self.task_indices: list[list[int]] = [[] for _ in range(max(self.task_ids) + 1)]
        for index, task_id in enumerate(self.task_ids):
            self.task_indices[task_id].append(index)
        self.task_sizes = [len(indices) for indices in self.task_indices]
        self.probabilities = task_probabilities(self.task_sizes, strategy, temperature)

        if strategy == "proportional":
            units = [len(self.task_ids)] if self.mixed else [size for size in self.task_sizes if size]
            rounding = math.floor if drop_last else math.ceil
            self._length = sum(rounding(size / self.global_batch_size) for size in units)
        else:
            self._length = batches_per_epoch or math.ceil(len(self.task_ids) / self.global_batch_size)
        if self._length < 1:
            raise ValueError(
                f"an epoch has no batch: {len(self.task_ids)} examples, global batch {self.global_batch_size}"
            )
        self.epoch = 0
        self.batch_index = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch = epoch
        self.batch_index = 0

    def _chunks(self, order: list[int]) -> list[list[int]]:
        """Cut an order into global batches; a short last one is dropped or filled by wrapping around."""
        size = self.global_batch_size
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        if batches and len(batches[-1]) < size:
            if self.drop_last:
                batches.pop()
            else:
                filler = order * math.ceil(size / len(order))
                batches[-1] = batches[-1] + filler[: size - len(batches[-1])]
        return batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of an epoch (``batch_size * num_replicas`` indices each), for all ranks.

        Args:
            epoch: The epoch.

        Returns:
            ``len(self)`` lists of example indices.
        """
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = random.Random(f"{self.seed}:{epoch}")
        size = self.global_batch_size
        if self.strategy == "proportional":
            if self.mixed:
                order = list(range(len(self.task_ids)))
                rng.shuffle(order)
                batches = self._chunks(order)
            else:
                batches = []
                for indices in self.task_indices:
                    if indices:
                        order = list(indices)
                        rng.shuffle(order)
                        batches.extend(self._chunks(order))
                rng.shuffle(batches)
        else:
            streams = [
                _TaskStream(indices, random.Random(f"{self.seed}:{epoch}:{task_id}"))
                for task_id, indices in enumerate(self.task_indices)
            ]
            tasks = range(len(streams))
            batches = []
            for _ in range(self._length):
                if self.mixed:
                    drawn = rng.choices(tasks, weights=self.probabilities, k=size)
                    batches.append([streams[task_id].take(1)[0] for task_id in drawn])
                else:
                    task_id = rng.choices(tasks, weights=self.probabilities)[0]
                    batches.append(streams[task_id].take(size))
        self._cached = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's batches from the current position to the end of the epoch, then advance it.

        Yields:
            Lists of ``batch_size`` example indices.
        """
        batches = self.global_batches(self.epoch)
        start = self.rank * self.batch_size
        while self.batch_index < len(batches):
            batch = batches[self.batch_index]
            self.batch_index += 1
            yield batch[start : start + self.batch_size]
        self.epoch += 1
        self.batch_index = 0

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream: epoch and batches handed out in it, with the settings it needs.

        A ``DataLoader`` with workers reads batches ahead of training; then save the number of batches
        the training loop has consumed as ``batch_index`` instead.

        Returns:
            ``epoch``, ``batch_index``, and the settings ``seed``, ``strategy``, ``temperature``,
            ``mixed``, ``num_examples``, ``global_batch_size``.
        """
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "strategy": self.strategy,
            "temperature": self.temperature,
            "mixed": self.mixed,
            "num_examples": len(self.task_ids),
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next batch is the one that would have come next.

        Args:
            state: At least ``epoch`` and ``batch_index``; the other keys, when present, must match.

        Raises:
            ValueError: When a setting differs (the stream would not continue exactly) or
                ``batch_index`` is past the epoch's end.
        """
        current = self.state_dict()
        for key in ("seed", "strategy", "temperature", "mixed", "num_examples", "global_batch_size"):
            if key in state and state[key] != current[key]:
                raise ValueError(f"cannot resume: {key} was {state[key]!r}, now {current[key]!r}")
        if not 0 <= state["batch_index"] <= len(self):
            raise ValueError(f"batch_index {state['batch_index']} is outside 0..{len(self)}")
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
