"""Wrapping any transformers model with a mixture: targets, routing context, losses, save/load/merge/export."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import numbers
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from loramix.config import (
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    PEFT_TYPE,
    ConfigError,
    MixtureConfig,
    read_json_file,
)
from loramix.context import ContextHolder, RoutingContext
from loramix.export import export_task
from loramix.hub import resolve_pretrained_dir
from loramix.layer import SUPPORTED_LAYERS, MixtureLinear, layer_dims
from loramix.methods import get_method
from loramix.version import __version__

WEIGHTS_NAME = "adapter_model.safetensors"
#: Keys ``save_pretrained`` adds to the saved config beyond the mixture config.
SAVE_ONLY_KEYS = ("loramix_version", "target_layers")
#: Method options whose default changed, with the default of the versions before the change: a mixture saved
#: by such a version without the option set was trained with the old default, and loads with it.
CHANGED_DEFAULTS = {"more": {"linear_scaling": ((0, 2, 0), True)}}


def _version_tuple(text: Any) -> tuple[int, ...]:
    """``"0.1.0"`` -> ``(0, 1, 0)``; a missing or unreadable version counts as the oldest."""
    try:
        return tuple(int(part) for part in str(text).split(".")[:3])
    except ValueError:
        return (0,)


def apply_changed_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the defaults of the loramix version that saved it made explicit (a copy).

    Args:
        data: the saved config as read from disk (with its ``loramix_version``).
    """
    changed = CHANGED_DEFAULTS.get(data.get("method"), {})
    saved_by = _version_tuple(data.get("loramix_version", "0"))
    options = data.get("method_options")
    options = dict(options) if isinstance(options, dict) else options
    for name, (since, old_default) in changed.items():
        if saved_by < since and isinstance(options, dict) and name not in options:
            options[name] = old_default
    return {**data, "method_options": options} if options is not None else dict(data)


# An adapter may hold at most this many parameters more than 4x its base model (a guard against absurd sizes,
# checked before anything is allocated).
_SIZE_SLACK = 2**24
# safetensors header dtypes (as ``safe_open`` reports them) of floating-point tensors
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in spec)


def _inside(name: str, kept: str) -> bool:
    """True when module ``name`` is a module named (or ending in) ``kept``, or lies inside one."""
    return f".{name}.".find(f".{kept}.") >= 0


def mixture_config_file(directory: str | Path) -> Path:
    """The config file of a mixture saved in ``directory``: ``loramix_config.json``, or the
    ``adapter_config.json`` (with ``peft_type: "LORAMIX"``) of directories saved by earlier versions.

    Raises:
        FileNotFoundError: ``directory`` does not exist or holds no mixture config.
        ValueError: ``directory`` holds a PEFT adapter of another type (not a loramix mixture).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: expected a mixture saved by save_pretrained")
    if (directory / CONFIG_NAME).is_file():
        return directory / CONFIG_NAME
    legacy = directory / LEGACY_CONFIG_NAME
    if legacy.is_file():
        data = read_json_file(legacy)
        peft_type = data.get("peft_type") if isinstance(data, dict) else None
        if peft_type == PEFT_TYPE:
            return legacy
        raise ValueError(
            f"{legacy} is a PEFT {peft_type or 'unknown-type'} adapter, not a loramix mixture: load it with "
            "peft.PeftModel.from_pretrained (a loramix mixture has a loramix_config.json)"
        )
    raise FileNotFoundError(
        f"{directory} holds no loramix mixture: no {CONFIG_NAME} (nor a legacy {LEGACY_CONFIG_NAME})"
    )


def is_mixture_directory(directory: str | Path) -> bool:
    """True when ``directory`` holds a saved loramix mixture (new or legacy config name)."""
    try:
        mixture_config_file(directory)
    except (OSError, ValueError):
        return False
    return True


def read_safetensors_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Keys, shapes and dtypes of a safetensors file, read from its header without loading any tensor.

    Returns:
        ``{key: (shape, dtype)}`` with dtypes as safetensors names them (``"F32"``, ``"BF16"``, ...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable safetensors file (naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the mixture's weights are missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                for key in handle.keys()
            }
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError, ValueError) on bad files
        raise ValueError(f"{path} is not a readable safetensors file: {' '.join(str(err).split())}") from None


def _check_tensor_specs(
    expected: dict[str, torch.Tensor], found: dict[str, tuple[tuple[int, ...], str]], source: str
) -> None:
    """Raise ``ValueError`` unless ``found`` has exactly ``expected``'s keys, shapes and compatible dtypes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit this model: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}); was it saved from another base "
            "model or config?"
        )
    wrong = []
    for key, target in expected.items():
        shape, dtype = found[key]
        wanted = _SAFETENSORS_DTYPES.get(target.dtype, str(target.dtype))
        fits_dtype = dtype in _FLOAT_DTYPES if target.is_floating_point() else dtype == wanted
        if tuple(shape) != tuple(target.shape) or not fits_dtype:
            wrong.append(f"{key}: saved {list(shape)} {dtype}, model {list(target.shape)} {wanted}")
    if wrong:
        raise ValueError(f"{source} does not fit this model: {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")


def _check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    bad = [key for key, value in state.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(f"{source} holds NaN or infinite values in {bad[:5]}{' ...' if len(bad) > 5 else ''}")


def _wrapped_by(model: nn.Module) -> str | None:
    """What already adapts ``model`` (a loramix mixture or PEFT), or ``None``."""
    if isinstance(model, MixtureModel):
        return "it is a loramix MixtureModel"
    if hasattr(model, "peft_config"):
        return "it is a PEFT model (it has a peft_config)"
    for name, module in model.named_modules():
        if isinstance(module, MixtureLinear):
            return f"its layer {name!r} is a loramix MixtureLinear"
        if type(module).__module__.startswith("peft.tuners"):
            return f"its layer {name!r} is a PEFT {type(module).__name__}"
    return None


def modules_to_save_of(model: nn.Module, config: MixtureConfig) -> dict[str, nn.Module]:
    """The modules of ``model`` that ``config.modules_to_save`` names (by name or name suffix).

    Raises:
        ConfigError: a name matches no module of the model.
    """
    found: dict[str, nn.Module] = {}
    for wanted in config.modules_to_save or []:
        matches = {
            name: module for name, module in model.named_modules() if name == wanted or name.endswith("." + wanted)
        }
        if not matches:
            raise ConfigError(f"MixtureConfig.modules_to_save names {wanted!r}, which the model does not have")
        found.update(matches)
    return found


@dataclass
class _Plan:
    """What wrapping a model will do, prepared (and checked) before the model is touched.

    Attributes:
        layers: the new adapted layers by module name, built but not yet swapped in.
        saved: the modules to save by name.
        holder: the context holder the new layers read.
    """

    layers: dict[str, MixtureLinear]
    saved: dict[str, nn.Module]
    holder: ContextHolder

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _adapter_state(self.layers, self.saved)


def _adapter_state(layers: dict[str, MixtureLinear], saved: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for key, value in layer.state_dict().items():
            if not key.startswith("base_layer."):
                state[f"{name}.{key}"] = value
    for name, module in saved.items():
        for key, value in module.state_dict().items():
            state[f"{name}.{key}"] = value
    return state


def _check_size(model: nn.Module, targets: list[str], config: MixtureConfig) -> None:
    """Refuse an adapter far larger than its base model, counting its parameters on the meta device."""
    method = get_method(config.method)
    k_a, k_b = method.bank_sizes(config)
    router_sizes: dict[tuple[int, int], int] = {}
    total = 0
    for name in targets:
        d_in, d_out = layer_dims(model.get_submodule(name))
        if (d_in, d_out) not in router_sizes:
            with torch.device("meta"):
                router = method.make_mixer(config, d_in, d_out)
            router_sizes[d_in, d_out] = sum(t.numel() for t in (*router.parameters(), *router.buffers()))
        total += k_a * d_in + d_out * k_b + router_sizes[d_in, d_out]
    base = sum(p.numel() for p in model.parameters())
    if total > 4 * base + _SIZE_SLACK:
        raise ConfigError(
            f"MixtureConfig (method={config.method!r}, r={config.r}, num_experts={config.num_experts}) would add "
            f"{total:,d} parameters to a model of {base:,d} over {len(targets)} layers; refusing to allocate an "
            "adapter that large (lower r or num_experts)"
        )


def _prepare(model: nn.Module, config: MixtureConfig) -> _Plan:
    """Check everything about wrapping ``model`` with ``config`` and build the new layers, touching nothing.

    Raises:
        TypeError: ``model`` is not a module or ``config`` not a ``MixtureConfig``.
        ValueError: ``model`` is already adapted (a mixture or a PEFT model).
        ConfigError: the config is invalid, matches no layer, names missing modules to save, or is absurdly large.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a transformers model) to wrap; got {type(model).__name__}")
    if not isinstance(config, MixtureConfig):
        raise TypeError(f"expected a loramix.MixtureConfig; got {type(config).__name__}")
    wrapped = _wrapped_by(model)
    if wrapped is not None:
        raise ValueError(
            f"this model already carries an adapter ({wrapped}); wrap the plain base model instead "
            "(a MixtureModel's base_model is adapted in place, so load a fresh copy of the base model)"
        )
    config.validate()
    targets = find_target_modules(model, config)
    saved = modules_to_save_of(model, config)
    _check_size(model, targets, config)
    method = get_method(config.method)
    holder = ContextHolder()
    layers = {name: MixtureLinear(model.get_submodule(name), config, method, holder, name) for name in targets}
    return _Plan(layers, saved, holder)


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
        if any(_inside(name, kept) for kept in keep):
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


def _plain_task(task: Any) -> Any:
    """A 0-dimensional integer tensor as an int (other values unchanged, for ``task_index`` to judge)."""
    if isinstance(task, torch.Tensor) and task.dim() == 0 and not task.is_floating_point() and task.dtype != torch.bool:
        return int(task)
    return task


def task_id_tensor(config: MixtureConfig, task_ids: Any, batch_size: int | None) -> torch.Tensor:
    """The task of every sequence of a call as LongTensor[batch], checked against the mixture's tasks.

    Accepted: an integer tensor of shape [batch]; a list or tuple of integer ids and/or task names; or one
    task for the whole batch: an int, a task name (a string is always one name, never split into
    characters) or a 0-dimensional integer tensor.

    Args:
        config: the mixture's config (number and names of the tasks).
        task_ids: the call's ``task_ids``.
        batch_size: the call's batch size, when known.

    Raises:
        ValueError: a float or boolean id, an unknown name, an id out of range (naming the task and the known
            tasks), a wrong shape, or a count that does not match the batch.
    """
    num_tasks = config.num_tasks
    known = f"known tasks: {config.task_names}" if config.task_names else f"ids 0..{num_tasks - 1}"
    if isinstance(task_ids, str) or (isinstance(task_ids, numbers.Integral) and not isinstance(task_ids, bool)):
        one = config.task_index(task_ids)
        return torch.full((batch_size if batch_size is not None else 1,), one, dtype=torch.long)
    if not isinstance(task_ids, torch.Tensor) and type(task_ids).__module__ == "numpy":
        task_ids = torch.as_tensor(task_ids)
    if isinstance(task_ids, torch.Tensor):
        if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.dtype == torch.bool:
            raise ValueError(
                f"task_ids must hold integer task ids; got a {task_ids.dtype} tensor (floats are not truncated)"
            )
        if task_ids.dim() == 0:
            return task_id_tensor(config, int(task_ids), batch_size)
        ids = task_ids.detach().long()
    elif isinstance(task_ids, (list, tuple)):
        ids = torch.tensor([config.task_index(_plain_task(task)) for task in task_ids], dtype=torch.long)
    else:
        raise ValueError(
            f"task_ids must be a LongTensor[batch], a list of ids or task names, or one task; got "
            f"{type(task_ids).__name__}"
        )
    if ids.dim() != 1:
        raise ValueError(f"task_ids must be one id per sequence, shape [batch]; got shape {tuple(ids.shape)}")
    if torch.compiler.is_compiling():
        # No host sync inside a compiled graph (torch.compile): the range check runs on the device instead.
        torch._assert_async(((ids >= 0) & (ids < num_tasks)).all(), f"task_ids out of range ({known})")
    else:
        outside = [int(task) for task in ids.tolist() if not 0 <= task < num_tasks]
        if outside:
            raise ValueError(
                f"task_ids {ids.tolist()} out of range: task {outside[0]} is not one of this mixture's "
                f"{num_tasks} tasks ({known})"
            )
    if batch_size is not None and ids.shape[0] != batch_size:
        raise ValueError(f"task_ids has {ids.shape[0]} entries for a batch of {batch_size} sequences")
    return ids


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
    of task names, or one id or name for the whole batch; see :func:`task_id_tensor`); each row is routed by
    its own task. Attributes of the wrapped model (``config``,
    ``device``, ...) are reachable on this object.

    Everything is checked (and the new layers built) before the model is touched: when construction raises,
    the model keeps its modules, parameters and ``requires_grad`` flags.

    Args:
        model: the transformers model; its target layers are replaced in place.
        config: the mixture's settings.

    Raises:
        TypeError: ``model`` is not a module or ``config`` not a ``MixtureConfig``.
        ValueError: ``model`` already carries an adapter.
        ConfigError: the config is invalid or does not fit the model (naming the field).
    """

    def __init__(self, model: nn.Module, config: MixtureConfig, _plan: _Plan | None = None) -> None:
        plan = _prepare(model, config) if _plan is None else _plan
        super().__init__()
        self.base_model = model
        self.mixture_config = config
        self.method = get_method(config.method)
        self.holder = plan.holder
        self.last_aux_losses: dict[str, torch.Tensor] = {}
        self.last_records: dict[str, Any] = {}
        self._passes_task_ids = "task_ids" in inspect.signature(model.forward).parameters
        # Callers that read forward's signature (transformers.Trainer keeps only the batch columns it names)
        # see the wrapped model's inputs plus task_ids.
        self.forward = functools.partial(MixtureModel.forward, self)
        self.forward.__signature__ = _signature_with_task_ids(model.forward)
        # Checked and built: from here on nothing can fail.
        for param in model.parameters():
            param.requires_grad_(False)
        for name, layer in plan.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
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
        return modules_to_save_of(self.base_model, self.mixture_config)

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
            ids = task_id_tensor(self.mixture_config, task_ids, batch_size).to(self._device())
        elif needs_task_ids:
            raise ValueError(
                f"method {self.mixture_config.method!r} routes by task: pass task_ids=LongTensor[batch] "
                f"(ids in 0..{self.mixture_config.num_tasks - 1}), a list of ids or task names, or one task "
                "for the whole batch"
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
        """Call the wrapped model with routing by ``task_ids`` (LongTensor[batch], a list of ids/names, or one task).

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
        return _adapter_state(self.mixture_layers(), self._modules_to_save())

    def save_pretrained(self, save_directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``loramix_config.json`` and ``adapter_model.safetensors`` (no pickle).

        The config has loramix's own file name, so PEFT and transformers never take the mixture for a PEFT
        adapter (export a task with :meth:`export` for them). A legacy ``adapter_config.json`` of an earlier
        loramix save in the same directory is removed, since this save supersedes it.

        Args:
            save_directory: the folder to write (created if missing).
            state_dict: the adapter's tensors to write instead of :meth:`adapter_state_dict` (for instance
                gathered from the ranks of a sharded model), under the same keys.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        source = self.adapter_state_dict() if state_dict is None else state_dict
        state = {key: value.detach().contiguous().cpu() for key, value in source.items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "loramix"})
        data = self.mixture_config.to_dict()
        data["loramix_version"] = __version__
        data["target_layers"] = sorted(self.mixture_layers())
        (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        legacy = directory / LEGACY_CONFIG_NAME
        if legacy.is_file():
            with contextlib.suppress(ValueError, OSError):
                if read_json_file(legacy).get("peft_type") == PEFT_TYPE:
                    legacy.unlink()

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_directory: str | Path, is_trainable: bool = False
    ) -> MixtureModel:
        """Wrap ``model`` with the mixture saved in ``adapter_directory`` and load its weights.

        Everything is checked first: the config, its fit to the model, and the keys, shapes and dtypes of the
        saved tensors (read from the safetensors header before any tensor is allocated). When it raises, the
        model is left exactly as it was.

        Args:
            model: the same base model the adapter was trained on.
            adapter_directory: a folder written by :meth:`save_pretrained` (``loramix_config.json``, or the
                ``adapter_config.json`` of earlier versions), or a hub repository id.
            is_trainable: keep the adapter trainable (otherwise frozen and in eval mode).

        Raises:
            FileNotFoundError: the directory, its config or its weights are missing.
            TypeError: ``is_trainable`` is not a boolean.
            ConfigError: the saved config is invalid (naming the file and field) or does not fit the model.
            ValueError: the directory holds a PEFT adapter, or the saved weights do not fit the model (missing
                or unexpected keys, other shapes or dtypes, NaN or infinite values).
        """
        if not isinstance(is_trainable, bool):
            raise TypeError(f"is_trainable must be True or False; got {is_trainable!r}")
        directory = resolve_pretrained_dir(adapter_directory)
        config_path = mixture_config_file(directory)
        data = read_json_file(config_path)
        if isinstance(data, dict):
            data = apply_changed_defaults(data)
            for key in SAVE_ONLY_KEYS:
                data.pop(key, None)
        config = MixtureConfig._from_file(config_path, data)
        weights = directory / WEIGHTS_NAME
        header = read_safetensors_header(weights)
        plan = _prepare(model, config)
        _check_tensor_specs(plan.state_dict(), header, str(weights))
        try:
            with safe_open(str(weights), framework="pt") as handle:
                state = {key: handle.get_tensor(key) for key in header}
        except Exception as err:  # a file truncated or changed after its header was read
            raise ValueError(f"{weights} could not be read: {' '.join(str(err).split())}") from None
        _check_finite(state, str(weights))
        mixture = cls(model, config, _plan=plan)
        mixture._copy_state(state)
        if not is_trainable:
            mixture.requires_grad_(False)
            mixture.eval()
        return mixture

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict`, requiring an exact key and shape match.

        Every key, shape and dtype (and finiteness) is checked before the first tensor is copied, so a
        mismatch leaves the model as it was.

        Raises:
            ValueError: missing or unexpected keys, other shapes, an integer tensor where a float one belongs
                (or the reverse), or NaN/infinite values.
        """
        if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise ValueError("adapter weights must be a dict of tensors (as adapter_state_dict returns)")
        specs = {
            key: (tuple(value.shape), _SAFETENSORS_DTYPES.get(value.dtype, str(value.dtype)))
            for key, value in state.items()
        }
        _check_tensor_specs(self.adapter_state_dict(), specs, "the adapter weights")
        _check_finite(state, "the adapter weights")
        self._copy_state(state)

    def _copy_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy checked tensors into the adapter (cannot fail: keys and shapes are known to fit)."""
        with torch.no_grad():
            for key, target in self.adapter_state_dict().items():
                target.copy_(state[key])

    # ------------------------------------------------------------------ merge / export
    def _require_mergeable(self) -> None:
        for name, layer in self.mixture_layers().items():
            if not layer.mergeable:
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

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload loramix mixture",
        revision: str | None = None,
    ) -> Any:
        """Save the mixture as :meth:`save_pretrained` does and upload it to a Hugging Face Hub repository.

        The repository is created when missing; :meth:`from_pretrained` accepts its id. To serve one task
        with PEFT or vLLM, push an export (:meth:`export`) with ``huggingface_hub`` instead.

        Args:
            repo_id: ``"user/name"``.
            private: visibility of a repository this call creates.
            token: a hub token (default: the one ``huggingface_hub`` finds).
            commit_message: the commit's message.
            revision: the branch to push to.

        Returns:
            The ``CommitInfo`` of the upload.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="loramix-push-") as staging:
            self.save_pretrained(staging)
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id, folder_path=staging, commit_message=commit_message, revision=revision
            )


def get_mixture_model(model: nn.Module, config: MixtureConfig) -> MixtureModel:
    """Wrap a transformers model with a mixture of low-rank experts (PEFT's ``get_peft_model`` for mixtures).

    Only the adapter's parameters (and ``modules_to_save``) stay trainable. Everything is checked before the
    model is touched; when this raises, the model (and ``config``) are left as they were.

    Raises:
        TypeError: ``model`` is not a module or ``config`` not a ``MixtureConfig``.
        ValueError: ``model`` already carries an adapter (a loramix mixture or PEFT).
        ConfigError: the config is invalid or does not fit the model (naming the field).
    """
    mixture = MixtureModel(model, config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return mixture
