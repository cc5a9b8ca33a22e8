"""The contract every registered method keeps, checked on a two-layer model small enough to sweep them all.

At initialisation the mixture is the base model; ``Conv1D`` and ``nn.Linear`` give the same layer; a method
that depends on the task alone merges (and its ``task_factors``, what export writes, multiply to the same
delta) to the forward's numbers, and one routed on the input refuses clearly and changes nothing; save and
load are exact; each row of a mixed-task batch is routed as if alone; bf16 runs on the CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import typing

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramix import ConfigError, MixtureConfig, MixtureModel, get_mixture_model
from loramix.context import ContextHolder, RoutingContext
from loramix.layer import MixtureLinear
from loramix.methods import available_methods, get_method
from tiny_models import METHOD_SETTINGS

D_MODEL, D_HIDDEN, TASKS = 12, 24, 3
CASES = {method: (method, METHOD_SETTINGS[method]) for method in available_methods()}
CASES["moa_label"] = ("moa", {**METHOD_SETTINGS["moa"], "method_options": {"route_by": "label"}})
CLOSE = {"rtol": 1e-5, "atol": 1e-5}


class TwoLayers(nn.Module):
    """d -> 2d -> d with a nonlinearity: two adapted layers of different shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D_MODEL, D_HIDDEN)
        self.down = nn.Linear(D_HIDDEN, D_MODEL)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def config_of(case: str) -> MixtureConfig:
    method, settings = CASES[case]
    return MixtureConfig(method=method, num_tasks=TASKS, **copy.deepcopy(settings))


def base_model(dtype: torch.dtype = torch.float32) -> TwoLayers:
    torch.manual_seed(0)
    return TwoLayers().to(dtype).eval()


def randomize(module: nn.Module, seed: int = 1) -> None:
    """Random values for every adapter parameter (B starts at zero, so the delta would be zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.requires_grad and "base_layer" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def mixture_of(case: str, dtype: torch.dtype = torch.float32) -> MixtureModel:
    mixture = get_mixture_model(base_model(dtype), config_of(case))
    randomize(mixture)
    return mixture.eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [3, 5, d], attention_mask with padding, and one task per row."""
    x = torch.randn(3, 5, D_MODEL, generator=torch.Generator().manual_seed(7))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    return x, mask, torch.tensor([0, 2, 1])


def digest(module: nn.Module) -> str:
    hasher = hashlib.sha256()
    for name, tensor in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().float().numpy().tobytes())
    return hasher.hexdigest()


@pytest.mark.parametrize("case", CASES)
def test_output_equals_the_base_model_at_initialisation(case: str) -> None:
    x, mask, tasks = inputs()
    reference = base_model()
    mixture = get_mixture_model(base_model(), config_of(case)).eval()
    with torch.no_grad():
        assert torch.equal(mixture(x, attention_mask=mask, task_ids=tasks), reference(x))


@pytest.mark.parametrize("case", CASES)
def test_conv1d_equals_linear(case: str) -> None:
    config = config_of(case)
    method = get_method(config.method)
    linear = nn.Linear(D_MODEL, D_HIDDEN)
    conv = Conv1D(D_HIDDEN, D_MODEL)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    layers = [MixtureLinear(base, config, method, ContextHolder(), "layer").eval() for base in (linear, conv)]
    randomize(layers[0])
    adapter = {key: value for key, value in layers[0].state_dict().items() if not key.startswith("base_layer.")}
    layers[1].load_state_dict(adapter, strict=False)
    x, mask, tasks = inputs()
    outputs = []
    for layer in layers:
        with layer.holder.activate(RoutingContext(task_ids=tasks, attention_mask=mask)), torch.no_grad():
            outputs.append(layer(x))
    torch.testing.assert_close(outputs[1], outputs[0], **CLOSE)
    if layers[0].mergeable:
        for task in range(TASKS):
            torch.testing.assert_close(layers[1].delta_weight(task), layers[0].delta_weight(task), **CLOSE)


@pytest.mark.parametrize("case", CASES)
def test_merge_and_task_factors_equal_the_forward_or_refuse(case: str, tmp_path) -> None:
    mixture = mixture_of(case)
    x, mask, _ = inputs()
    layers = mixture.mixture_layers()
    if not all(layer.mergeable for layer in layers.values()):
        before = digest(mixture)
        for call in (
            lambda: mixture.merge(0),
            lambda: mixture.export(tmp_path / "out", task=0),
            *(lambda layer=layer: layer.delta_weight(0) for layer in layers.values()),
            *(lambda layer=layer: layer.task_factors(0) for layer in layers.values()),
            *(lambda layer=layer: layer.merge(0) for layer in layers.values()),
        ):
            with pytest.raises(TypeError, match="route|routes"):
                call()
        assert digest(mixture) == before and not (tmp_path / "out").exists()
        return
    for task in range(TASKS):
        task_ids = torch.full((3,), task)
        with torch.no_grad():
            expected = mixture(x, attention_mask=mask, task_ids=task_ids)
            torch.testing.assert_close(mixture.merge(task)(x), expected, **CLOSE)
        for layer in layers.values():
            factor_a, factor_b = layer.task_factors(task)
            assert factor_a.shape[1] == layer.in_features and factor_b.shape[0] == layer.out_features
            torch.testing.assert_close(factor_b @ factor_a, layer.delta_weight(task), **CLOSE)
    layer = layers["up"]
    weight = layer.base_layer.weight.detach().clone()
    layer.merge(1)
    assert not torch.equal(layer.base_layer.weight, weight)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, **CLOSE)


@pytest.mark.parametrize("case", CASES)
def test_save_and_load_are_exact(case: str, tmp_path) -> None:
    mixture = mixture_of(case)
    x, mask, tasks = inputs()
    mixture.save_pretrained(tmp_path)
    loaded = MixtureModel.from_pretrained(base_model(), tmp_path)
    assert loaded.adapter_state_dict().keys() == mixture.adapter_state_dict().keys()
    with torch.no_grad():
        assert torch.equal(
            loaded(x, attention_mask=mask, task_ids=tasks), mixture(x, attention_mask=mask, task_ids=tasks)
        )


@pytest.mark.parametrize("case", CASES)
def test_each_row_of_a_mixed_task_batch_is_routed_as_if_alone(case: str) -> None:
    mixture = mixture_of(case)
    x, mask, tasks = inputs()
    with torch.no_grad():
        together = mixture(x, attention_mask=mask, task_ids=tasks)
        for row in range(3):
            alone = mixture(x[row : row + 1], attention_mask=mask[row : row + 1], task_ids=tasks[row : row + 1])
            torch.testing.assert_close(together[row : row + 1], alone, **CLOSE)


@pytest.mark.parametrize("case", CASES)
def test_bf16_on_the_cpu_follows_float32(case: str) -> None:
    reference = mixture_of(case)
    mixture = get_mixture_model(base_model(torch.bfloat16), config_of(case)).eval()
    with torch.no_grad():
        for (_, param), (_, source) in zip(mixture.named_parameters(), reference.named_parameters(), strict=True):
            param.copy_(source)
        for (_, buffer), (_, source) in zip(mixture.named_buffers(), reference.named_buffers(), strict=True):
            buffer.copy_(source)
    x, mask, tasks = inputs()
    output = mixture(x.bfloat16(), attention_mask=mask, task_ids=tasks)
    assert output.dtype == torch.bfloat16
    with torch.no_grad():
        expected = reference(x, attention_mask=mask, task_ids=tasks)
    assert (output.float() - expected).norm() <= 0.02 * expected.norm()  # bf16 keeps ~3 significant digits
    mixture.train()
    mixture(x.bfloat16(), attention_mask=mask, task_ids=tasks).float().pow(2).mean().backward()
    grads = {name: param.grad for name, param in mixture.named_parameters() if param.requires_grad}
    assert all(grads[name] is not None for name in grads if "lora_" in name)  # (MoA's router learns from labels)
    assert all(torch.isfinite(grad).all() for grad in grads.values() if grad is not None)


@pytest.mark.parametrize("method", available_methods())
def test_options_are_typed_and_unknown_keys_are_named(method: str) -> None:
    settings = METHOD_SETTINGS[method]
    options_class = get_method(method).Options
    parsed = get_method(method).options(MixtureConfig(method=method, num_tasks=TASKS, **settings))
    assert isinstance(parsed, options_class)
    wrong = {bool: "yes", str: 3, int: 2.5, float: True}
    for field in dataclasses.fields(options_class):
        hint = typing.get_type_hints(options_class)[field.name]
        kind = next((kind for kind in wrong if kind is hint or kind in typing.get_args(hint)), None)
        value = wrong[kind] if kind is not None else "not a list"
        with pytest.raises(ConfigError, match=field.name):
            MixtureConfig(method=method, num_tasks=TASKS, **{**settings, "method_options": {field.name: value}})
    with pytest.raises(ConfigError, match="'no_such_option'"):
        MixtureConfig(method=method, num_tasks=TASKS, **{**settings, "method_options": {"no_such_option": 1}})


def test_configs_saved_with_a_task_embedding_width_still_load() -> None:
    """Earlier saves wrote ``task_embedding_dim`` for every method; it is MOELoRA's option now."""
    saved = {"method": "moelora", "r": 2, "num_experts": 3, "num_tasks": 3, "task_embedding_dim": 16}
    config = MixtureConfig.from_dict({**saved, "peft_type": "LORAMIX"})
    assert config.method_options == {"task_embedding_dim": 16}
    layer = MixtureLinear(nn.Linear(D_MODEL, D_HIDDEN), config, get_method("moelora"), ContextHolder(), "layer")
    assert layer.router.task_embedding.weight.shape == (TASKS, 16)
    assert MixtureConfig.from_dict({"method": "lora", "task_embedding_dim": 64}).method_options == {}
