"""Periodic, atomic training checkpoints with exact resume.

A checkpoint is a directory ``checkpoint-<step>`` holding:

- ``adapter_config.json`` and ``adapter_model.safetensors``: the adapter, as ``save_pretrained`` writes it;
- ``optimizer.pt``: the state dicts of the optimizer, the scheduler and, with fp16, the gradient scaler
  (``torch.save``, read back with ``weights_only=True``);
- ``rank_state_<r>.json``: each rank's data-sampler state and random-generator states;
- ``trainer_state.json``: where training stands (stage, steps), written last.

Everything is first written to a hidden temporary directory, each file fsynced, then the directory is
renamed into place and its parent fsynced, so a crash at any moment leaves either the previous good
checkpoints or the new complete one, never a half-written one under a checkpoint's name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from loramix.model import WEIGHTS_NAME, MixtureModel

PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _rank_state_name(rank: int) -> str:
    return f"rank_state_{rank}.json"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints under ``directory`` (those with a ``trainer_state.json``), oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The most recent complete checkpoint under ``directory``, or ``None``."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


class CheckpointManager:
    """Writes, rotates and reads the checkpoints of one run.

    In a distributed run every rank calls :meth:`save` and :meth:`load`; each writes or reads its own
    ``rank_state_<r>.json``, and the main rank (0) writes the shared files and publishes the directory.

    Args:
        directory: the run's output directory; checkpoints go directly under it.
        keep_last: how many checkpoints to keep (older ones are deleted after a new one is published);
            ``None`` keeps all.
        rank: this process's rank.
        barrier: waits for all ranks (a no-op in a single process).
    """

    def __init__(
        self,
        directory: str | Path,
        keep_last: int | None = 2,
        rank: int = 0,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be None or at least 1")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier

    def save(
        self,
        step: int,
        model: MixtureModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        scaler: torch.amp.GradScaler | None = None,
    ) -> Path:
        """Write checkpoint ``checkpoint-<step>`` atomically and delete those beyond ``keep_last``.

        Args:
            step: the global optimizer step the checkpoint is taken after.
            model: the unwrapped mixture model.
            optimizer: the optimizer (its ``state_dict`` is saved by rank 0).
            scheduler: the learning-rate scheduler.
            trainer_state: JSON data saying where training stands (written by rank 0).
            rank_state: JSON data of this rank (sampler and RNG states).
            scaler: the fp16 gradient scaler, if any.

        Returns:
            The published checkpoint directory.
        """
        final = self.directory / f"{PREFIX}{step:08d}"
        staging = self.directory / f".{final.name}.tmp"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        self.barrier()
        _write_json(staging / _rank_state_name(self.rank), rank_state)
        self.barrier()
        if self.rank == 0:
            model.save_pretrained(staging)
            states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            if scaler is not None:
                states["scaler"] = scaler.state_dict()
            torch.save(states, staging / OPTIMIZER_NAME)
            for path in staging.iterdir():
                _fsync_file(path)
            _write_json(staging / STATE_NAME, {**trainer_state, "step": step})
            _fsync_dir(staging)
            self._publish(staging, final)
            self._rotate()
        self.barrier()
        return final

    def _publish(self, staging: Path, final: Path) -> None:
        if final.exists():
            trash = final.with_name(f".{final.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(staging, final)
            shutil.rmtree(trash)
        else:
            os.replace(staging, final)
        _fsync_dir(self.directory)

    def _rotate(self) -> None:
        if self.keep_last is None:
            return
        for old in list_checkpoints(self.directory)[: -self.keep_last]:
            shutil.rmtree(old)

    def load(
        self,
        path: str | Path,
        model: MixtureModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the adapter, optimizer, scheduler (and fp16 gradient scaler) from a checkpoint.

        Returns:
            ``(trainer_state, rank_state)`` as given to :meth:`save` (this rank's).

        Raises:
            FileNotFoundError: the checkpoint is incomplete or has no state for this rank.
        """
        directory = Path(path)
        if not (directory / STATE_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {STATE_NAME})")
        rank_file = directory / _rank_state_name(self.rank)
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{directory} has no state for rank {self.rank}: resume with the number of processes it was saved with"
            )
        model.load_adapter_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        saved = torch.load(directory / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        trainer_state = json.loads((directory / STATE_NAME).read_text())
        return trainer_state, json.loads(rank_file.read_text())
