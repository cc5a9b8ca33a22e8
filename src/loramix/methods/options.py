"""Typed method options: each method declares its ``method_options`` as a frozen dataclass.

A field is one option; its type annotation says what a value must be (``bool``, ``int``, ``float``, ``str``
or ``tuple[int, ...]``, optionally ``| None``) and :func:`option` adds bounds, choices and help. Parsing is
generic: unknown keys are rejected by name, booleans must be booleans, numbers finite numbers (never
booleans) within their bounds, strings one of their choices. Defaults live in the dataclass, in one place;
a default that depends on the rest of the config (MALoRA's subspace rank, a top-k capped by the count it
selects from) is ``None`` there and filled in by :meth:`MethodOptions.resolve`, which also checks what
involves other fields. Methods with top-k routing derive their options from :class:`TopKOptions`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from loramix.checks import ConfigError

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


def option(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field for one option.

    Args:
        default: the value when the option is not given (``None``: filled in by ``resolve``).
        low: smallest allowed number (inclusive).
        high: largest allowed number (inclusive).
        above: the number must be strictly greater than this.
        choices: the allowed strings.
    """
    return dataclasses.field(default=default, metadata={"low": low, "high": high, "above": above, "choices": choices})


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of a method's options; a method without options uses it as is (no fields)."""

    method: ClassVar[str] = ""

    @classmethod
    def parse(cls, method: str, config: MixtureConfig) -> MethodOptions:
        """Read and check ``config.method_options``.

        Raises:
            ConfigError: an unknown key, or a value of the wrong type or out of bounds (naming the option).
        """
        raw = config.method_options
        fields = {field.name: field for field in dataclasses.fields(cls)}
        if raw and not fields:
            raise ConfigError(f"MixtureConfig.method_options={raw!r} is invalid: method {method!r} takes no options")
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(
                f"MixtureConfig.method_options has unknown keys {unknown} for {method!r}; known: {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in raw.items():
            values[name] = _checked(method, name, value, hints[name], fields[name].metadata)
        return cls(**values).resolve(method, config)

    def resolve(self, method: str, config: MixtureConfig) -> MethodOptions:
        """Fill in defaults that depend on the config and check what involves other fields; ``self`` here."""
        return self

    @staticmethod
    def fail(method: str, name: str, value: Any, allowed: str) -> typing.NoReturn:
        """Raise the ``ConfigError`` of an invalid option."""
        raise ConfigError(
            f"MixtureConfig.method_options[{name!r}]={value!r} is invalid for {method!r}: expected {allowed}"
        )


@dataclasses.dataclass(frozen=True)
class TopKOptions(MethodOptions):
    """Options of a method with top-k routing: ``top_k``, how many of its ``top_k_of`` each token keeps.

    ``top_k`` must be at most the count it selects from (``config.num_experts`` or ``config.r``, per
    :attr:`top_k_of`); unset, it is the method's :attr:`default_top_k` capped at that count (``None``: dense,
    every expert weighted).
    """

    top_k: int | None = option(None, low=1)
    top_k_of: ClassVar[str] = "num_experts"
    default_top_k: ClassVar[int | None] = None

    def resolve(self, method: str, config: MixtureConfig) -> TopKOptions:
        count = getattr(config, self.top_k_of)
        if self.top_k is None:
            default = None if self.default_top_k is None else min(self.default_top_k, count)
            return dataclasses.replace(self, top_k=default)
        if self.top_k > count:
            self.fail(
                method, "top_k", self.top_k, f"an integer in [1, {self.top_k_of}={count}] (it selects from {count})"
            )
        return self


def _checked(method: str, name: str, value: Any, hint: Any, bounds: Mapping[str, Any]) -> Any:
    """``value`` converted to the option's type, or a ``ConfigError`` naming the option."""
    allow_none = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [member for member in typing.get_args(hint) if member is not type(None)]
        allow_none = len(members) < len(typing.get_args(hint))
        hint = members[0]
    if value is None and allow_none:
        return None
    if hint is bool:
        if not isinstance(value, bool):
            MethodOptions.fail(method, name, value, "true or false (a boolean)")
        return value
    if hint is str:
        choices = bounds.get("choices")
        if not isinstance(value, str) or (choices and value not in choices):
            MethodOptions.fail(method, name, value, f"one of {list(choices or ())}")
        return value
    if hint in (int, float):
        return _number(method, name, value, hint, bounds)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            MethodOptions.fail(method, name, value, "a non-empty list of integers")
        return tuple(_number(method, name, item, int, bounds) for item in value)
    raise TypeError(f"option {name!r} of {method!r} has an unsupported type {hint!r}")


def _number(method: str, name: str, value: Any, kind: type, bounds: Mapping[str, Any]) -> Any:
    low, high, above = bounds.get("low"), bounds.get("high"), bounds.get("above")
    limits = [
        f">= {low}" if low is not None else "",
        f"<= {high}" if high is not None else "",
        f"> {above}" if above is not None else "",
    ]
    allowed = f"{'an integer' if kind is int else 'a finite number'} {' and '.join(part for part in limits if part)}"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if (
        not is_number
        or (kind is int and not isinstance(value, int))
        or (low is not None and value < low)
        or (high is not None and value > high)
        or (above is not None and value <= above)
    ):
        MethodOptions.fail(method, name, value, allowed.strip())
    return kind(value)
