"""Every method trains in bf16, on the CPU and (where present) on a CUDA device."""

from __future__ import annotations

import pytest
import torch

from loramix import MixtureConfig, available_methods, get_mixture_model
from tiny_models import METHOD_SETTINGS, TARGETS, batch, build

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def test_the_table_covers_every_method() -> None:
    assert sorted(METHOD_SETTINGS) == available_methods()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_every_method_trains_in_bf16(method: str, device: str) -> None:
    base = build("llama").to(device, torch.bfloat16)
    config = MixtureConfig(method=method, num_tasks=3, target_modules=TARGETS["llama"], **METHOD_SETTINGS[method])
    mixture = get_mixture_model(base, config).train()
    inputs = {key: value.to(device) for key, value in batch("llama").items()}
    loss = mixture(**inputs, labels=inputs["input_ids"], task_ids=torch.tensor([0, 2, 1], device=device)).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in mixture.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g.float()).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
