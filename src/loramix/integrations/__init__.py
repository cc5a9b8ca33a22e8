"""Training a mixture with ``transformers.Trainer`` or TRL's trainers.

A :class:`~loramix.model.MixtureModel` already trains under ``transformers.Trainer`` (its forward takes the
batch with ``task_ids`` and adds the auxiliary losses to ``outputs.loss``). What the Trainer does not know:

- its checkpoints would hold the whole model's state dict (base included), and with tied embeddings (most
  small causal LMs) saving fails on tensors that share memory;
- ``resume_from_checkpoint`` looks for model or PEFT weights it will not find;
- nothing calls :meth:`~loramix.model.MixtureModel.step_end` after an optimizer step, so state that
  moves between steps (SMoRA's balance bias) never moves.

:class:`MixtureTrainerMixin` fixes all three: checkpoints and ``save_model`` hold only the adapter, in
loramix's format (``loramix_config.json`` + ``adapter_model.safetensors``, loadable with
``MixtureModel.from_pretrained``), resuming and ``load_best_model_at_end`` restore it, and a
:class:`StepEndCallback` is added. Use :class:`MixtureTrainer` in place of ``transformers.Trainer``, or
:func:`mixture_trainer_class` for another Trainer subclass (``mixture_trainer_class(trl.SFTTrainer)``)::

    from loramix.integrations import MixtureTrainer

    trainer = MixtureTrainer(model=mixture, args=TrainingArguments(...), train_dataset=..., data_collator=...)
    trainer.train()
    trainer.train(resume_from_checkpoint=True)  # later, from the latest adapter checkpoint
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from loramix.model import WEIGHTS_NAME, MixtureModel, _signature_with_task_ids
from loramix.train.checkpoint import CheckpointError, load_adapter

__all__ = ["MixtureTrainer", "MixtureTrainerMixin", "StepEndCallback", "find_mixture", "mixture_trainer_class"]

TRAINING_ARGS_NAME = "training_args.bin"


def find_mixture(model: nn.Module) -> MixtureModel:
    """The :class:`MixtureModel` inside ``model`` (itself, or behind DDP/compile wrappers' ``module``).

    Raises:
        TypeError: ``model`` holds no mixture model.
    """
    current: Any = model
    for _ in range(8):
        if isinstance(current, MixtureModel):
            return current
        inner = getattr(current, "module", None) or getattr(current, "_orig_mod", None)
        if inner is None:
            break
        current = inner
    raise TypeError(
        f"loramix's Trainer integration needs a MixtureModel (from get_mixture_model), got {type(model).__name__}"
    )


class StepEndCallback(TrainerCallback):
    """Calls :meth:`MixtureModel.step_end` after every optimizer step (not after accumulation micro-steps)."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if model is not None:
            find_mixture(model).step_end()
        return control


class MixtureTrainerMixin:
    """Mix into a ``transformers.Trainer`` (sub)class, before it, to train a :class:`MixtureModel`.

    Checkpoints and ``save_model`` write only the adapter in loramix's format; resuming from a checkpoint
    and ``load_best_model_at_end`` load it back; :class:`StepEndCallback` is added.

    Raises:
        TypeError: the trainer's model is not a mixture model.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        mixture = find_mixture(self.model)
        self._loramix_trl = not isinstance(mixture.forward, functools.partial)
        if self._loramix_trl:
            self._move_fused_head(mixture)
        else:
            self.loss_is_scaled_for_ga = True  # compute_loss scales for accumulation itself
        if not any(isinstance(callback, StepEndCallback) for callback in self.callback_handler.callbacks):
            self.add_callback(StepEndCallback())

    def _move_fused_head(self, mixture: MixtureModel) -> None:
        """Put TRL's fused LM head on the wrapped causal LM, inside the mixture's routing, with its aux losses.

        TRL's ``SFTTrainer`` replaces the model's ``forward`` with one that runs ``model.base_model`` (for a
        mixture, the whole wrapped LM, outside the routing context) and computes the loss from per-token
        log-probabilities, ignoring ``outputs.loss`` and so the mixture's auxiliary losses. This restores the
        mixture's forward, patches the wrapped LM instead, and hands the unweighted auxiliary losses to TRL as
        an MoE auxiliary loss (``outputs.aux_loss``) with the method's weight, which TRL averages over
        accumulation steps like its own.
        """
        from trl.trainer.utils import add_fused_lm_head

        base = mixture.base_model
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
        plain = functools.partial(MixtureModel.forward, mixture)

        def forward(*args: Any, output_router_logits: bool = False, **kwargs: Any) -> Any:
            outputs = plain(*args, **kwargs)
            if kwargs.get("fused_lm_head"):
                aux = mixture.last_aux_losses
                outputs["aux_loss"] = sum(aux.values()) if aux else outputs["log_probs"].new_zeros(())
            return outputs

        forward.__signature__ = _signature_with_task_ids(type(base).forward)
        mixture.forward = forward
        self.aux_loss_enabled = True
        self.router_aux_loss_coef = mixture.method.aux_loss_weight(mixture.mixture_config)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The loss of loramix's objective: the same whatever the batch size, accumulation and process count.

        With token labels, the token-loss sum of the micro-batch divided by ``num_items_in_batch`` (the
        target tokens of the whole optimizer step, as the Trainer counts them); with one label per row, the
        micro-batch's mean times its share of the step's rows. The mixture's auxiliary losses enter with the
        micro-batch's share of the step (``1 / accumulation steps``). TRL's trainers, a ``compute_loss_func``
        or label smoothing keep their own loss.
        """
        if self._loramix_trl or self.compute_loss_func is not None or self.label_smoother is not None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        mixture = find_mixture(model)
        labels = inputs.get("labels")
        steps = self.current_gradient_accumulation_steps if model.training else 1
        # the Trainer counts num_items over every process with average_tokens_across_devices; DDP then averages
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        tokens = labels is not None and labels.dim() >= 2 and not labels.is_floating_point()
        if tokens and num_items_in_batch is not None:
            outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
            logits = outputs["logits"]
            if not getattr(mixture.config, "is_encoder_decoder", False):
                logits, labels = logits[:, :-1], labels[:, 1:]
            token_sum = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            loss = token_sum / torch.as_tensor(num_items_in_batch, device=token_sum.device).clamp(min=1) * processes
            aux = mixture.last_aux_losses
            if aux:
                loss = loss + mixture.method.aux_loss_weight(mixture.mixture_config) * sum(aux.values()) / steps
        else:
            outputs = model(**inputs)
            if outputs.get("loss") is None:
                raise ValueError("the mixture returned no loss: the batch needs labels")
            loss = outputs["loss"]
            if num_items_in_batch is not None and labels is not None and not tokens:
                share = labels.shape[0] / torch.as_tensor(num_items_in_batch, device=loss.device).clamp(min=1)
                loss = loss * share * processes
            else:
                loss = loss / steps
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter (not the base model) and the processing class, as ``save_pretrained`` would."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        find_mixture(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the adapter of a checkpoint written by :meth:`_save`.

        Raises:
            ValueError: the directory holds no loramix adapter (naming it), or its tensors do not fit.
        """
        weights = Path(resume_from_checkpoint) / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"cannot resume: {resume_from_checkpoint} holds no loramix adapter ({WEIGHTS_NAME})")
        try:
            load_adapter(find_mixture(model if model is not None else self.model), weights)
        except CheckpointError as error:
            raise ValueError(f"cannot resume from {resume_from_checkpoint}: {error}") from None

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


@functools.cache
def mixture_trainer_class(base: type) -> type:
    """``base`` (``transformers.Trainer`` or a subclass, e.g. ``trl.SFTTrainer``) with :class:`MixtureTrainerMixin`."""
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise TypeError(f"expected transformers.Trainer or a subclass of it, got {base!r}")
    return type(f"Mixture{base.__name__}", (MixtureTrainerMixin, base), {"__module__": __name__})


MixtureTrainer = mixture_trainer_class(Trainer)
