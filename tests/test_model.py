"""MixtureModel on four architectures: identity at init, routing, gradients, merge, export, save/load, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loramix import ConfigError, MixtureConfig, MixtureLinear, MixtureModel, get_mixture_model
from tiny_models import ARCHITECTURES, TARGETS, batch, build, randomize_adapters
from tiny_models import METHOD_SETTINGS as EVERY_METHOD

NUM_TASKS = 3
# float tolerance for two computations of the same function in a different order (merge, export, batching)
CLOSE = {"rtol": 1e-4, "atol": 1e-4}
METHOD_SETTINGS = {
    "lora": {"r": 4},
    "per_task_lora": {"r": 2, "num_experts": NUM_TASKS},
    "moelora": {"r": 2, "num_experts": 4},
}


def make(arch: str, method: str, **overrides) -> tuple[torch.nn.Module, MixtureModel]:
    """A reference copy of the base model and a mixture over another copy."""
    base = build(arch)
    reference = copy.deepcopy(base)
    own = METHOD_SETTINGS.get(method, EVERY_METHOD[method])
    settings = {"method": method, "num_tasks": NUM_TASKS, "target_modules": TARGETS[arch], **own}
    settings.update(overrides)
    mixture = get_mixture_model(base, MixtureConfig(**settings)).eval()
    return reference, mixture


TASKS = torch.tensor([0, 2, 1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_initial_outputs_equal_base(arch: str, method: str) -> None:
    reference, mixture = make(arch, method)
    inputs = batch(arch)
    expected = reference(**inputs).logits
    # Each adapted layer is exact at init (tests/test_layer.py); through a whole model, oneDNN may round
    # differently for differently aligned buffers, so allow float noise.
    torch.testing.assert_close(mixture(**inputs, task_ids=TASKS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_targets_and_trainable_parameters(arch: str) -> None:
    _, mixture = make(arch, "moelora")
    layers = mixture.mixture_layers()
    assert layers and all(any(name.endswith(t) for t in TARGETS[arch]) for name in layers)
    trainable = {name for name, p in mixture.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in name or ".router." in name) for name in trainable)
    assert not any("base_layer" in name for name in trainable)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_reach_adapters_only(arch: str) -> None:
    reference, mixture = make(arch, "moelora")
    randomize_adapters(mixture)
    mixture.train()
    inputs = batch(arch)
    mixture(**inputs, task_ids=TASKS).logits.float().pow(2).mean().backward()
    for name, param in mixture.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["per_task_lora", "moelora"])
def test_mixed_batch_equals_single_task_rows(arch: str, method: str) -> None:
    _, mixture = make(arch, method)
    randomize_adapters(mixture)
    inputs = batch(arch)
    mixed = mixture(**inputs, task_ids=TASKS).logits
    for row, task in enumerate(TASKS.tolist()):
        single = {key: value[row : row + 1] for key, value in inputs.items()}
        alone = mixture(**single, task_ids=torch.tensor([task])).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, **CLOSE)
    # different tasks really give different outputs
    same_input = {key: value[:1].expand(NUM_TASKS, *value.shape[1:]) for key, value in inputs.items()}
    per_task = mixture(**same_input, task_ids=torch.arange(NUM_TASKS)).logits
    assert (per_task[0] - per_task[1]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_merge_equals_unmerged_forward(arch: str, method: str) -> None:
    reference, mixture = make(arch, method)
    randomize_adapters(mixture)
    inputs = batch(arch)
    for task in range(NUM_TASKS):
        tasks = torch.full((inputs["input_ids"].shape[0],), task)
        expected = mixture(**inputs, task_ids=tasks).logits
        merged = mixture.merge(task)
        assert not any(isinstance(m, MixtureLinear) for m in merged.modules())
        assert type(merged) is type(reference)
        torch.testing.assert_close(merged(**inputs).logits, expected, **CLOSE)
        assert (merged(**inputs).logits - reference(**inputs).logits).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_export_loads_in_peft_with_same_logits(arch: str, method: str, tmp_path) -> None:
    reference, mixture = make(arch, method)
    randomize_adapters(mixture)
    inputs = batch(arch)
    task = 2
    expected = mixture(**inputs, task_ids=torch.full((3,), task)).logits
    mixture.export(tmp_path, task=task)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    torch.testing.assert_close(peft_model(**inputs).logits, expected, **CLOSE)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip_is_exact(arch: str, tmp_path) -> None:
    reference, mixture = make(arch, "moelora")
    randomize_adapters(mixture)
    inputs = batch(arch)
    expected = mixture(**inputs, task_ids=TASKS).logits
    mixture.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors", "loramix_config.json"]
    restored = MixtureModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(restored(**inputs, task_ids=TASKS).logits, expected, rtol=0, atol=0)
    assert restored.mixture_config == mixture.mixture_config


def test_layer_merge_unmerge_restores_base_weight() -> None:
    _, mixture = make("llama", "moelora")
    randomize_adapters(mixture)
    layer = next(iter(mixture.mixture_layers().values()))
    before = layer.base_layer.weight.detach().clone()
    inputs = batch("llama")
    expected = mixture(**inputs, task_ids=torch.ones(3, dtype=torch.long)).logits
    for each in mixture.mixture_layers().values():
        each.merge(1)
    torch.testing.assert_close(mixture(**inputs, task_ids=torch.ones(3, dtype=torch.long)).logits, expected)
    with pytest.raises(RuntimeError, match="merged"):
        mixture(**inputs, task_ids=TASKS)
    for each in mixture.mixture_layers().values():
        each.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=1e-6)


def test_generate_routes_each_row_by_its_task() -> None:
    _, mixture = make("llama", "per_task_lora")
    randomize_adapters(mixture, std=0.5)
    prompt = torch.randint(3, 97, (1, 5))
    prompts = prompt.expand(NUM_TASKS, 5)
    together = mixture.generate(input_ids=prompts, task_ids=torch.arange(NUM_TASKS), max_new_tokens=6, do_sample=False)
    for task in range(NUM_TASKS):
        alone = mixture.generate(input_ids=prompt, task_ids=[task], max_new_tokens=6, do_sample=False)
        assert torch.equal(together[task : task + 1], alone)
    assert mixture.holder.current is None


def test_task_names_are_accepted() -> None:
    _, mixture = make("llama", "per_task_lora", task_names=["a", "b", "c"])
    randomize_adapters(mixture)
    inputs = batch("llama")
    by_name = mixture(**inputs, task_ids=["a", "c", "b"]).logits
    torch.testing.assert_close(by_name, mixture(**inputs, task_ids=TASKS).logits)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize(
    ("task_ids", "message"),
    [
        (None, "routes by task"),
        (torch.tensor([0, 1, 3]), "out of range"),
        (torch.tensor([0, -1, 1]), "out of range"),
        (torch.tensor([0, 1]), "2 entries for a batch of 3"),
        (torch.tensor([[0, 1, 2]]), "one id per sequence"),
        (["a", "b", "x"], "unknown task"),
    ],
)
def test_bad_task_ids_raise_and_change_nothing(task_ids, message: str) -> None:
    _, mixture = make("llama", "moelora")
    randomize_adapters(mixture)
    mixture.train()
    before = _state(mixture)
    inputs = batch("llama")
    with pytest.raises(ValueError, match=message):
        mixture(**inputs, labels=inputs["input_ids"], task_ids=task_ids)
    after = _state(mixture)
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert mixture.holder.current is None


def test_lora_needs_no_task_ids() -> None:
    reference, mixture = make("gpt2", "lora")
    inputs = batch("gpt2")
    torch.testing.assert_close(mixture(**inputs).logits, reference(**inputs).logits)


def test_target_matching_no_match_lists_available() -> None:
    with pytest.raises(ConfigError, match=r"matches no adaptable module.*q_proj"):
        get_mixture_model(build("llama"), MixtureConfig(target_modules=["nonexistent"]))


def test_target_regex_all_linear_and_exclude() -> None:
    model = build("llama")
    regex = get_mixture_model(copy.deepcopy(model), MixtureConfig(target_modules=r".*layers\.0\..*_proj"))
    assert len(regex.mixture_layers()) == 7 and all(".layers.0." in n for n in regex.mixture_layers())
    everything = get_mixture_model(copy.deepcopy(model), MixtureConfig(target_modules="all-linear"))
    assert len(everything.mixture_layers()) == 14 and "lm_head" not in everything.mixture_layers()
    fewer = get_mixture_model(copy.deepcopy(model), MixtureConfig(exclude_modules=["down_proj", "up_proj"]))
    assert len(fewer.mixture_layers()) == 10


def test_modules_to_save_train_and_round_trip(tmp_path) -> None:
    reference = build("bert")
    mixture = get_mixture_model(
        copy.deepcopy(reference), MixtureConfig(target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    assert "classifier" not in " ".join(mixture.mixture_layers())
    assert mixture.base_model.classifier.weight.requires_grad
    randomize_adapters(mixture)
    with torch.no_grad():
        mixture.base_model.classifier.weight.add_(1.0)
    inputs = batch("bert")
    expected = mixture(**inputs).logits
    mixture.save_pretrained(tmp_path / "mix")
    restored = MixtureModel.from_pretrained(copy.deepcopy(reference), tmp_path / "mix")
    torch.testing.assert_close(restored(**inputs).logits, expected, rtol=0, atol=0)
    mixture.export(tmp_path / "peft", task=0)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(**inputs).logits, expected, **CLOSE)


def test_aux_losses_are_added_to_the_loss() -> None:
    _, mixture = make("llama", "moelora")
    inputs = batch("llama")
    context_loss = torch.tensor(0.5)

    def add_loss(module, args, output):
        mixture.holder.current.aux_losses["probe"].append(context_loss)

    layer = next(iter(mixture.mixture_layers().values()))
    plain = mixture(**inputs, labels=inputs["input_ids"], task_ids=TASKS).loss
    handle = layer.register_forward_hook(add_loss)
    with_aux = mixture(**inputs, labels=inputs["input_ids"], task_ids=TASKS)
    handle.remove()
    assert mixture.method.aux_loss_weight(mixture.mixture_config) == 0.0
    mixture.mixture_config.aux_loss_weight = 0.3
    handle = layer.register_forward_hook(add_loss)
    weighted = mixture(**inputs, labels=inputs["input_ids"], task_ids=TASKS)
    handle.remove()
    torch.testing.assert_close(with_aux.loss, plain)
    torch.testing.assert_close(weighted.loss, plain + 0.3 * context_loss)
    assert float(weighted["aux_losses"]["probe"]) == 0.5


@pytest.mark.parametrize("method", sorted(EVERY_METHOD))
def test_gradient_checkpointing_recomputes_with_the_same_routes(method: str) -> None:
    """Recomputing each block in the backward (the layers' custom autograd functions included) gives the
    loss, auxiliary losses and every gradient of the plain backward."""
    _, plain = make("llama", method)
    _, checkpointed = make("llama", method)
    for mixture in (plain, checkpointed):
        randomize_adapters(mixture)
        mixture.train()
    checkpointed.activation_checkpointing_enable()
    inputs = batch("llama")
    losses = []
    for mixture in (plain, checkpointed):
        loss = mixture(**inputs, labels=inputs["input_ids"], task_ids=TASKS).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **CLOSE)
    grads = {name: p.grad for name, p in plain.named_parameters() if p.requires_grad}
    for name, param in checkpointed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], **CLOSE)


def test_forward_signature_names_the_inputs_and_task_ids() -> None:
    import inspect

    _, mixture = make("llama", "moelora")
    names = list(inspect.signature(mixture.forward).parameters)
    assert names[:2] == ["input_ids", "attention_mask"] and "labels" in names and "task_ids" in names
    copied = copy.deepcopy(mixture)
    inputs = batch("llama")
    torch.testing.assert_close(copied(**inputs, task_ids=TASKS).logits, mixture(**inputs, task_ids=TASKS).logits)
    assert copied.forward.args[0] is copied
