"""Wrapping any transformers model with a mixture: targets, routing context, losses, save/load/merge/export."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loramix.config import CONFIG_NAME, ConfigError, MixtureConfig
from loramix.context import ContextHolder, RoutingContext
from loramix.layer import SUPPORTED_LAYERS, MixtureLinear
from loramix.methods import get_method

WEIGHTS_NAME = "adapter_model.safetensors"
_SAVE_ONLY_KEYS = ("loramix_version", "target_layers")


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in spec)


def find_target_modules(model: nn.Module, config: MixtureConfig) -> list[str]:
    """Names of the modules ``config`` adapts in ``model``.

    ``"all-linear"`` takes every ``nn.Linear``/``Conv1D`` except the output embedding (LM head) and
    ``modules_to_save``.

    Raises:
        ConfigError: nothing matches (the message lists the adaptable names), or a match is not a layer
            loramix can adapt.
    """
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep = config.modules_to_save or []
    names: list[str] = []
    adaptable: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, MixtureLinear) or ".base_layer" in name:
            continue
        supported = isinstance(module, SUPPORTED_LAYERS)
        if supported:
            adaptable.append(name)
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if any(name == kept or name.startswith(kept + ".") or name.endswith("." + kept) for kept in keep):
            continue
        if config.target_modules == "all-linear":
            if supported and module is not output_layer:
                names.append(name)
        elif _matches(name, config.target_modules):
            if not supported:
                if isinstance(config.target_modules, str):
                    continue
                raise ConfigError(
                    f"target module {name!r} is a {type(module).__name__}; loramix adapts nn.Linear and Conv1D only"
                )
            names.append(name)
    if not names:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in adaptable})
        raise ConfigError(
            f"MixtureConfig.target_modules={config.target_modules!r} matches no adaptable module of "
            f"{type(model).__name__}; its linear layers end in {suffixes}"
        )
    return names


def _signature_with_task_ids(forward: Any) -> inspect.Signature:
    """The signature of ``forward`` with a keyword-only ``task_ids=None`` (before any ``**kwargs``)."""
    parameters = [p for p in inspect.signature(forward).parameters.values() if p.name != "task_ids"]
    task_ids = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
    position = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    return inspect.Signature([*parameters[:position], task_ids, *parameters[position:]])


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int | None:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


class MixtureModel(nn.Module):
    """A transformers model whose target layers carry a mixture of low-rank experts.

    Build it with :func:`get_mixture_model`. Calls take ``task_ids`` (LongTensor[batch], a list of ids or
    of task names); each row is routed by its own task. Attributes of the wrapped model (``config``,
    ``device``, ...) are reachable on this object.

    Args:
        model: the transformers model; its target layers are replaced in place.
        config: the mixture's settings.
    """

    def __init__(self, model: nn.Module, config: MixtureConfig) -> None:
        super().__init__()
        self.base_model = model
        self.mixture_config = config
        self.method = get_method(config.method)
        self.holder = ContextHolder()
        self.last_aux_losses: dict[str, torch.Tensor] = {}
        self.last_records: dict[str, Any] = {}
        self._passes_task_ids = "task_ids" in inspect.signature(model.forward).parameters
        # Callers that read forward's signature (transformers.Trainer keeps only the batch columns it names)
        # see the wrapped model's inputs plus task_ids.
        self.forward = functools.partial(MixtureModel.forward, self)
        self.forward.__signature__ = _signature_with_task_ids(model.forward)
        targets = find_target_modules(model, config)
        for param in model.parameters():
            param.requires_grad_(False)
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = MixtureLinear(getattr(parent, child), config, self.method, self.holder, name)
            setattr(parent, child, layer)
        for layer in self.mixture_layers().values():
            for param_name, param in layer.named_parameters():
                if not param_name.startswith("base_layer."):
                    param.requires_grad_(True)
        for module in self._modules_to_save().values():
            module.requires_grad_(True)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ structure
    def mixture_layers(self) -> dict[str, MixtureLinear]:
        """The adapted layers by module name (relative to the wrapped model)."""
        return {name: module for name, module in self.base_model.named_modules() if isinstance(module, MixtureLinear)}

    def _modules_to_save(self) -> dict[str, nn.Module]:
        found: dict[str, nn.Module] = {}
        for wanted in self.mixture_config.modules_to_save or []:
            matches = {
                name: module
                for name, module in self.base_model.named_modules()
                if name == wanted or name.endswith("." + wanted)
            }
            if not matches:
                raise ConfigError(f"MixtureConfig.modules_to_save names {wanted!r}, which the model does not have")
            found.update(matches)
        return found

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Turn on the wrapped model's activation (gradient) checkpointing, carrying routing into recomputation.

        The backward pass recomputes checkpointed layers after the call's context has closed; loramix hands
        ``torch.utils.checkpoint`` a ``context_fn`` that reopens the same context for the recomputation, so
        every row is recomputed with its own route. Needs non-reentrant checkpointing (the default here).
        Other keyword arguments go to the wrapped model's method unchanged.

        Raises:
            ValueError: ``use_reentrant=True`` was asked for.
        """
        options = dict(activation_checkpointing_kwargs or {})
        if options.setdefault("use_reentrant", False):
            raise ValueError("loramix needs use_reentrant=False to carry routing into recomputed layers")
        options["context_fn"] = self._checkpoint_contexts
        model = self.base_model
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """The older transformers name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def _checkpoint_contexts(self) -> tuple[Any, Any]:
        context = self.holder.current
        recompute = self.holder.activate(context) if context is not None else contextlib.nullcontext()
        return contextlib.nullcontext(), recompute

    # ------------------------------------------------------------------ calls
    def _context(self, task_ids: Any, batch_size: int | None, attention_mask: Any) -> RoutingContext:
        needs_task_ids = any(layer.router.needs_task_ids for layer in self.mixture_layers().values())
        ids = None
        if task_ids is not None:
            if isinstance(task_ids, torch.Tensor):
                ids = task_ids.long()
            else:
                ids = torch.tensor([self.mixture_config.task_index(task) for task in task_ids], dtype=torch.long)
            if ids.dim() != 1:
                raise ValueError(f"task_ids must be one id per sequence, shape [batch]; got shape {tuple(ids.shape)}")
            num_tasks = self.mixture_config.num_tasks
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_tasks):
                raise ValueError(f"task_ids {ids.tolist()} out of range: this mixture has tasks 0..{num_tasks - 1}")
            if batch_size is not None and ids.shape[0] != batch_size:
                raise ValueError(f"task_ids has {ids.shape[0]} entries for a batch of {batch_size} sequences")
            ids = ids.to(self._device())
        elif needs_task_ids:
            raise ValueError(
                f"method {self.mixture_config.method!r} routes by task: pass task_ids=LongTensor[batch] "
                f"(ids in 0..{self.mixture_config.num_tasks - 1})"
            )
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        return RoutingContext(task_ids=ids, attention_mask=mask)

    def _device(self) -> torch.device:
        return next(iter(self.mixture_layers().values())).lora_A.device

    def _collect(self, context: RoutingContext) -> torch.Tensor | None:
        self.last_aux_losses = {
            name: torch.stack(values).mean() for name, values in context.aux_losses.items() if values
        }
        self.last_records = context.records
        if not self.last_aux_losses:
            return None
        return self.method.aux_loss_weight(self.mixture_config) * sum(self.last_aux_losses.values())

    def forward(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        """Call the wrapped model with routing by ``task_ids`` (LongTensor[batch], or a list of ids/names).

        A wrapped model whose ``forward`` takes ``task_ids`` itself (e.g. per-task heads) receives them too.

        When the call has labels, the method's weighted auxiliary losses are added to ``outputs.loss``; they
        are also in ``outputs["aux_losses"]`` and :attr:`last_aux_losses`, by name.

        Raises:
            ValueError: task ids are missing for a task-routed method, out of range, or do not match the
                batch.
        """
        context = self._context(task_ids, _batch_size(args, kwargs), kwargs.get("attention_mask"))
        if self._passes_task_ids:
            kwargs["task_ids"] = context.task_ids
        with self.holder.activate(context):
            outputs = self.base_model(*args, **kwargs)
        aux_loss = self._collect(context)
        if aux_loss is not None and isinstance(outputs, dict):
            if outputs.get("loss") is not None:
                outputs["loss"] = outputs["loss"] + aux_loss
            outputs["aux_losses"] = self.last_aux_losses
        return outputs

    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        """``generate`` of the wrapped model with each row routed by its task for every decoding step."""
        context = self._context(task_ids, _batch_size(args, kwargs), kwargs.get("attention_mask"))
        with self.holder.activate(context):
            return self.base_model.generate(*args, **kwargs)

    def step_end(self) -> None:
        """Let every router update its non-learned state after an optimizer step (SMoRA's balance bias).

        Training loops call it after ``optimizer.step()``; methods without such state do nothing.
        """
        for layer in self.mixture_layers().values():
            layer.router.step_end()

    # ------------------------------------------------------------------ save / load
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the adapter adds or trains (banks, routers, persistent buffers, modules to save)."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.mixture_layers().items():
            for key, value in layer.state_dict().items():
                if not key.startswith("base_layer."):
                    state[f"{name}.{key}"] = value
        for name, module in self._modules_to_save().items():
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value
        return state

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (no pickle)."""
        from loramix import __version__

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().contiguous().cpu() for key, value in self.adapter_state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "loramix"})
        data = self.mixture_config.to_dict()
        data["loramix_version"] = __version__
        data["target_layers"] = sorted(self.mixture_layers())
        (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_directory: str | Path, is_trainable: bool = False
    ) -> MixtureModel:
        """Wrap ``model`` with the mixture saved in ``adapter_directory`` and load its weights.

        Args:
            model: the same base model the adapter was trained on.
            adapter_directory: a folder written by :meth:`save_pretrained`, or a hub repository id.
            is_trainable: keep the adapter trainable (otherwise frozen and in eval mode).

        Raises:
            ValueError: the saved weights do not fit the model (missing or unexpected keys).
        """
        from loramix.hub import resolve_pretrained_dir

        directory = resolve_pretrained_dir(adapter_directory)
        data = json.loads((directory / CONFIG_NAME).read_text())
        for key in _SAVE_ONLY_KEYS:
            data.pop(key, None)
        mixture = cls(model, MixtureConfig.from_dict(data))
        mixture.load_adapter_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        if not is_trainable:
            mixture.requires_grad_(False)
            mixture.eval()
        return mixture

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict`, requiring an exact key match."""
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"adapter weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for key, target in expected.items():
                if target.shape != state[key].shape:
                    raise ValueError(f"{key}: saved shape {tuple(state[key].shape)} != {tuple(target.shape)}")
                target.copy_(state[key])

    # ------------------------------------------------------------------ merge / export
    def _require_mergeable(self) -> None:
        for name, layer in self.mixture_layers().items():
            if not layer.router.task_only:
                raise TypeError(
                    f"method {self.mixture_config.method!r} routes on the input (layer {name}), so a task has no "
                    "fixed weights to merge or export"
                )

    def merge(self, task: int | str) -> nn.Module:
        """A plain transformers model (a copy) with task ``task`` folded into its weights.

        The mixture itself is left as it was. Raises ``TypeError`` for methods routed on the input.
        """
        self._require_mergeable()
        return self._fold(copy.deepcopy(self.base_model), self.mixture_config.task_index(task))

    def merge_and_unload(self, task: int | str) -> nn.Module:
        """Fold task ``task`` into the wrapped model in place and return it as a plain transformers model."""
        self._require_mergeable()
        return self._fold(self.base_model, self.mixture_config.task_index(task))

    @staticmethod
    def _fold(model: nn.Module, task: int) -> nn.Module:
        layers = [(name, module) for name, module in model.named_modules() if isinstance(module, MixtureLinear)]
        for name, layer in layers:
            with torch.no_grad():
                layer.unmerge()
                layer.merge(task)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer.base_layer)
        return model

    def export(
        self,
        save_directory: str | Path,
        task: int | str,
        minimal_rank: bool = False,
        overwrite: bool = False,
        base_model_name_or_path: str | None = None,
    ) -> dict[str, Any]:
        """Write task ``task`` as a standard PEFT LoRA adapter that PEFT, transformers, vLLM and LoRAX load.

        Every layer has one rank (zero-padded; exact), the scale is folded into ``lora_B``
        (``lora_alpha == r``), ``task_type`` comes from the base model and target modules have their short
        names; ``loramix_export.json`` records the task and the ``--max-lora-rank`` vLLM needs. A task of a
        :class:`~loramix.heads.MultiTaskSequenceClassifier` loads onto the architecture's
        ``AutoModelForSequenceClassification`` with the task's head as its classifier. See
        :func:`loramix.export.export_task`.

        Args:
            save_directory: the output directory (must be empty or absent unless ``overwrite``).
            task: the task's id or name.
            minimal_rank: each layer at its own rank through ``rank_pattern`` (PEFT only).
            overwrite: replace a non-empty ``save_directory``.
            base_model_name_or_path: recorded in ``adapter_config.json`` (default: the mixture config's).

        Returns:
            The export record.

        Raises:
            TypeError: the method routes on the input. FileExistsError: the directory is not empty.
        """
        from loramix.export import export_task

        return export_task(
            self,
            save_directory,
            task,
            minimal_rank=minimal_rank,
            overwrite=overwrite,
            base_model_name_or_path=base_model_name_or_path,
        )

    @contextlib.contextmanager
    def disable_adapter(self) -> Any:
        """Run the base model without the mixture inside a ``with`` block (PEFT's ``disable_adapter``).

        Every adapted layer calls only its frozen base layer until the block ends, so calls inside give
        exactly the base model's outputs (TRL uses this for the reference model); routers are not run.
        ``modules_to_save`` are trained in place and stay as they are.

        Raises:
            RuntimeError: a layer has a task merged into its base weight.
        """
        layers = self.mixture_layers()
        merged = sorted(name for name, layer in layers.items() if layer.merged_task is not None)
        if merged:
            raise RuntimeError(f"layers {merged[:3]} have a task merged into their weights; unmerge first")
        for layer in layers.values():
            layer.forward = layer.base_layer.__call__  # an instance attribute shadows the method
        try:
            yield
        finally:
            for layer in layers.values():
                del layer.forward


def get_mixture_model(model: nn.Module, config: MixtureConfig) -> MixtureModel:
    """Wrap a transformers model with a mixture of low-rank experts (PEFT's ``get_peft_model`` for mixtures).

    Only the adapter's parameters (and ``modules_to_save``) stay trainable.
    """
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return MixtureModel(model, config)
