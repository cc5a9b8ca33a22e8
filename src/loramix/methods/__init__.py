"""Registered mixture methods; importing this package registers them all."""

from loramix.methods import (  # noqa: F401  (registration)
    conditional_mixlora,
    hydralora,
    lora,
    malora,
    melora,
    mixlora,
    moa,
    mode,
    moelora,
    more,
    mtl_lora,
    per_task_lora,
    smora,
)
from loramix.methods.base import Method, available_methods, get_method, register_method

__all__ = ["Method", "available_methods", "get_method", "register_method"]
