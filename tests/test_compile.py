"""Every method under torch.compile: no graph break inside the model, in training and in generate, same numbers.

Dynamo's graph-break counter is read after compiling with the ``eager`` backend (graph capture only, no C++
compile), so the test stays fast and still sees every break.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from loramix import MixtureConfig, MixtureModel, get_mixture_model
from loramix.methods import available_methods
from tiny_models import METHOD_SETTINGS, TARGETS, VOCAB, batch, randomize_adapters

TASKS = torch.tensor([0, 1, 2])


def one_layer_mixture(method: str) -> MixtureModel:
    """A one-block Llama (the smallest graph to trace) with random adapters on every projection."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    mixture = get_mixture_model(
        LlamaForCausalLM(config),
        MixtureConfig(method=method, num_tasks=3, target_modules=TARGETS["llama"], **METHOD_SETTINGS[method]),
    )
    randomize_adapters(mixture)
    return mixture


def graph_breaks() -> dict[str, int]:
    return dict(counters["graph_break"])


def train_step(mixture: MixtureModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    mixture.zero_grad()
    loss = mixture(**inputs, labels=inputs["input_ids"], task_ids=TASKS).loss
    loss.backward()
    return loss.detach(), [param.grad.clone() for param in mixture.parameters() if param.grad is not None]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", available_methods())
def test_compiled_model_has_no_graph_break_and_matches_eager(method: str) -> None:
    mixture = one_layer_mixture(method).train()
    inputs = batch("llama")
    eager_loss, eager_grads = train_step(mixture, inputs)
    eager_aux = dict(mixture.last_aux_losses)
    mixture.eval()
    with torch.no_grad():
        eager_tokens = mixture.generate(**inputs, task_ids=TASKS, max_new_tokens=2, do_sample=False, pad_token_id=0)

    mixture.base_model.compile(backend="eager")  # the wrapper checks task ids eagerly, then enters compiled code
    mixture.train()
    loss, grads = train_step(mixture, inputs)
    assert graph_breaks() == {}, f"{method}: graph breaks in a training step: {graph_breaks()}"
    assert counters["stats"]["unique_graphs"] >= 1  # the model really ran compiled
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grads, eager_grads)
    assert mixture.last_aux_losses.keys() == eager_aux.keys()

    mixture.eval()
    with torch.no_grad():
        tokens = mixture.generate(**inputs, task_ids=TASKS, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert graph_breaks() == {}, f"{method}: graph breaks in generate: {graph_breaks()}"
    assert torch.equal(tokens, eager_tokens)


def test_compiling_the_wrapper_checks_task_ids_without_a_break() -> None:
    mixture = one_layer_mixture("moelora").train()
    inputs = batch("llama")
    eager_loss, _ = train_step(mixture, inputs)
    compiled = torch.compile(mixture, backend="eager")
    loss = compiled(**inputs, labels=inputs["input_ids"], task_ids=TASKS).loss
    assert graph_breaks() == {}, graph_breaks()
    torch.testing.assert_close(loss, eager_loss)
    with pytest.raises(RuntimeError, match="task_ids out of range"):
        compiled(**inputs, task_ids=torch.tensor([0, 1, 3]))
