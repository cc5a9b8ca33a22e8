"""The fused mixture layer against slow per-expert references written here."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramix.config import MixtureConfig
from loramix.context import ContextHolder, RoutingContext
from loramix.layer import MixtureLinear
from loramix.methods import get_method

D_IN, D_OUT, TASKS = 12, 10, 3


def make_layer(base: nn.Module, **settings) -> tuple[MixtureLinear, ContextHolder]:
    config = MixtureConfig(num_tasks=TASKS, **settings)
    holder = ContextHolder()
    layer = MixtureLinear(base, config, get_method(config.method), holder, "layer")
    torch.manual_seed(3)
    with torch.no_grad():
        for param in layer.parameters():
            if param.requires_grad and param is not layer.base_layer.weight:
                param.normal_(0, 0.3)
    return layer, holder


def run(layer: MixtureLinear, holder: ContextHolder, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    with holder.activate(RoutingContext(task_ids=task_ids)):
        return layer(x)


def expert_factors(layer: MixtureLinear, expert: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = slice(expert * rank, (expert + 1) * rank)
    return layer.lora_A[rows], layer.lora_B[:, rows]


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(4, 5, D_IN), torch.tensor([0, 2, 1, 2])


def test_lora_matches_reference(inputs) -> None:
    x, tasks = inputs
    layer, holder = make_layer(nn.Linear(D_IN, D_OUT), method="lora", r=4, lora_alpha=8)
    expected = layer.base_layer(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(run(layer, holder, x, tasks), expected)


def test_per_task_lora_matches_reference(inputs) -> None:
    x, tasks = inputs
    layer, holder = make_layer(nn.Linear(D_IN, D_OUT), method="per_task_lora", r=2, num_experts=TASKS)
    scale = 16 / 2
    expected = torch.stack(
        [
            layer.base_layer(x[row]) + scale * x[row] @ a.T @ b.T
            for row, task in enumerate(tasks.tolist())
            for a, b in [expert_factors(layer, task, 2)]
        ]
    )
    torch.testing.assert_close(run(layer, holder, x, tasks), expected)


def test_moelora_matches_reference(inputs) -> None:
    x, tasks = inputs
    experts, rank = 4, 3
    layer, holder = make_layer(nn.Linear(D_IN, D_OUT), method="moelora", r=rank, num_experts=experts)
    router = layer.router
    rows = []
    for row, task in enumerate(tasks.tolist()):
        weights = torch.softmax(router.gate.weight @ router.task_embedding.weight[task], dim=0)
        delta = sum(
            weights[e] * (x[row] @ expert_factors(layer, e, rank)[0].T @ expert_factors(layer, e, rank)[1].T)
            for e in range(experts)
        )
        rows.append(layer.base_layer(x[row]) + (16 / rank) * delta)
    torch.testing.assert_close(run(layer, holder, x, tasks), torch.stack(rows))


@pytest.mark.parametrize("method", ["lora", "per_task_lora", "moelora"])
def test_conv1d_equals_linear(method: str, inputs) -> None:
    x, tasks = inputs
    settings = {"method": method, "r": 2, "num_experts": 1 if method == "lora" else TASKS}
    linear = nn.Linear(D_IN, D_OUT)
    conv = Conv1D(D_OUT, D_IN)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    linear_layer, linear_holder = make_layer(linear, **settings)
    conv_layer, conv_holder = make_layer(conv, **settings)
    torch.testing.assert_close(run(conv_layer, conv_holder, x, tasks), run(linear_layer, linear_holder, x, tasks))
    for task in range(TASKS):
        torch.testing.assert_close(conv_layer.delta_weight(task), linear_layer.delta_weight(task))


@pytest.mark.parametrize("method", ["lora", "per_task_lora", "moelora"])
def test_init_is_exactly_the_base_layer(method: str, inputs) -> None:
    x, tasks = inputs
    config = MixtureConfig(method=method, num_tasks=TASKS, r=2, num_experts=1 if method == "lora" else TASKS)
    holder = ContextHolder()
    layer = MixtureLinear(nn.Linear(D_IN, D_OUT), config, get_method(method), holder, "layer")
    assert torch.equal(run(layer, holder, x, tasks), layer.base_layer(x))


@pytest.mark.parametrize("method", ["lora", "per_task_lora", "moelora"])
def test_delta_weight_and_task_factors_match_forward(method: str, inputs) -> None:
    x, _ = inputs
    layer, holder = make_layer(nn.Linear(D_IN, D_OUT), method=method, r=2, num_experts=1 if method == "lora" else TASKS)
    for task in range(TASKS):
        tasks = torch.full((x.shape[0],), task)
        expected = run(layer, holder, x, tasks)
        torch.testing.assert_close(layer.base_layer(x) + x @ layer.delta_weight(task).T, expected)
        factor_a, factor_b = layer.task_factors(task)
        torch.testing.assert_close(factor_b @ factor_a, layer.delta_weight(task))
    if method == "per_task_lora":
        assert layer.task_factors(0)[0].shape[0] == 2


def test_flat_token_input_is_routed_by_sequence() -> None:
    layer, holder = make_layer(nn.Linear(D_IN, D_OUT), method="per_task_lora", r=2, num_experts=TASKS)
    x = torch.randn(2, 4, D_IN)
    tasks = torch.tensor([1, 2])
    torch.testing.assert_close(
        run(layer, holder, x.reshape(8, D_IN), tasks), run(layer, holder, x, tasks).reshape(8, D_OUT)
    )
