"""One objective whatever the batch layout: 1 process x batch 8 == batch 4 x accumulation 2 == 2 processes x 4.

Generation rows have targets of different lengths, so a mean over each micro-batch's own tokens would
weight tokens differently in each layout; the trainer divides the token-loss sum by the global batch's
target count instead. MoRE adds an auxiliary (contrastive) loss, weighted by rows the same way.
Two-process runs use torchrun with gloo on the CPU: DDP, and FSDP2 as ``accelerate launch`` with an
``fsdp_version: 2`` config asks for it (the environment variables it sets).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generation_fixtures import causal_lm, generation_examples, generation_factory
from loramix import MixtureModel
from loramix.train import TensorBatches, Trainer, TrainingSettings
from tiny_models import build
from train_fixtures import torchrun

TESTS = Path(__file__).resolve().parent
# a task gate (MOELoRA), MoRE's selector and contrastive loss, a token router folded into the A GEMM (HydraLoRA):
# each layer's custom autograd functions (stacked projection, weighted up-projection) under DDP and FSDP2
METHODS = ("moelora", "more", "hydralora")
STEPS = 3  # as in dist_worker.py
EXAMPLES = generation_examples(32)


def _train(method: str, batch_size: int, accumulation: int, directory) -> dict:
    settings = TrainingSettings(
        max_steps=STEPS,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        progress_bar=False,
        mixed_precision="no",
        use_cpu=True,
    )
    model = causal_lm(method)
    state = Trainer(model, settings, generation_factory(EXAMPLES, batch_size), directory).train()
    return {
        "method": method,
        "losses": [record["loss"] for record in state.history],
        "aux": [record.get("aux_contrastive") for record in state.history],
        "grad_norms": [record["grad_norm"] for record in state.history],
        "weights": model.adapter_state_dict(),
    }


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory) -> dict[str, dict]:
    """Each method trained in one process with one batch of 8 per step."""
    root = tmp_path_factory.mktemp("one")
    return {method: _train(method, 8, 1, root / method) for method in METHODS}


def _assert_same(got: dict, expected: dict) -> None:
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-5, abs=1e-6)
    if expected["method"] == "more":
        assert got["aux"] == pytest.approx(expected["aux"], rel=1e-5, abs=1e-6)
    for key, value in expected["weights"].items():
        torch.testing.assert_close(torch.as_tensor(got["weights"][key]), value, rtol=1e-5, atol=1e-5)
    initial = causal_lm(expected["method"]).adapter_state_dict()
    moved = max(float((value - initial[key]).abs().max()) for key, value in expected["weights"].items())
    assert moved > 1e-3  # the comparison is not between untrained adapters


def test_the_micro_batches_have_different_target_counts():
    """The premise: halves of a global batch hold different numbers of target tokens."""
    first = next(iter(TensorBatches(EXAMPLES, 8, seed=0)))
    targets = (first["labels"][:, 1:] != -100).sum(dim=1)
    assert int(targets[:4].sum()) != int(targets[4:].sum())


@pytest.mark.parametrize("method", METHODS)
def test_logged_loss_is_the_global_token_mean(one_batch, method):
    """Step 1's logged loss: token-loss sum over the batch / its target tokens (+ weighted aux for MoRE)."""
    model = causal_lm(method)
    batch = next(iter(TensorBatches(EXAMPLES, 8, seed=0)))
    model.train()
    with torch.no_grad():
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    labels = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    expected = token_loss / (labels != -100).sum()
    if method == "more":
        aux = model.last_aux_losses["contrastive"]
        assert one_batch[method]["aux"][0] == pytest.approx(float(aux), rel=1e-5)
        expected = expected + 0.1 * aux
    assert one_batch[method]["losses"][0] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_accumulation_equals_one_batch(one_batch, tmp_path, method):
    _assert_same(_train(method, 4, 2, tmp_path), one_batch[method])


def _torchrun(tmp_path, port: int, extra_env: dict[str, str], *options: str) -> dict:
    result_file = tmp_path / "result.json"
    torchrun(TESTS / "dist_worker.py", [str(tmp_path / "run"), str(result_file), *METHODS, *options], port, extra_env)
    return json.loads(result_file.read_text())


def test_two_ddp_processes_equal_one(one_batch, tmp_path):
    results = _torchrun(tmp_path, 29521, {})
    for method in METHODS:
        assert results[method]["world"] == 2 and results[method]["engine"] == "MULTI_CPU"
        _assert_same(results[method], one_batch[method])


def test_two_fsdp_processes_equal_one_save_a_loadable_adapter_and_resume_exactly(one_batch, tmp_path):
    results = _torchrun(tmp_path, 29523, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "--resume-check")
    for method in METHODS:
        assert results[method]["world"] == 2 and results[method]["engine"] == "FSDP"
        _assert_same(results[method], one_batch[method])
        # the adapter written once from gathered shards loads in this (fresh) process onto a fresh base
        loaded = MixtureModel.from_pretrained(build("llama"), tmp_path / "run" / method / "adapter")
        for key, value in one_batch[method]["weights"].items():
            torch.testing.assert_close(loaded.adapter_state_dict()[key], value, rtol=1e-5, atol=1e-5)
    # crash after step 2 (checkpointed) + resume with a fresh model under FSDP ends where the FSDP run ends
    resumed, uninterrupted = results["resumed"], results[METHODS[0]]
    assert resumed["losses"] == uninterrupted["losses"][2:]
    assert resumed["weights"] == uninterrupted["weights"]
