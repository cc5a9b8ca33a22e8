"""What a method is: a preset of banks, mixer and losses over the shared mixture layer.

The layer computes ``h = W0 x + s · B · mix(A · dropout(x))`` for every method. A method says how large
the banks A (K_A × d_in) and B (d_out × K_B) are (:meth:`Method.bank_sizes`, and whether they are
block-diagonal, :meth:`Method.bank_blocks`), the scale s, and builds the layer's mixer
(:meth:`Method.make_mixer`), which owns everything else: routing, auxiliary losses, and how a task merges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from loramix.checks import ConfigError
from loramix.methods.options import MethodOptions
from loramix.mixers import Mixer, shared_pairing

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


class Method:
    """A mixture method, described by class attributes and class methods (never instantiated).

    Subclasses set ``name`` and override what differs from a plain LoRA of rank ``r * num_experts``.

    Attributes:
        name: the registered name used in ``MixtureConfig.method``.
        default_aux_loss_weight: weight of the method's auxiliary loss when the config gives none.
        Options: the dataclass of the method's ``MixtureConfig.method_options`` (see
            :mod:`loramix.methods.options`); the base class takes none. Methods with top-k routing derive it
            from :class:`~loramix.methods.options.TopKOptions` (``method_options["top_k"]``).
    """

    name: ClassVar[str] = ""
    default_aux_loss_weight: ClassVar[float] = 0.0
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        """Reject settings this method cannot honour (raise ``ConfigError`` naming the field).

        The base check parses ``method_options`` into :attr:`Options` (unknown keys, types and bounds, a
        ``top_k`` above the count it selects from); subclasses add their own checks.
        """
        cls.options(config)

    @classmethod
    def options(cls, config: MixtureConfig) -> Any:
        """The method's typed options, parsed from ``config.method_options`` with their defaults filled in.

        Raises:
            ConfigError: an unknown option, or a value of the wrong type or out of bounds (naming it).
        """
        return cls.Options.parse(cls.name, config)

    @classmethod
    def bank_sizes(cls, config: MixtureConfig) -> tuple[int, int]:
        """Rows of the A bank and columns of the B bank (K_A, K_B)."""
        size = config.r * config.num_experts
        return size, size

    @classmethod
    def bank_blocks(cls, config: MixtureConfig) -> int:
        """n, the number of diagonal blocks of the banks (1: dense banks).

        With n > 1 (MELoRA) the input and output are split into n equal slices; A's rows ``i·K_A/n ..`` read
        only input slice i and B's columns ``i·K_B/n ..`` write only output slice i. The layer stores just the
        blocks: A as [K_A, d_in / n], B as [d_out / n, K_B].
        """
        return 1

    @classmethod
    def scale(cls, config: MixtureConfig) -> float:
        """The scale s of the layer's delta (``lora_alpha / r`` unless the method says otherwise)."""
        return config.scale

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        """The mixer of one adapted layer of shape ``d_out × d_in``."""
        raise NotImplementedError

    @classmethod
    def aux_loss_weight(cls, config: MixtureConfig) -> float:
        """Weight of the auxiliary loss added to the task loss."""
        return cls.default_aux_loss_weight if config.aux_loss_weight is None else float(config.aux_loss_weight)


def require_one_expert_per_task(config: MixtureConfig, method: str, task_word: str = "task") -> None:
    """Raise ``ConfigError`` unless ``num_experts == num_tasks`` (methods whose experts are the tasks)."""
    if config.num_experts != config.num_tasks:
        raise ConfigError(
            f"MixtureConfig.num_experts={config.num_experts} is invalid: {method!r} has one expert per "
            f"{task_word} (num_tasks={config.num_tasks})"
        )


class SharedDownProjection(Method):
    """Methods whose experts share one down-projection A of r rows and own E up-projections of r columns.

    The B bank's column ``e·r + q`` (expert e, component q) pairs with A's row q (HydraLoRA, MoDE, MTL-LoRA).
    """

    @classmethod
    def bank_sizes(cls, config: MixtureConfig) -> tuple[int, int]:
        return config.r, config.r * config.num_experts

    @classmethod
    def pairing(cls, config: MixtureConfig) -> torch.Tensor:
        """The A row (of r) each of the E·r B columns pairs with, LongTensor[E * r]."""
        return shared_pairing(config.r, config.num_experts)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(method: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``method.name``."""
    if not method.name:
        raise ValueError(f"{method.__name__} has no name")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> type[Method]:
    """The method registered as ``name``.

    Raises:
        KeyError: no such method; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}") from None


def available_methods() -> list[str]:
    """Names of all registered methods."""
    return sorted(_REGISTRY)
