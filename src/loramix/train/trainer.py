"""The training loop on Hugging Face accelerate: stages, accumulation, clipping, logs, checkpoints, resume.

One objective whatever the layout: the loss of an optimizer step is computed over the step's whole global
batch (every micro-batch of every process). For token labels (causal LMs, ``-100`` ignored) it is the sum of
the token losses divided by the number of target tokens of the global batch; for one label per row
(classification) it is the mean over the global batch's rows; the method's auxiliary losses enter with
the weight of their micro-batch's rows in the global batch. So one process with batch 8, batch 4 with
accumulation 2 and two processes with batch 4 train the same weights.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, broadcast_object_list
from tqdm.auto import tqdm

from loramix.model import MixtureModel
from loramix.runs.batches import Batch, BatchSource
from loramix.runs.schedules import make_scheduler
from loramix.runs.settings import RecipeError, StageSettings, TrainingSettings
from loramix.train.checkpoint import (
    STATE_NAME,
    CheckpointError,
    CheckpointManager,
    gather_adapter_state,
    list_checkpoints,
    model_is_sharded,
    verify_checkpoint,
    write_adapter,
)
from loramix.train.logs import RunLogger
from loramix.train.outdir import check_trainer_output_dir, clear_run
from loramix.train.params import build_run_optimizer, select_trainable, stage_selection, start_stage_lrs
from loramix.train.rng import get_rng_state, seed_everything, set_rng_state

BatchFactory = Callable[[StageSettings, int, int], BatchSource]
Evaluator = Callable[[MixtureModel], dict[str, dict[str, float]]]
ADAPTER_DIR = "adapter"
IGNORE_INDEX = -100
# Optimizer steps in a row with a non-finite loss or gradient norm after which a run stops.
MAX_NONFINITE_STEPS = 5


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm for too many optimizer steps in a row."""


class _PlainOutputs(torch.nn.Module):
    """The module accelerate prepares: the mixture model returning a plain dict of ``logits`` (and ``loss``).

    DDP rebuilds a model output from its tensors after the forward, which fails for a transformers output
    that gained an ``aux_losses`` entry; a plain dict passes. Other attributes (``_no_split_modules``,
    ``get_input_embeddings`` ...) are those of the mixture model, so FSDP wraps the same layers.
    """

    def __init__(self, mixture: MixtureModel) -> None:
        super().__init__()
        self.mixture = mixture

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "mixture":
                raise
            return getattr(self.mixture, name)

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        outputs = self.mixture(**batch)
        plain = {"logits": outputs["logits"]}
        if outputs.get("loss") is not None:
            plain["loss"] = outputs["loss"]
        return plain


def _distributed_on_cpu() -> bool:
    """Launched as several processes (torchrun, accelerate launch) on a machine without CUDA."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` becomes ``bf16`` on a CUDA device that supports it and ``no`` elsewhere."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(settings: TrainingSettings, max_grad_norm: float | None = None) -> Accelerator:
    """The run's :class:`~accelerate.Accelerator`, honouring the engine ``accelerate launch`` asked for.

    ``accelerate launch --config_file CONFIG`` tells the processes which engine to use through environment
    variables. On a CUDA machine accelerate sets itself up from them. On the CPU (``use_cpu`` or no CUDA),
    accelerate would silently fall back to DDP whatever the config says; loramix instead runs FSDP2 over
    gloo (the config's ``fsdp_version: 2``) and refuses what it cannot run there. Under DeepSpeed (ZeRO-2
    or ZeRO-3, on CUDA or on the CPU with gloo) the recipe decides the DeepSpeed config's micro-batch size,
    accumulation and clipping; an explicit, different value there is refused.

    Args:
        settings: the run's training settings.
        max_grad_norm: the clipping of every stage (DeepSpeed's ``gradient_clipping``); ``None``: the settings'.

    Raises:
        RecipeError: the launch asks for an engine loramix cannot honour (FSDP1 on the CPU; DeepSpeed
            without the ``deepspeed`` package or with settings that contradict the recipe, see
            :func:`check_deepspeed_stages` for what the stages must satisfy).
    """
    mixed_precision = resolve_mixed_precision(settings.mixed_precision)
    cpu = settings.use_cpu or _distributed_on_cpu() or not torch.cuda.is_available()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=settings.find_unused_parameters)]
    options = {
        "mixed_precision": mixed_precision,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "kwargs_handlers": handlers,
    }
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        norm = settings.max_grad_norm if max_grad_norm is None else max_grad_norm
        return _deepspeed_accelerator(settings, mixed_precision, options, float(norm or 0.0))
    fsdp = _env_flag("ACCELERATE_USE_FSDP")
    if not (fsdp and cpu):
        return Accelerator(cpu=settings.use_cpu or _distributed_on_cpu(), **options)
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise RecipeError(
            f"accelerate launch asks for FSDP version {plugin.fsdp_version}, which needs a GPU; on the CPU loramix "
            "runs FSDP2: set fsdp_version: 2 in the accelerate config (recipes/accelerate/fsdp.yaml)"
        )
    accelerator = Accelerator(cpu=True, **options)
    if accelerator.num_processes > 1:
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        from accelerate.state import PartialState

        # AcceleratorState copies PartialState's engine whenever it is instantiated again: set both.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def _deepspeed_accelerator(
    settings: TrainingSettings, mixed_precision: str, options: dict[str, Any], max_grad_norm: float
) -> Accelerator:
    """The Accelerator of a DeepSpeed launch (ZeRO-2 or ZeRO-3), after refusing what loramix cannot honour."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise RecipeError(
            f"accelerate launch asks for DeepSpeed, which cannot be imported ({error}): "
            "pip install 'loramix[deepspeed]' (DS_BUILD_OPS=0 needs no compiler), or launch with "
            "recipes/accelerate/fsdp.yaml or ddp.yaml"
        ) from None
    from accelerate.utils import DeepSpeedPlugin

    on_cpu = not torch.cuda.is_available()
    if settings.use_cpu and not on_cpu:
        raise RecipeError(
            "training.use_cpu is true but accelerate launch asks for DeepSpeed on a machine with CUDA: DeepSpeed "
            "would run on the GPU; drop use_cpu, or launch with recipes/accelerate/ddp.yaml"
        )
    if on_cpu and mixed_precision != "no":
        raise RecipeError(
            f"training.mixed_precision={mixed_precision!r} under DeepSpeed on the CPU: loramix runs DeepSpeed in "
            "float32 there; set mixed_precision: 'no' (or 'auto')"
        )
    plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (2, 3):
        raise RecipeError(
            f"accelerate launch asks for DeepSpeed ZeRO stage {stage}: loramix supports ZeRO stages 2 and 3 "
            "(recipes/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml)"
        )
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise RecipeError(
                f"the DeepSpeed config defines {key!r}: loramix builds the optimizer and schedule from the recipe "
                "(training and stages); remove it from the DeepSpeed config"
            )
    for key in ("offload_optimizer", "offload_param"):
        device = str(config.get("zero_optimization", {}).get(key, {}).get("device", "none")).lower()
        if device not in ("none", "null"):
            raise RecipeError(
                f"the DeepSpeed config asks for zero_optimization.{key}.device={device!r}: loramix does not "
                "support DeepSpeed offloading (not verified); set it to none"
            )
    for key in ("fp16", "bf16"):
        if config.get(key, {}).get("enabled", False) not in (False, "auto"):
            raise RecipeError(
                f"the DeepSpeed config enables {key}: set precision in the recipe (training.mixed_precision) instead"
            )
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = {
        "gradient_accumulation_steps": (settings.gradient_accumulation_steps, "training.gradient_accumulation_steps"),
        "train_micro_batch_size_per_gpu": (settings.batch_size, "training.batch_size"),
        "train_batch_size": (
            settings.batch_size * settings.gradient_accumulation_steps * processes,
            f"batch_size x gradient_accumulation_steps x {processes} processes",
        ),
        "gradient_clipping": (max_grad_norm, "max_grad_norm, 0: none"),
    }
    for key, (value, source) in wanted.items():
        given = config.get(key, "auto")
        if given != "auto" and not (isinstance(given, (int, float)) and float(given) == float(value)):
            raise RecipeError(
                f"the DeepSpeed config sets {key}: {given} but the recipe asks for {value} ({source}); set it to "
                "auto, or remove it, in the accelerate/DeepSpeed config: the recipe decides"
            )
        config[key] = value
    if on_cpu:
        # accelerate's DeepSpeed path needs cpu=False; without CUDA it would pick no backend and count one process.
        from accelerate.utils import InitProcessGroupKwargs

        options = {**options, "kwargs_handlers": [*options["kwargs_handlers"], InitProcessGroupKwargs(backend="gloo")]}
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().distributed_type == DistributedType.DEEPSPEED:
        # A run before this one in the same process (its trainer is done) left its DeepSpeed state, which
        # accelerate would reuse with that run's batch settings: start from this run's config instead (the
        # process group stays).
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=False, deepspeed_plugin=plugin, **options)


def check_deepspeed_stages(stages: Sequence[StageSettings], candidates: list[str]) -> None:
    """Refuse stage layouts that DeepSpeed ZeRO cannot train as the recipe asks.

    DeepSpeed clips inside its engine with one ``gradient_clipping`` for the whole run, and ZeRO updates a
    flattened partition of every parameter the optimizer holds, so a parameter frozen by a stage would still
    be moved (by weight decay and AdamW's moments).

    Raises:
        RecipeError: stages ask for different ``max_grad_norm``, or a stage freezes some of the trainable
            parameters.
    """
    norms = sorted({float(stage.max_grad_norm or 0.0) for stage in stages})
    if len(norms) > 1:
        raise RecipeError(
            f"stages ask for max_grad_norm {norms} (0: none): DeepSpeed clips with one gradient_clipping for the "
            "whole run; give every stage the same max_grad_norm"
        )
    for stage in stages:
        if len(stage_selection(candidates, stage)) != len(candidates):
            raise RecipeError(
                f"stages[{stage.name}] freezes some trainable parameters, which loramix does not support under "
                "DeepSpeed (ZeRO would still move them through weight decay and AdamW's moments); use FSDP "
                "(recipes/accelerate/fsdp.yaml) or DDP with training.find_unused_parameters: true"
            )


@dataclass
class TrainerState:
    """Where training stands; callbacks receive it after every optimizer step.

    Attributes:
        stage_index: index of the current stage.
        stage_name: its name.
        stage_step: optimizer steps done in the current stage.
        global_step: optimizer steps done over all stages.
        history: one record per optimizer step (``step``, ``stage``, ``loss`` (the step's objective over
            the global batch, auxiliary losses included), ``lr`` (the largest of the parameter groups),
            ``grad_norm`` (before clipping), ``skipped`` (the step was non-finite and not applied),
            ``examples_per_s`` and the auxiliary losses as ``aux_<name>``, weighted by rows over the global
            batch).
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

    Works in one process and under ``accelerate launch`` / ``torchrun`` (DDP, and FSDP2 or DeepSpeed ZeRO-2/3
    through an accelerate config; under DeepSpeed the engine steps, clips and checkpoints): each rank reads
    its own shard of the data from the :class:`~loramix.runs.batches.BatchSource` the factory gives it.
    Each step runs
    ``gradient_accumulation_steps`` micro-batches under ``accelerator.accumulate`` (gradients synchronised
    on the last only) and optimises one objective over the global batch (see the module's docstring),
    clips the gradient norm through the accelerator, steps the optimizer and the schedule. The model and
    one optimizer are prepared once for the whole run; a stage changes which parameters train and their
    learning rates, and starts AdamW's moments afresh.

    A step whose loss or gradient norm is not finite is not applied (logged with ``skipped: true``);
    ``max_nonfinite_steps`` of them in a row stop the run with :class:`NonFiniteError`. The newest checkpoint
    taken after a finite step is never rotated away.

    Args:
        model: the mixture model (its ``forward`` takes the batch dict, ``task_ids`` included, and returns
            an output with ``logits`` and, given labels, a ``loss`` that includes the auxiliary losses).
        settings: how to train.
        batches: ``batches(stage, rank, world_size)`` returns the batch source of one rank for a stage.
        output_dir: where logs, checkpoints and the final adapter go.
        stages: the stages in order; ``None`` trains one stage with ``settings``.
        evaluator: ``evaluator(model)`` returns validation metrics by task; run every ``eval_every`` steps
            and at the end of each stage, with the model in eval mode, on the main process (on every rank
            when parameters are sharded, since their forward needs every rank).
        callbacks: each is called as ``callback(state)`` after every optimizer step (after any checkpoint
            of that step).
        fingerprint: JSON data identifying the run (config, data hashes ...), saved in every checkpoint;
            resuming from a checkpoint whose fingerprint differs is refused, naming the keys that differ.
        max_nonfinite_steps: non-finite steps in a row that stop the run.
        overwrite: a fresh start may replace another run's files in ``output_dir`` (its ``adapter/``,
            checkpoints, ``log.jsonl``, ``tensorboard/``; other files are left alone). Without it a fresh
            start into such a directory is refused before anything is written.

    Raises:
        RecipeError: stage names repeat, or the launch asks for an engine loramix cannot honour.
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
        fingerprint: dict[str, Any] | None = None,
        max_nonfinite_steps: int = MAX_NONFINITE_STEPS,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps={max_nonfinite_steps!r} must be an integer >= 1")
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
        self.fingerprint = None if fingerprint is None else json.loads(json.dumps(fingerprint))
        self.max_nonfinite_steps = max_nonfinite_steps
        self.overwrite = overwrite
        self.state = TrainerState()
        self.candidates = [name for name, param in model.named_parameters() if param.requires_grad]
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            check_deepspeed_stages(self.stages, self.candidates)
        self.accelerator = make_accelerator(settings, max_grad_norm=self.stages[0].max_grad_norm)
        self.checkpoints = CheckpointManager(
            self.output_dir,
            keep_last=settings.keep_last,
            rank=self.accelerator.process_index,
            barrier=self.accelerator.wait_for_everyone,
        )
        self.logger: RunLogger | None = None  # opened by train(), once the output directory is checked
        config = getattr(model, "config", None)
        self._encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self._nonfinite = 0

    # ------------------------------------------------------------------ public
    def train(self, resume_from: str | Path | bool | None = None) -> TrainerState:
        """Run every stage (or what is left of them after a checkpoint) and save the final adapter.

        Afterwards the parameters that were trainable before training are trainable again. Under FSDP the
        model's parameters stay sharded; the saved adapter (``output_dir/adapter``) holds the full tensors.

        Args:
            resume_from: a checkpoint directory, ``True`` for the newest intact one under ``output_dir`` (a
                fresh start when there is none; damaged ones are skipped with a warning naming their
                files), or ``None``/``False`` for a fresh start.

        Returns:
            The final :class:`TrainerState`.

        Raises:
            CheckpointError: the checkpoint to resume from is damaged, or none under ``output_dir`` is intact.
            RecipeError: the checkpoint was written for other stages or another run (fingerprint); a fresh
                start into a directory holding another run's files without ``overwrite`` (nothing written).
            NonFiniteError: ``max_nonfinite_steps`` steps in a row were not finite.
        """
        seed_everything(self.settings.seed)
        checkpoint = self._resolve_resume(resume_from)
        self._claim_output_dir(fresh=checkpoint is None, resumed=resume_from not in (None, False))
        start_stage = 0
        if checkpoint is not None:
            start_stage = self._check_resume(checkpoint)
        self._check_layout()
        if self.settings.gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        candidates = set(self.candidates)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in candidates)
        optimizer = build_run_optimizer(self.model, self.candidates, self.stages, self.settings)
        wrapped, optimizer = self.accelerator.prepare(_PlainOutputs(self.model), optimizer)
        try:
            offset = sum(stage.max_steps for stage in self.stages[:start_stage])
            for index in range(start_stage, len(self.stages)):
                self._run_stage(index, offset, checkpoint if index == start_stage else None, wrapped, optimizer)
                offset += self.stages[index].max_steps
        finally:
            for name, param in self.model.named_parameters():
                param.requires_grad_(name in candidates)
        adapter = gather_adapter_state(self.model)
        if self.accelerator.is_main_process:
            write_adapter(self.model, adapter, self.output_dir / ADAPTER_DIR)
            self.logger.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.free_memory()
        return self.state

    # ------------------------------------------------------------------ output directory, resume and layout checks
    def _claim_output_dir(self, fresh: bool, resumed: bool) -> None:
        """Check the output directory on the main process (every rank raises its error), then, for a fresh
        start with ``overwrite``, remove the other run's files; open the run log."""
        problem = None
        if self.accelerator.is_main_process:
            try:
                # resume_from=True with no checkpoint yet continues the same run from its start
                check_trainer_output_dir(self.output_dir, fresh=fresh and not resumed, overwrite=self.overwrite)
            except RecipeError as error:
                problem = str(error)
        if self.accelerator.num_processes > 1:
            problem = broadcast_object_list([problem])[0]
        if problem is not None:
            raise RecipeError(problem)
        if self.accelerator.is_main_process:
            if fresh and self.overwrite:
                clear_run(self.output_dir)
            self.logger = RunLogger(self.output_dir)
        self.accelerator.wait_for_everyone()

    def _resolve_resume(self, resume_from: str | Path | bool | None) -> Path | None:
        if resume_from is None or resume_from is False:
            return None
        if resume_from is True:
            checkpoints = list_checkpoints(self.output_dir)
            if not checkpoints:
                if self.accelerator.is_main_process:
                    warnings.warn(
                        f"no checkpoint under {self.output_dir} to resume from: starting afresh", stacklevel=3
                    )
                return None
            damaged = []
            for path in reversed(checkpoints):
                problems = verify_checkpoint(path)
                if not problems:
                    if damaged and self.accelerator.is_main_process:
                        warnings.warn(
                            f"resuming from {path.name}: newer checkpoints are damaged ({'; '.join(damaged)})",
                            stacklevel=3,
                        )
                    return path
                damaged.append(f"{path.name}: {', '.join(problems)}")
            raise CheckpointError(f"no intact checkpoint under {self.output_dir}: {'; '.join(damaged)}")
        path = Path(resume_from)
        if not path.is_dir():
            raise FileNotFoundError(f"cannot resume: checkpoint {path} does not exist")
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(f"cannot resume: checkpoint {path} is damaged: {', '.join(problems)}")
        return path

    def _check_resume(self, checkpoint: Path) -> int:
        """The stage index to resume at, after checking the checkpoint belongs to this run."""
        saved = json.loads((checkpoint / STATE_NAME).read_text())
        names = [stage.name for stage in self.stages]
        if saved.get("stages") != names:
            raise RecipeError(f"checkpoint {checkpoint} was written for stages {saved.get('stages')}, not {names}")
        theirs = saved.get("fingerprint")
        if self.fingerprint is not None and theirs is not None and theirs != self.fingerprint:
            if isinstance(theirs, dict):
                keys = sorted(
                    key for key in {*theirs, *self.fingerprint} if theirs.get(key) != self.fingerprint.get(key)
                )
            else:
                keys = ["fingerprint"]
            raise RecipeError(
                f"cannot resume from {checkpoint}: the run changed since it was written ({', '.join(keys)} differ); "
                "start a new output directory, or resume with the run as it was"
            )
        return int(saved["stage_index"])

    def _check_layout(self) -> None:
        """Refuse, before any step, a stage layout DDP cannot run."""
        accelerator = self.accelerator
        if accelerator.distributed_type == DistributedType.FSDP or accelerator.num_processes == 1:
            return
        if self.settings.find_unused_parameters:
            return
        for stage in self.stages:
            if len(stage_selection(self.candidates, stage)) != len(self.candidates):
                raise RecipeError(
                    f"stages[{stage.name}] freezes some trainable parameters, which DDP over "
                    f"{accelerator.num_processes} processes only allows with training.find_unused_parameters: true"
                )

    # ------------------------------------------------------------------ stages
    def _start_stage(self, stage: StageSettings) -> None:
        """Hand the stage's ``options`` to the method's ``start_stage(model, options)``.

        Called after the stage's parameters are selected and, on a resume, after the checkpoint is restored,
        so what the hook reads from the model (MoA's held experts) is the restored state.
        """
        hook = getattr(self.model.method, "start_stage", None)
        if hook is not None:
            hook(self.model, stage.options)
        elif stage.options:
            raise RecipeError(
                f"stages[{stage.name}].options={stage.options!r}: method {self.model.mixture_config.method!r} "
                "takes no stage options (it has no start_stage)"
            )

    def _run_stage(
        self,
        index: int,
        offset: int,
        checkpoint: Path | None,
        wrapped: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        stage = self.stages[index]
        accelerator = self.accelerator
        select_trainable(self.model, self.candidates, stage)
        inner = _torch_optimizer(optimizer)
        start_stage_lrs(inner, stage, index)
        scheduler = make_scheduler(
            inner, stage.schedule, stage.warmup_steps, stage.max_steps, self.settings.min_lr_ratio
        )
        source = self.batches(stage, accelerator.process_index, accelerator.num_processes)
        self.state.stage_index, self.state.stage_name, self.state.stage_step = index, stage.name, 0
        if checkpoint is not None:
            trainer_state, rank_state = self.checkpoints.load(
                checkpoint, self.model, optimizer, scheduler, scaler=accelerator.scaler, root=wrapped
            )
            source.load_state_dict(rank_state["sampler"])
            set_rng_state(rank_state["rng"])
            self.state.stage_step = int(trainer_state["stage_step"])
            self.state.metrics = trainer_state.get("metrics", {})
            self._nonfinite = int(trainer_state.get("nonfinite_streak", 0))
        self._start_stage(stage)
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
            if self.logger is not None and (
                self.state.stage_step % self.settings.log_every == 0 or done or record["skipped"]
            ):
                self.logger.log("train", record)
                examples, started = 0, time.perf_counter()
            self._count_nonfinite(record)
            every = self.settings.eval_every
            if done or (every and self.state.stage_step % every == 0):
                self._evaluate(wrapped)
            every = self.settings.save_every
            if done or (every and self.state.stage_step % every == 0):
                self._save(index, wrapped, optimizer, scheduler, source, finite=not record["skipped"])
            for callback in self.callbacks:
                callback(self.state)
        progress.close()

    def _count_nonfinite(self, record: dict[str, Any]) -> None:
        if not record["skipped"]:
            self._nonfinite = 0
            return
        self._nonfinite += 1
        step = record["step"]
        if self.accelerator.is_main_process:
            warnings.warn(
                f"step {step}: non-finite loss {record['loss']} or gradient norm {record['grad_norm']}; "
                "the optimizer step was skipped",
                stacklevel=3,
            )
        if self._nonfinite >= self.max_nonfinite_steps:
            finite = [path for path in list_checkpoints(self.output_dir) if _finite_checkpoint(path)]
            where = f"; the last checkpoint of a finite step is {finite[-1]}" if finite else ""
            raise NonFiniteError(
                f"training stopped at step {step} (stage {record['stage']!r}): {self._nonfinite} optimizer steps in "
                f"a row (steps {step - self._nonfinite + 1}..{step}) had a non-finite loss or gradient norm; "
                f"lower the learning rate or check the data{where}"
            )

    # ------------------------------------------------------------------ one step
    def _targets(self, batch: Batch) -> tuple[int, int]:
        """(target tokens, rows) of a micro-batch: tokens count only for token labels."""
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("the batch has no labels: the trainer needs them to compute the loss")
        if not _token_labels(labels):
            return 0, int(labels.shape[0])
        shifted = labels if self._encoder_decoder else labels[:, 1:]
        return int((shifted != IGNORE_INDEX).sum()), int(labels.shape[0])

    def _micro_loss(
        self, wrapped: torch.nn.Module, batch: Batch, tokens: int, rows: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's share of the step's objective and its weighted auxiliary losses."""
        labels = batch["labels"]
        share = labels.shape[0] / rows
        weight = self.model.method.aux_loss_weight(self.model.mixture_config)
        if _token_labels(labels):
            outputs = wrapped(**{key: value for key, value in batch.items() if key != "labels"})
            logits = outputs["logits"]
            if not self._encoder_decoder:
                logits, labels = logits[:, :-1], labels[:, 1:]
            token_sum = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            loss = token_sum / max(tokens, 1)
            aux = dict(self.model.last_aux_losses)
            if aux:
                loss = loss + weight * sum(aux.values()) * share
        else:
            outputs = wrapped(**batch)
            if outputs.get("loss") is None:
                raise ValueError("the model returned no loss: batches must carry labels")
            loss = outputs["loss"] * share
            aux = dict(self.model.last_aux_losses)
        return loss, {name: value.detach().float() * share for name, value in aux.items()}

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
        micro_batches = [
            {key: value.to(accelerator.device) for key, value in next(stream).items()} for _ in range(accumulation)
        ]
        counts = [self._targets(batch) for batch in micro_batches]
        local = torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts)], device=accelerator.device)
        tokens, rows = (int(value) for value in accelerator.reduce(local, reduction="sum").tolist())
        # accelerate divides by the accumulation steps and DDP/FSDP average over processes: undo both, so the
        # summed gradient is that of the global objective.
        scale = accumulation * accelerator.num_processes
        total = torch.zeros((), device=accelerator.device)
        aux: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            with accelerator.accumulate(wrapped):
                loss, parts = self._micro_loss(wrapped, batch, tokens, rows)
                accelerator.backward(loss * scale)
            total += loss.detach().float()
            for name, value in parts.items():
                aux[name] = aux.get(name, 0) + value
        names = sorted(aux)
        summed = accelerator.reduce(torch.stack([total, *[aux[name] for name in names]]), reduction="sum").tolist()
        record: dict[str, Any] = {"loss": summed[0]}
        record.update({f"aux_{name}": value for name, value in zip(names, summed[1:], strict=True)})
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # The engine stepped in the last micro-batch's backward: it clipped to the config's gradient_clipping
            # (the recipe's max_grad_norm, see make_accelerator) and skipped the update on a non-finite norm.
            grad_norm = _as_float(accelerator.clip_grad_norm_(wrapped.parameters(), max_grad_norm or math.inf))
            finite = math.isfinite(record["loss"]) and not optimizer.step_was_skipped
            if finite:
                self.model.step_end()
        else:
            for param in self.model.parameters():
                if not param.requires_grad:
                    param.grad = None
            params = [param for param in self.model.parameters() if param.requires_grad]
            norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm else math.inf)
            grad_norm = _as_float(norm)
            finite = math.isfinite(record["loss"]) and (
                grad_norm is None or accelerator.scaler is not None or math.isfinite(grad_norm)
            )
            if finite:
                optimizer.step()
                self.model.step_end()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record["grad_norm"] = grad_norm
        record["skipped"] = not finite
        record["lr"] = max(scheduler.get_last_lr())
        return record, rows

    def _evaluate(self, wrapped: torch.nn.Module) -> None:
        if self.evaluator is None:
            return
        sharded = model_is_sharded(self.model)
        if sharded or self.accelerator.is_main_process:
            wrapped.eval()
            with torch.no_grad():
                self.state.metrics = self.evaluator(self.model)
            wrapped.train()
        if self.logger is not None:
            flat = {
                f"{task}/{key}": value for task, scores in self.state.metrics.items() for key, value in scores.items()
            }
            self.logger.log("eval", {"step": self.state.global_step, "stage": self.state.stage_name, **flat})
        self.accelerator.wait_for_everyone()

    def _save(
        self,
        index: int,
        wrapped: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        source: BatchSource,
        finite: bool = True,
    ) -> None:
        trainer_state = {
            "stage_index": index,
            "stage_step": self.state.stage_step,
            "stages": [stage.name for stage in self.stages],
            "metrics": self.state.metrics,
            "finite": finite,
            "nonfinite_streak": self._nonfinite,
            "fingerprint": self.fingerprint,
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
            root=wrapped,
        )


def _token_labels(labels: torch.Tensor) -> bool:
    """Integer labels with a sequence dimension are token labels; 1-d or float ones (multi-label) are per row."""
    return labels.dim() >= 2 and not labels.is_floating_point()


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's wrapper (and DeepSpeed's ZeRO optimizer, which holds its groups)."""
    from accelerate.optimizer import AcceleratedOptimizer

    while hasattr(optimizer, "optimizer") and (
        isinstance(optimizer, AcceleratedOptimizer) or not isinstance(optimizer, torch.optim.Optimizer)
    ):
        optimizer = optimizer.optimizer
    return optimizer


def _as_float(norm: Any) -> float | None:
    """A gradient norm as a float (``None`` where the engine clips itself and returns none)."""
    if norm is None:
        return None
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _finite_checkpoint(path: Path) -> bool:
    try:
        return bool(json.loads((path / STATE_NAME).read_text()).get("finite", True))
    except (OSError, ValueError):
        return False


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
