"""The training loop on Hugging Face accelerate: stages, accumulation, clipping, logs, checkpoints, resume."""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm

from loramix.model import MixtureModel
from loramix.train.batches import Batch, BatchSource
from loramix.train.checkpoint import STATE_NAME, CheckpointManager, latest_checkpoint
from loramix.train.logs import RunLogger
from loramix.train.params import build_optimizer, select_trainable
from loramix.train.rng import get_rng_state, seed_everything, set_rng_state
from loramix.train.schedules import make_scheduler
from loramix.train.settings import RecipeError, StageSettings, TrainingSettings

BatchFactory = Callable[[StageSettings, int, int], BatchSource]
Evaluator = Callable[[MixtureModel], dict[str, dict[str, float]]]
ADAPTER_DIR = "adapter"


def _distributed_on_cpu() -> bool:
    """Launched as several processes (torchrun, accelerate launch) on a machine without CUDA."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` becomes ``bf16`` on a CUDA device that supports it and ``no`` elsewhere."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@dataclass
class TrainerState:
    """Where training stands; callbacks receive it after every optimizer step.

    Attributes:
        stage_index: index of the current stage.
        stage_name: its name.
        stage_step: optimizer steps done in the current stage.
        global_step: optimizer steps done over all stages.
        history: one record per optimizer step (``step``, ``stage``, ``loss``, ``lr`` (the largest of the
            parameter groups), ``examples_per_s`` and the mean auxiliary losses as ``aux_<name>``),
            averaged over micro-batches and processes.
        metrics: the latest validation metrics by task (e.g. ``{"sst2": {"accuracy": 0.9, "loss": 0.3}}``).
    """

    stage_index: int = 0
    stage_name: str = ""
    stage_step: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


class Trainer:
    """Trains a :class:`~loramix.model.MixtureModel` with AdamW over its trainable parameters.

    Works in one process and under ``accelerate launch`` / ``torchrun`` (DDP): each rank reads its own
    shard of the data from the :class:`~loramix.train.batches.BatchSource` the factory gives it, gradients
    are averaged across ranks, and logged losses are averaged over ranks too. Each step runs
    ``gradient_accumulation_steps`` micro-batches (gradients synchronised on the last only), clips the
    gradient norm, steps the optimizer and the schedule.

    Args:
        model: the mixture model (its ``forward`` takes the batch dict, ``task_ids`` included, and returns
            an output whose ``loss`` includes the auxiliary losses).
        settings: how to train.
        batches: ``batches(stage, rank, world_size)`` returns the batch source of one rank for a stage.
        output_dir: where logs, checkpoints and the final adapter go.
        stages: the stages in order; ``None`` trains one stage with ``settings``.
        evaluator: ``evaluator(model)`` returns validation metrics by task; run on the main process every
            ``eval_every`` steps and at the end of each stage, with the model in eval mode.
        callbacks: each is called as ``callback(state)`` after every optimizer step (after any checkpoint
            of that step).
    """

    def __init__(
        self,
        model: MixtureModel,
        settings: TrainingSettings,
        batches: BatchFactory,
        output_dir: str | Path,
        stages: Sequence[StageSettings] | None = None,
        evaluator: Evaluator | None = None,
        callbacks: Sequence[Callable[[TrainerState], None]] = (),
    ) -> None:
        self.model = model
        self.settings = settings
        self.batches = batches
        self.output_dir = Path(output_dir)
        self.stages = [stage.resolved(settings) for stage in (stages or [StageSettings()])]
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise RecipeError(f"stages: names must be distinct, got {names}")
        self.evaluator = evaluator
        self.callbacks = list(callbacks)
        self.state = TrainerState()
        self.candidates = [name for name, param in model.named_parameters() if param.requires_grad]
        self.accelerator = Accelerator(
            cpu=settings.use_cpu or _distributed_on_cpu(),
            mixed_precision=resolve_mixed_precision(settings.mixed_precision),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=settings.find_unused_parameters)],
        )
        self.checkpoints = CheckpointManager(
            self.output_dir,
            keep_last=settings.keep_last,
            rank=self.accelerator.process_index,
            barrier=self.accelerator.wait_for_everyone,
        )
        self.logger = RunLogger(self.output_dir) if self.accelerator.is_main_process else None

    # ------------------------------------------------------------------ public
    def train(self, resume_from: str | Path | bool | None = None) -> TrainerState:
        """Run every stage (or what is left of them after a checkpoint) and save the final adapter.

        Afterwards the parameters that were trainable before training are trainable again.

        Args:
            resume_from: a checkpoint directory, ``True`` for the latest one under ``output_dir`` (a fresh
                start when there is none), or ``None``/``False`` for a fresh start.

        Returns:
            The final :class:`TrainerState`.
        """
        seed_everything(self.settings.seed)
        if self.settings.gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        checkpoint = self._resolve_resume(resume_from)
        start_stage = 0
        if checkpoint is not None:
            start_stage = self._read_stage_index(checkpoint)
        offset = sum(stage.max_steps for stage in self.stages[:start_stage])
        for index in range(start_stage, len(self.stages)):
            self._run_stage(index, offset, checkpoint if index == start_stage else None)
            offset += self.stages[index].max_steps
        candidates = set(self.candidates)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in candidates)
        if self.accelerator.is_main_process:
            self.model.save_pretrained(self.output_dir / ADAPTER_DIR)
            self.logger.close()
        self.accelerator.wait_for_everyone()
        return self.state

    # ------------------------------------------------------------------ stages
    def _resolve_resume(self, resume_from: str | Path | bool | None) -> Path | None:
        if resume_from is None or resume_from is False:
            return None
        if resume_from is True:
            return latest_checkpoint(self.output_dir)
        path = Path(resume_from)
        if not path.is_dir():
            raise FileNotFoundError(f"cannot resume: checkpoint {path} does not exist")
        return path

    def _read_stage_index(self, checkpoint: Path) -> int:
        saved = json.loads((checkpoint / STATE_NAME).read_text())
        names = [stage.name for stage in self.stages]
        if saved.get("stages") != names:
            raise RecipeError(f"checkpoint {checkpoint} was written for stages {saved.get('stages')}, not {names}")
        return int(saved["stage_index"])

    def _start_stage(self, stage: StageSettings) -> None:
        select_trainable(self.model, self.candidates, stage)
        hook = getattr(self.model.method, "start_stage", None)
        if hook is not None:
            hook(self.model, stage.options)
        elif stage.options:
            raise RecipeError(
                f"stages[{stage.name}].options={stage.options!r}: method {self.model.mixture_config.method!r} "
                "takes no stage options (it has no start_stage)"
            )

    def _run_stage(self, index: int, offset: int, checkpoint: Path | None) -> None:
        stage = self.stages[index]
        accelerator = self.accelerator
        self._start_stage(stage)
        optimizer = build_optimizer(self.model, stage, self.settings)
        scheduler = make_scheduler(
            optimizer, stage.schedule, stage.warmup_steps, stage.max_steps, self.settings.min_lr_ratio
        )
        wrapped, optimizer = accelerator.prepare(self.model, optimizer)
        source = self.batches(stage, accelerator.process_index, accelerator.num_processes)
        self.state.stage_index, self.state.stage_name, self.state.stage_step = index, stage.name, 0
        if checkpoint is not None:
            trainer_state, rank_state = self.checkpoints.load(
                checkpoint, self.model, optimizer, scheduler, scaler=accelerator.scaler
            )
            source.load_state_dict(rank_state["sampler"])
            set_rng_state(rank_state["rng"])
            self.state.stage_step = int(trainer_state["stage_step"])
            self.state.metrics = trainer_state.get("metrics", {})
        self.state.global_step = offset + self.state.stage_step
        stream = _endless(source)
        progress = tqdm(
            total=stage.max_steps,
            initial=self.state.stage_step,
            desc=stage.name,
            disable=not (accelerator.is_main_process and self.settings.progress_bar),
            dynamic_ncols=True,
        )
        examples, started = 0, time.perf_counter()
        wrapped.train()
        while self.state.stage_step < stage.max_steps:
            record, count = self._step(wrapped, optimizer, scheduler, stream, stage.max_grad_norm)
            self.state.stage_step += 1
            self.state.global_step += 1
            examples += count
            rate = examples / max(time.perf_counter() - started, 1e-9)
            record = {"step": self.state.global_step, "stage": stage.name, **record, "examples_per_s": rate}
            self.state.history.append(record)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{rate:.1f}")
            done = self.state.stage_step == stage.max_steps
            if self.logger is not None and (self.state.stage_step % self.settings.log_every == 0 or done):
                self.logger.log("train", record)
                examples, started = 0, time.perf_counter()
            every = self.settings.eval_every
            if done or (every and self.state.stage_step % every == 0):
                self._evaluate(wrapped)
            every = self.settings.save_every
            if done or (every and self.state.stage_step % every == 0):
                self._save(index, optimizer, scheduler, source)
            for callback in self.callbacks:
                callback(self.state)
        progress.close()
        accelerator.free_memory()
        del wrapped, optimizer
        gc.collect()

    # ------------------------------------------------------------------ one step
    def _step(
        self,
        wrapped: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        stream: Iterator[Batch],
        max_grad_norm: float | None,
    ) -> tuple[dict[str, Any], int]:
        accelerator = self.accelerator
        accumulation = self.settings.gradient_accumulation_steps
        losses: list[torch.Tensor] = []
        aux: dict[str, list[torch.Tensor]] = {}
        count = 0
        for micro in range(accumulation):
            batch = {key: value.to(accelerator.device) for key, value in next(stream).items()}
            count += int(batch["task_ids"].shape[0]) * accelerator.num_processes
            synced = micro == accumulation - 1
            with nullcontext() if synced else accelerator.no_sync(wrapped):
                outputs = wrapped(**batch)
                if outputs["loss"] is None:
                    raise ValueError("the model returned no loss: batches must carry labels")
                accelerator.backward(outputs["loss"] / accumulation)
            losses.append(outputs["loss"].detach().float())
            for name, value in self.model.last_aux_losses.items():
                aux.setdefault(name, []).append(value.detach().float())
        if max_grad_norm:
            params = [param for param in self.model.parameters() if param.requires_grad]
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        self.model.step_end()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        means = {"loss": torch.stack(losses).mean()}
        means.update({f"aux_{name}": torch.stack(values).mean() for name, values in aux.items()})
        names = sorted(means)
        reduced = accelerator.reduce(torch.stack([means[name] for name in names]), reduction="mean")
        record = {name: float(value) for name, value in zip(names, reduced.tolist(), strict=True)}
        record["lr"] = max(scheduler.get_last_lr())
        return record, count

    def _evaluate(self, wrapped: torch.nn.Module) -> None:
        if self.evaluator is None:
            return
        if self.accelerator.is_main_process:
            wrapped.eval()
            with torch.no_grad():
                self.state.metrics = self.evaluator(self.model)
            wrapped.train()
            flat = {
                f"{task}/{key}": value for task, scores in self.state.metrics.items() for key, value in scores.items()
            }
            self.logger.log("eval", {"step": self.state.global_step, "stage": self.state.stage_name, **flat})
        self.accelerator.wait_for_everyone()

    def _save(
        self,
        index: int,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        source: BatchSource,
    ) -> None:
        trainer_state = {
            "stage_index": index,
            "stage_step": self.state.stage_step,
            "stages": [stage.name for stage in self.stages],
            "metrics": self.state.metrics,
        }
        rank_state = {"sampler": source.state_dict(), "rng": get_rng_state()}
        self.checkpoints.save(
            self.state.global_step,
            self.model,
            optimizer,
            scheduler,
            trainer_state,
            rank_state,
            scaler=self.accelerator.scaler,
        )


def _endless(source: BatchSource) -> Iterator[Batch]:
    """Batches of ``source`` epoch after epoch.

    Raises:
        ValueError: an epoch (after the first, possibly resumed one) yields no batch.
    """
    empty_epochs = 0
    while True:
        produced = False
        for batch in source:
            produced = True
            yield batch
        empty_epochs = 0 if produced else empty_epochs + 1
        if empty_epochs >= 2:
            raise ValueError("the batch source yields no batch: it has fewer examples than one batch")
