"""Training logs: one JSON object per line, mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLogger:
    """Appends records to ``<directory>/log.jsonl`` and, if ``tensorboard`` imports, to TensorBoard.

    Each record is a flat dict; its numeric values (other than ``step``) become TensorBoard scalars
    under ``<kind>/<key>``.

    Args:
        directory: the run's output directory.
        tensorboard: also write TensorBoard events (under ``<directory>/tensorboard``) when possible.
    """

    def __init__(self, directory: str | Path, tensorboard: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "log.jsonl"
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(str(self.directory / "tensorboard"))

    def log(self, kind: str, record: dict[str, Any]) -> None:
        """Append ``{"kind": kind, **record}`` to the log."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"kind": kind, **record}, sort_keys=True) + "\n")
        if self._writer is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        """Flush and close TensorBoard's writer."""
        if self._writer is not None:
            self._writer.close()


def read_log(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` file, optionally only those of one kind."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [record for record in records if kind is None or record.get("kind") == kind]
