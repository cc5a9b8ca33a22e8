"""Activation (gradient) checkpointing for a mixture model, with the routing context kept for the recompute.

Checkpointing reruns each layer's forward during the backward pass, after the model's call has returned
and its routing context (task ids, attention mask) has been cleared. ``torch.utils.checkpoint`` (non
re-entrant) takes a ``context_fn`` giving one context manager for the forward and one for the recompute;
loramix's makes the recompute see the routing context that was current when the layer first ran.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from loramix.model import MixtureModel


def enable_activation_checkpointing(model: MixtureModel) -> None:
    """Turn on activation checkpointing in the transformers model inside ``model``.

    Works for any trainer (loramix's, ``transformers.Trainer``): call it instead of the base model's
    ``gradient_checkpointing_enable``.

    Raises:
        ValueError: no module of the wrapped model supports checkpointing.
    """
    holder = model.holder

    def contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
        current = holder.current
        return nullcontext(), (holder.activate(current) if current is not None else nullcontext())

    kwargs = {"use_reentrant": False, "context_fn": contexts}
    for module in model.base_model.modules():
        if getattr(module, "supports_gradient_checkpointing", False):
            if hasattr(module, "activation_checkpointing_enable"):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            return
    raise ValueError(f"no module of {type(model.base_model).__name__} supports activation checkpointing")
