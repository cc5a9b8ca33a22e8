"""Tiny mixture models and in-memory multi-task data for the training, checkpoint and CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loramix import MixtureConfig, get_mixture_model
from loramix.heads import MultiTaskSequenceClassifier
from loramix.model import MixtureModel
from loramix.train import TensorBatches
from tiny_models import VOCAB, build

SEQ_LEN = 8
TESTS = Path(__file__).resolve().parent
# Tiny models run far faster on one thread, above all on a machine shared by several test runs.
torch.set_num_threads(1)


def classifier(
    method: str = "moelora", num_tasks: int = 2, seed: int = 0, dropout: float = 0.0, **mixture
) -> MixtureModel:
    """A tiny BERT encoder with a head per task, wrapped with a mixture on query/value.

    ``dropout`` is that of the heads, the adapters and every dropout layer of the encoder.
    """
    encoder = build("bert", seed=seed).bert
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    model = MultiTaskSequenceClassifier(encoder, [2] * num_tasks, dropout=dropout)
    settings = {"r": 2, "num_experts": 2, "lora_dropout": dropout, **mixture}
    config = MixtureConfig(
        method=method,
        target_modules=["query", "value"],
        num_tasks=num_tasks,
        modules_to_save=["heads"],
        **settings,
    )
    return get_mixture_model(model, config)


def classification_examples(count: int = 32, num_tasks: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Examples whose tokens come from the lower or upper half of the vocabulary; the label says which,
    flipped for odd tasks (learnable by a tiny model in a few steps)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    middle = VOCAB // 2
    for index in range(count):
        task = index % num_tasks
        half = int(torch.randint(0, 2, (1,), generator=generator))
        input_ids = torch.randint(3, middle, (SEQ_LEN,), generator=generator) + half * (middle - 3)
        label = half ^ (task % 2)
        examples.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
                "labels": torch.tensor(label),
                "task_ids": torch.tensor(task),
            }
        )
    return examples


def batch_factory(examples: list[dict[str, torch.Tensor]], batch_size: int, seed: int = 0):
    """A trainer batch factory serving ``examples`` through :class:`TensorBatches`."""

    def make(stage, rank: int, world_size: int) -> TensorBatches:
        return TensorBatches(examples, batch_size, seed=seed, rank=rank, world_size=world_size)

    return make


def torchrun(script: Path, args: list[str], port: int, extra_env: dict[str, str] | None = None) -> None:
    """Run ``script args`` in 2 CPU processes (gloo) under ``torch.distributed.run``; fail the test with the
    processes' output when it exits with an error."""
    env = {
        **os.environ,
        **(extra_env or {}),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    completed = subprocess.run(
        [*command, str(script), *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if completed.returncode != 0:
        pytest.fail(f"torchrun failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")
