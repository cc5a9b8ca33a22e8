"""Periodic, atomic, checksummed training checkpoints with exact resume, in one process or sharded.

A checkpoint is a directory ``checkpoint-<step>`` holding:

- ``loramix_config.json`` and ``adapter_model.safetensors``: the adapter, in the format of
  :meth:`~loramix.model.MixtureModel.save_pretrained` (gathered from every rank when parameters are
  sharded, e.g. under FSDP2);
- ``optimizer.pt``: the state dicts of the optimizer, the scheduler and, with fp16, the gradient scaler
  (``torch.save`` of tensors and plain data, read back with ``weights_only=True``; under FSDP2 the
  optimizer state is gathered to full tensors keyed by parameter name);
- under DeepSpeed ZeRO, ``deepspeed/``: the engine's own checkpoint (``save_checkpoint``; every rank writes
  its optimizer partition and fp32 master weights, frozen base weights left out), read back by the engine's
  ``load_checkpoint`` (pickle, checked against the checksums first); ``optimizer.pt`` then holds the scheduler
  only;
- ``rank_state_<r>.json``: each rank's data-sampler state and random-generator states (JSON, no pickle);
- ``trainer_state.json``: where training stands (stage, steps, whether the step was finite, the run's
  fingerprint);
- ``checksums.json``: the sha256 of every other file (by path relative to the checkpoint), written last.

Everything is first written to a hidden temporary directory, each file fsynced, then the directory is
renamed into place and its parent fsynced, so a crash at any moment leaves either the previous good
checkpoints or the new complete one, never a half-written one under a checkpoint's name. Rotation renames a
checkpoint to a hidden name before deleting it, so a crash during deletion leaves nothing the lister counts.
Loading checks the checksums first: a truncated or altered file is named, and resuming with ``True`` falls
back to the newest intact checkpoint with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loramix.assets import sha256_file
from loramix.model import WEIGHTS_NAME, MixtureModel

PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
MANIFEST_NAME = "checksums.json"
DEEPSPEED_DIR = "deepspeed"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_TRASH_SUFFIX = ".trash"


class CheckpointError(RuntimeError):
    """A checkpoint is damaged (missing file, checksum mismatch) or cannot be restored; the message names it."""


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
    """Published checkpoints under ``directory`` (those with a ``trainer_state.json``), oldest first.

    Hidden directories (staging, or checkpoints being deleted by rotation) are never listed.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def verify_checkpoint(path: str | Path) -> list[str]:
    """The problems of a checkpoint's files against its ``checksums.json`` (empty when it is intact).

    Returns:
        One entry per bad file: ``"<name> (missing)"``, ``"<name> (checksum mismatch)"``, or the manifest
        itself when it is missing or unreadable.
    """
    directory = Path(path)
    manifest = directory / MANIFEST_NAME
    try:
        expected = json.loads(manifest.read_text())
        if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
            raise ValueError("not a mapping of file names to digests")
    except FileNotFoundError:
        return [f"{MANIFEST_NAME} (missing)"]
    except (ValueError, UnicodeDecodeError) as error:
        return [f"{MANIFEST_NAME} (unreadable: {error})"]
    problems = []
    for name, digest in sorted(expected.items()):
        file = directory / name
        if not file.is_file():
            problems.append(f"{name} (missing)")
        elif sha256_file(file) != digest:
            problems.append(f"{name} (checksum mismatch)")
    return problems


def latest_checkpoint(directory: str | Path, verify: bool = False) -> Path | None:
    """The most recent checkpoint under ``directory``, or ``None``.

    Args:
        directory: the run's output directory.
        verify: skip checkpoints whose files do not match their checksums, warning with the bad files.
    """
    checkpoints = list_checkpoints(directory)
    if not verify:
        return checkpoints[-1] if checkpoints else None
    for path in reversed(checkpoints):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        warnings.warn(
            f"checkpoint {path} is damaged ({', '.join(problems)}); falling back to an older one",
            stacklevel=2,
        )
    return None


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _is_zero3(param: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 partitions (its data lives in shards between forwards)."""
    return hasattr(param, "ds_id")


def model_is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2, composable parallelism) or partitioned by ZeRO-3."""
    return any(_is_sharded(param) or _is_zero3(param) for param in model.parameters())


def deepspeed_engine(module: torch.nn.Module | None) -> Any | None:
    """The DeepSpeed engine ``module`` is (what ``accelerator.prepare`` returns under DeepSpeed), or ``None``."""
    if module is None:
        return None
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return None
    return module if isinstance(module, DeepSpeedEngine) else None


def _zero3_adapter_parameters(model: MixtureModel) -> list[torch.nn.Parameter]:
    """The ZeRO-3 partitioned parameters behind :meth:`MixtureModel.adapter_state_dict` (base layers left out)."""
    params = []
    for layer in model.mixture_layers().values():
        params.extend(param for name, param in layer.named_parameters() if not name.startswith("base_layer."))
    for module in model._modules_to_save().values():
        params.extend(module.parameters())
    return [param for param in params if _is_zero3(param)]


def gather_adapter_state(model: MixtureModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors as full CPU tensors, gathered from every rank where they are sharded.

    Every rank must call it when the model is sharded (it is a collective there: FSDP2's DTensors, or
    DeepSpeed ZeRO-3's partitions, gathered for the copy).
    """
    partitioned = _zero3_adapter_parameters(model)
    context = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    state = {}
    with context:
        for key, value in model.adapter_state_dict().items():
            if _is_sharded(value):
                value = value.full_tensor()
            state[key] = value.detach().contiguous().cpu().clone()
    return state


def write_adapter(model: MixtureModel, state: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Write gathered adapter tensors and the adapter config with :meth:`MixtureModel.save_pretrained`."""
    model.save_pretrained(directory, state_dict=state)


def load_adapter(model: MixtureModel, path: str | Path) -> None:
    """Load an adapter weights file into ``model``, sharded parameters included; nothing changes on error.

    Raises:
        CheckpointError: the file is unreadable, or its keys or shapes do not fit the model.
    """
    file = Path(path)
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from None
    targets = model.adapter_state_dict()
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, target in targets.items():
        if tuple(target.shape) != tuple(state[key].shape):
            raise CheckpointError(f"{file}: {key} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in targets.items():
            value = state[key].to(dtype=target.dtype)
            if _is_sharded(target):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
            target.copy_(value)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict; full tensors keyed by parameter name when the model is sharded.

    A collective under sharding (every rank calls it; rank 0 receives the state, the others an empty dict).
    """
    if not model_is_sharded(model):
        return _inner(optimizer).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, _inner(optimizer), options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what :func:`optimizer_state` returned (sharding it again when the model is sharded)."""
    if not model_is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, _inner(optimizer), optim_state_dict=state, options=options)


class CheckpointManager:
    """Writes, rotates and reads the checkpoints of one run.

    In a distributed run every rank calls :meth:`save` and :meth:`load`; each writes or reads its own
    ``rank_state_<r>.json``, sharded tensors are gathered from every rank, and the main rank (0) writes the
    shared files and publishes the directory.

    Args:
        directory: the run's output directory; checkpoints go directly under it.
        keep_last: how many checkpoints to keep (older ones are deleted after a new one is published);
            ``None`` keeps all. The newest checkpoint taken after a finite step is kept in any case.
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
        root: torch.nn.Module | None = None,
    ) -> Path:
        """Write checkpoint ``checkpoint-<step>`` atomically and delete those beyond ``keep_last``.

        Args:
            step: the global optimizer step the checkpoint is taken after.
            model: the unwrapped mixture model (its parameters may be sharded).
            optimizer: the optimizer (its state is saved by rank 0, gathered first under sharding).
            scheduler: the learning-rate scheduler.
            trainer_state: JSON data saying where training stands (written by rank 0); a false
                ``"finite"`` entry marks a checkpoint taken after a skipped, non-finite step.
            rank_state: JSON data of this rank (sampler and RNG states).
            scaler: the fp16 gradient scaler, if any.
            root: the module the optimizer was prepared with, when it is not ``model`` (sharded state is
                gathered through it).

        Returns:
            The published checkpoint directory.
        """
        final = self.directory / f"{PREFIX}{step:08d}"
        staging = self.directory / f".{final.name}.tmp"
        engine = deepspeed_engine(root)
        adapter = gather_adapter_state(model)
        optimizer_data = None if engine is not None else optimizer_state(root if root is not None else model, optimizer)
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        self.barrier()
        _write_json(staging / _rank_state_name(self.rank), rank_state)
        if engine is not None:
            # every rank writes its own partition of the optimizer state and of the fp32 master weights
            engine.save_checkpoint(
                str(staging), tag=DEEPSPEED_DIR, client_state={}, save_latest=False, exclude_frozen_parameters=True
            )
        self.barrier()
        if self.rank == 0:
            write_adapter(model, adapter, staging)
            states: dict[str, Any] = {"scheduler": scheduler.state_dict()}
            if optimizer_data is not None:
                states["optimizer"] = optimizer_data
            if scaler is not None:
                states["scaler"] = scaler.state_dict()
            torch.save(states, staging / OPTIMIZER_NAME)
            _write_json(staging / STATE_NAME, {**trainer_state, "step": step})
            files = sorted(path for path in staging.rglob("*") if path.is_file())
            for path in files:
                _fsync_file(path)
            for path in staging.rglob("*"):
                if path.is_dir():
                    _fsync_dir(path)
            digests = {path.relative_to(staging).as_posix(): sha256_file(path) for path in files}
            _write_json(staging / MANIFEST_NAME, digests)
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

    @staticmethod
    def _finite(path: Path) -> bool:
        try:
            return bool(json.loads((path / STATE_NAME).read_text()).get("finite", True))
        except (OSError, ValueError):
            return False

    def _rotate(self) -> None:
        for stale in self.directory.glob(f".{PREFIX}*{_TRASH_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep_last is None:
            return
        checkpoints = list_checkpoints(self.directory)
        keep = set(checkpoints[-self.keep_last :])
        last_finite = next((path for path in reversed(checkpoints) if self._finite(path)), None)
        if last_finite is not None:
            keep.add(last_finite)
        for old in checkpoints:
            if old in keep:
                continue
            trash = old.with_name(f".{old.name}{_TRASH_SUFFIX}")
            os.replace(old, trash)
            _fsync_dir(self.directory)
            shutil.rmtree(trash)

    def load(
        self,
        path: str | Path,
        model: MixtureModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None = None,
        root: torch.nn.Module | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the adapter, optimizer, scheduler (and fp16 gradient scaler) from a checkpoint.

        Every file is checked against the checksums before anything is restored. ``root`` is as in
        :meth:`save`.

        Returns:
            ``(trainer_state, rank_state)`` as given to :meth:`save` (this rank's).

        Raises:
            FileNotFoundError: the checkpoint is incomplete or has no state for this rank.
            CheckpointError: a file is missing, altered or truncated (named in the message).
        """
        directory = Path(path)
        if not (directory / STATE_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {STATE_NAME})")
        rank_file = directory / _rank_state_name(self.rank)
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{directory} has no state for rank {self.rank}: resume with the number of processes it was saved with"
            )
        problems = verify_checkpoint(directory)
        if problems:
            raise CheckpointError(f"checkpoint {directory} is damaged: {', '.join(problems)}")
        try:
            saved = torch.load(directory / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        except Exception as error:  # a pickle error of any kind: name the file
            raise CheckpointError(f"{directory / OPTIMIZER_NAME} cannot be read: {error}") from None
        engine = deepspeed_engine(root)
        written_by_deepspeed = (directory / DEEPSPEED_DIR).is_dir()
        if (engine is not None) != written_by_deepspeed:
            raise CheckpointError(
                f"{directory} was written {'under' if written_by_deepspeed else 'without'} DeepSpeed and this run "
                f"{'is not' if engine is None else 'is'}: resume with the engine it was saved with"
            )
        if engine is not None:
            loaded, _ = engine.load_checkpoint(
                str(directory),
                tag=DEEPSPEED_DIR,
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {directory / DEEPSPEED_DIR}")
        else:
            load_adapter(model, directory / WEIGHTS_NAME)
            load_optimizer_state(root if root is not None else model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        trainer_state = json.loads((directory / STATE_NAME).read_text())
        return trainer_state, json.loads(rank_file.read_text())
