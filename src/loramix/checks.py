"""The error every invalid setting raises and the small checks it is built on.

This module sits below the config and the methods: methods raise :class:`ConfigError` while they parse
their options, and :mod:`loramix.config` validates against the registered methods, so the error and the
number checks cannot live in either without an import circle.
"""

from __future__ import annotations

import math
from typing import Any

MAX_SIZE = 2**16
"""Upper bound of ``r``, ``num_experts``, ``num_tasks`` and sizes in method options (a guard against absurd sizes)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def is_number(value: Any) -> bool:
    """True for a finite int or float that is not a bool (``True`` is no number here, nor NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any, low: int = 1, high: int = MAX_SIZE) -> bool:
    """True for an int (not a bool) in ``[low, high]``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_option(method: str, key: str, value: Any, valid: bool, allowed: str) -> None:
    """Raise ``ConfigError`` naming ``method_options[key]`` of ``method`` unless ``valid``."""
    if not valid:
        raise ConfigError(
            f"MixtureConfig.method_options[{key!r}]={value!r} is invalid for {method!r}: expected {allowed}"
        )
