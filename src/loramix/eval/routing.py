"""Which experts or rank components each task uses in each adapted layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from loramix.model import MixtureModel


@torch.no_grad()
def task_gates(model: MixtureModel) -> dict[str, dict[str, list[float]]]:
    """The gate of every task in every layer, for methods routed by the task alone.

    Returns:
        ``{task name: {layer name: gate over the K rank components}}`` (MoRE: ones on the chosen rank
        prefix; MOELoRA: each expert's weight repeated over its components).

    Raises:
        TypeError: a layer routes on the input (use :func:`routed_experts`).
    """
    config = model.mixture_config
    names = config.task_names or [str(task) for task in range(config.num_tasks)]
    layers = model.mixture_layers()
    return {
        name: {layer_name: layer.router.task_gate(task).float().cpu().tolist() for layer_name, layer in layers.items()}
        for task, name in enumerate(names)
    }


@torch.no_grad()
def routed_experts(
    model: MixtureModel, batches_by_task: dict[str, Sequence[dict[str, torch.Tensor]]], num_experts: int
) -> dict[str, dict[str, list[float]]]:
    """How often each expert was chosen, per task and layer, for methods routed on the input.

    Reads the ``experts`` (LongTensor[batch]) each router leaves in :attr:`MixtureModel.last_records`
    after a forward (MoA's sequence router does).

    Args:
        model: the mixture model.
        batches_by_task: batches of each task (with ``task_ids``).
        num_experts: the number of experts E.

    Returns:
        ``{task: {layer: fraction of the task's sequences routed to each of the E experts}}``; layers that
        record no choice are left out.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    result: dict[str, dict[str, list[float]]] = {}
    for task, batches in batches_by_task.items():
        counts: dict[str, torch.Tensor] = {}
        for batch in batches:
            model(**{key: value.to(device) for key, value in batch.items() if key != "labels"})
            for layer, record in model.last_records.items():
                experts = record.get("experts") if isinstance(record, dict) else None
                if isinstance(experts, torch.Tensor):
                    histogram = torch.bincount(experts.flatten().cpu(), minlength=num_experts).float()
                    counts[layer] = counts.get(layer, torch.zeros(num_experts)) + histogram
        result[task] = {layer: (count / count.sum().clamp(min=1)).tolist() for layer, count in counts.items()}
    model.train(was_training)
    return result


def routing_summary(
    model: MixtureModel,
    batches_by_task: Callable[[], dict[str, Sequence[dict[str, torch.Tensor]]]],
) -> dict[str, Any]:
    """The routing of a model for reports: task gates when every router is task-only, else chosen experts.

    Args:
        model: the mixture model.
        batches_by_task: builds each task's evaluation batches (called only for input-routed methods).

    Returns:
        ``{"kind": "gate" | "experts", "tasks": {task: {layer: weights}}}``.
    """
    if all(layer.mergeable for layer in model.mixture_layers().values()):
        return {"kind": "gate", "tasks": task_gates(model)}
    config = model.mixture_config
    num_experts = max(config.num_experts, config.num_tasks)
    return {"kind": "experts", "tasks": routed_experts(model, batches_by_task(), num_experts)}


def routing_choices(summary: dict[str, Any]) -> dict[str, dict[str, int]]:
    """One number per task and layer saying what was chosen.

    For task gates: the number of active rank components (MoRE's chosen rank; all K for dense gates).
    For input-routed methods: the expert most of the task's sequences went to.

    Args:
        summary: what :func:`routing_summary` returns.

    Returns:
        ``{task: {layer: choice}}``.
    """
    choices: dict[str, dict[str, int]] = {}
    for task, layers in summary["tasks"].items():
        if summary["kind"] == "gate":
            choices[task] = {layer: sum(1 for value in gate if value > 0) for layer, gate in layers.items()}
        else:
            choices[task] = {layer: max(range(len(shares)), key=shares.__getitem__) for layer, shares in layers.items()}
    return choices
