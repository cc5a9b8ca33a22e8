"""Random-number-generator states (Python, NumPy, torch) as plain JSON-serialisable data."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _tensor_to_list(state: torch.Tensor) -> list[int]:
    return state.to(torch.uint8).tolist()


def _list_to_tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def get_rng_state() -> dict[str, Any]:
    """Capture every generator a training step may draw from.

    Returns:
        A dict of lists and numbers (no tensors, no pickle needed) with keys ``python``, ``numpy``,
        ``torch`` and, where CUDA is initialised, ``cuda`` (one state per device).
    """
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": _tensor_to_list(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_tensor_to_list(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators captured by :func:`get_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(_list_to_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_list_to_tensor(s) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
