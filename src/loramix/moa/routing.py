"""Switching an MoA model between label and router routing, and reading router accuracy.

The mode lives in one place, the model's ``mixture_config.method_options`` (``route_by``, ``gate``), which
every :class:`~loramix.methods.moa.DomainRouter` reads at each call; these helpers only write it there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from loramix.methods.moa import GATES, ROUTE_BY, DomainRouter, MoAOptions
from loramix.model import MixtureModel


def domain_routers(model: MixtureModel) -> dict[str, DomainRouter]:
    """The MoA router of every adapted layer, by layer name.

    Raises:
        TypeError: the model is not an MoA mixture.
    """
    if model.mixture_config.method != "moa":
        raise TypeError(f"expected an 'moa' mixture, got method {model.mixture_config.method!r}")
    return {name: layer.router for name, layer in model.mixture_layers().items()}


def _set_option(model: MixtureModel, key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Write one routing option into the model's config, the one place routers read it from."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is invalid: expected one of {allowed}")
    domain_routers(model)
    model.mixture_config.method_options[key] = value


def set_route_by(model: MixtureModel, mode: str) -> None:
    """Route every layer by ``"label"`` (the given domain) or ``"router"``; saved with the model's config.

    Raises:
        ValueError: ``mode`` is not one of ``"router"``, ``"label"``.
        TypeError: the model is not an MoA mixture.
    """
    _set_option(model, "route_by", mode, ROUTE_BY)


def set_gate(model: MixtureModel, gate: str) -> None:
    """Gate every router's choice ``"top1"`` (argmax expert) or ``"soft"`` (softmax weights); saved with the config.

    Raises:
        ValueError: ``gate`` is not one of ``"top1"``, ``"soft"``.
        TypeError: the model is not an MoA mixture.
    """
    _set_option(model, "gate", gate, GATES)


def current_route_by(model: MixtureModel) -> str:
    """The routing mode in the model's config (``"router"`` unless set)."""
    return model.mixture_config.method_options.get("route_by", MoAOptions.route_by)


@contextmanager
def route_by(model: MixtureModel, mode: str) -> Iterator[MixtureModel]:
    """Route by ``mode`` inside a ``with`` block, then restore the previous mode.

    Example::

        with route_by(model, "label"):
            model.generate(**prompts, task_ids=domains)  # a known domain overrides the router
    """
    previous = current_route_by(model)
    set_route_by(model, mode)
    try:
        yield model
    finally:
        set_route_by(model, previous)


def router_accuracy(records: Mapping[str, Any]) -> dict[str, float]:
    """Per-layer router accuracy from a forward's ``records`` (``model.last_records``), by layer name.

    Layers without an accuracy (no ``task_ids`` were given) are left out.
    """
    return {
        name: float(record["accuracy"])
        for name, record in records.items()
        if isinstance(record, Mapping) and record.get("accuracy") is not None
    }
