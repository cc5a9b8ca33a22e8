"""The fused mixture layer against slow per-expert references written here."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramix import get_mixture_model
from loramix.config import ConfigError, MixtureConfig
from loramix.context import ContextHolder, RoutingContext
from loramix.layer import MixtureLinear
from loramix.methods import get_method
from tiny_models import TARGETS, batch, build, randomize_adapters

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


@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_melora_matches_mini_lora_loop(base: str, inputs) -> None:
    """MELoRA: n mini LoRAs, each mapping its slice of the input to its slice of the output (n = 2, r = 3)."""
    x, tasks = inputs
    blocks, rank = 2, 3
    base_layer = nn.Linear(D_IN, D_OUT) if base == "linear" else Conv1D(D_OUT, D_IN)
    layer, holder = make_layer(base_layer, method="melora", r=rank, num_experts=blocks, lora_alpha=6)
    assert layer.lora_A.shape == (blocks * rank, D_IN // blocks) and layer.lora_B.shape == (
        D_OUT // blocks,
        blocks * rank,
    )
    expected = layer.base_layer(x).clone()
    d_in, d_out = D_IN // blocks, D_OUT // blocks
    for i in range(blocks):
        mini_a = layer.lora_A[i * rank : (i + 1) * rank]  # r × d_in/n
        mini_b = layer.lora_B[:, i * rank : (i + 1) * rank]  # d_out/n × r
        expected[..., i * d_out : (i + 1) * d_out] += (
            (6 / rank) * x[..., i * d_in : (i + 1) * d_in] @ mini_a.T @ mini_b.T
        )
    torch.testing.assert_close(run(layer, holder, x, tasks), expected)
    delta = layer.delta_weight(0)
    assert torch.count_nonzero(delta[:d_out, d_in:]) == 0 and torch.count_nonzero(delta[d_out:, :d_in]) == 0
    torch.testing.assert_close(layer.base_layer(x) + x @ delta.T, expected)
    factor_a, factor_b = layer.task_factors(2)
    assert factor_a.shape == (blocks * rank, D_IN)
    torch.testing.assert_close(factor_b @ factor_a, delta)


def test_melora_refuses_a_layer_it_cannot_split() -> None:
    with pytest.raises(ConfigError, match="diagonal blocks"):
        make_layer(nn.Linear(D_IN, D_OUT), method="melora", r=2, num_experts=4)  # 10 outputs: not 4 blocks


def test_melora_merges_and_exports_like_lora(tmp_path) -> None:
    reference = build("llama")
    mixture = get_mixture_model(
        copy.deepcopy(reference),
        MixtureConfig(method="melora", r=2, num_experts=4, num_tasks=2, target_modules=TARGETS["llama"]),
    )
    randomize_adapters(mixture)
    inputs = batch("llama")
    with torch.no_grad():
        expected = mixture(**inputs).logits
        torch.testing.assert_close(mixture.merge(0)(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
    mixture.export(tmp_path, task=1)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
