"""Registered mixture methods; importing this package registers them all."""

from loramix.methods import lora, moa, moelora, more, per_task_lora  # noqa: F401  (registration)
from loramix.methods.base import Method, available_methods, get_method, register_method

__all__ = ["Method", "available_methods", "get_method", "register_method"]
