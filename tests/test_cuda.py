"""CUDA paths (skipped without a GPU): the fused layer and a whole mixture on the device, fp32 and bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loramix import MixtureConfig, MixtureModel, get_mixture_model
from tiny_models import TARGETS, batch, build, randomize_adapters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TASKS = torch.tensor([0, 2, 1])


def mixture_on(device: str, dtype: torch.dtype, method: str = "moelora") -> MixtureModel:
    base = build("llama").to(device=device, dtype=dtype)
    experts = 3 if method != "lora" else 1
    config = MixtureConfig(method=method, r=2, num_experts=experts, num_tasks=3, target_modules=TARGETS["llama"])
    mixture = get_mixture_model(base, config)
    randomize_adapters(mixture)
    return mixture.eval()


def on(device: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in inputs.items()}


@pytest.mark.parametrize("method", ["lora", "per_task_lora", "moelora"])
def test_cuda_forward_matches_cpu(method: str) -> None:
    inputs = batch("llama")
    cpu = mixture_on("cpu", torch.float32, method)(**inputs, task_ids=TASKS).logits
    gpu = mixture_on("cuda", torch.float32, method)(**on("cuda", inputs), task_ids=TASKS.cuda()).logits
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


def test_cuda_bf16_trains_and_merges(tmp_path) -> None:
    mixture = mixture_on("cuda", torch.bfloat16)
    inputs = on("cuda", batch("llama"))
    mixture.train()
    loss = mixture(**inputs, labels=inputs["input_ids"], task_ids=TASKS.cuda()).loss
    loss.backward()
    trainable = [p for p in mixture.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all() for p in trainable)
    banks = [p for name, p in mixture.named_parameters() if "lora_" in name]
    assert banks and all(p.dtype == torch.bfloat16 for p in banks)
    mixture.eval()
    tasks = torch.ones(3, dtype=torch.long, device="cuda")
    expected = mixture(**inputs, task_ids=tasks).logits.float()
    merged = mixture.merge(1)
    torch.testing.assert_close(merged(**inputs).logits.float(), expected, rtol=0.05, atol=0.05)
    mixture.save_pretrained(tmp_path)
    restored = MixtureModel.from_pretrained(build("llama").to("cuda", torch.bfloat16), tmp_path)
    torch.testing.assert_close(restored(**inputs, task_ids=tasks).logits.float(), expected, rtol=0, atol=0)


def test_cuda_export_matches_peft() -> None:
    mixture = mixture_on("cuda", torch.float32)
    reference = build("llama").cuda()
    inputs = on("cuda", batch("llama"))
    expected = mixture(**inputs, task_ids=torch.full((3,), 2, device="cuda")).logits
    directory = "/tmp/loramix_cuda_export"
    mixture.export(directory, task=2)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), directory).eval()
    torch.testing.assert_close(peft_model(**inputs).logits, expected, rtol=1e-3, atol=1e-3)
