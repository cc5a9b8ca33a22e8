"""Per-domain batches for MoA training: fixed rows per domain, fixed length, seeded per domain.

Every step takes ``per_domain`` examples from each domain's own seeded stream and pads every row to the
same ``max_length``. So the rows, positions and tensor shapes a domain gets never depend on any other
domain's data, which is what makes an expert trained in a shared run exactly independent of the other
domains (float kernels see the same shapes; rows of other domains contribute exact zeros to its gradient).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
TokenizedExample = Mapping[str, Sequence[int]]
"""A causal-LM example: ``input_ids`` (prompt + target) and ``labels`` (``-100`` on the prompt)."""


def collate(examples: Sequence[TokenizedExample], max_length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (or left-truncate) examples to exactly ``max_length`` tokens.

    Args:
        examples: examples with ``input_ids`` and ``labels`` of equal length.
        max_length: the length of every row; longer examples lose their first tokens (the target is kept).
        pad_token_id: the id written in padded positions.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each LongTensor[batch, max_length]; padded
        positions have mask 0 and label -100.
    """
    input_ids = torch.full((len(examples), max_length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), max_length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), max_length), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = list(example["input_ids"])[-max_length:]
        targets = list(example["labels"])[-max_length:]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(ids)] = torch.tensor(targets, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class DomainStreams:
    """An endless stream of batches with ``per_domain`` rows from every domain, in domain order.

    Each domain's examples are reshuffled every epoch by its own ``random.Random`` seeded from
    ``(seed, domain)``, so its order does not depend on the other domains. It is a resumable batch source
    for :class:`loramix.train.Trainer` (iteration never ends; ``state_dict`` / ``load_state_dict``).

    Args:
        domains: examples by domain id.
        per_domain: rows of each domain per batch.
        max_length: length of every row.
        pad_token_id: id of padding.
        seed: seed of the shuffles.

    Raises:
        ValueError: a domain has no examples.
    """

    def __init__(
        self,
        domains: Mapping[int, Sequence[TokenizedExample]],
        per_domain: int,
        max_length: int,
        pad_token_id: int,
        seed: int = 0,
    ) -> None:
        empty = [domain for domain, examples in domains.items() if not examples]
        if empty:
            raise ValueError(f"domains {empty} have no examples")
        self.domains = dict(sorted(domains.items()))
        self.per_domain = per_domain
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self._rngs = {domain: random.Random(f"{seed}/{domain}") for domain in self.domains}
        self._orders: dict[int, list[int]] = {domain: [] for domain in self.domains}

    def _take(self, domain: int) -> list[TokenizedExample]:
        taken = []
        for _ in range(self.per_domain):
            if not self._orders[domain]:
                order = list(range(len(self.domains[domain])))
                self._rngs[domain].shuffle(order)
                self._orders[domain] = order
            taken.append(self.domains[domain][self._orders[domain].pop()])
        return taken

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch: the collated rows plus ``task_ids`` LongTensor[batch] (the domain of each row)."""
        examples: list[TokenizedExample] = []
        task_ids: list[int] = []
        for domain in self.domains:
            examples.extend(self._take(domain))
            task_ids.extend([domain] * self.per_domain)
        batch = collate(examples, self.max_length, self.pad_token_id)
        batch["task_ids"] = torch.tensor(task_ids, dtype=torch.long)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where every domain's stream stands (its generator's state and the rest of its epoch), as JSON data."""
        return {
            str(domain): {"rng": _plain(self._rngs[domain].getstate()), "order": list(self._orders[domain])}
            for domain in self.domains
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state given by :meth:`state_dict`.

        Raises:
            ValueError: the state is of other domains.
        """
        if sorted(state) != sorted(str(domain) for domain in self.domains):
            raise ValueError(f"the stream state holds domains {sorted(state)}, not {sorted(self.domains)}")
        for domain in self.domains:
            version, internal, gauss = state[str(domain)]["rng"]
            self._rngs[domain].setstate((version, tuple(internal), gauss))
            self._orders[domain] = [int(index) for index in state[str(domain)]["order"]]


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (JSON data)."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value
