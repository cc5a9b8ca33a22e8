"""MoA: the routed math against a slow reference, routing per row, generate, stages, new domains, save/merge."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

import tiny_models
from loramix import ConfigError, MixtureConfig, MixtureModel, get_mixture_model
from loramix.context import ContextHolder, RoutingContext
from loramix.gating import pool_sequences
from loramix.layer import MixtureLinear
from loramix.methods.moa import MoA
from loramix.moa import (
    StageSettings,
    add_domain,
    domain_routers,
    grow_domain,
    route_by,
    router_accuracy,
    set_route_by,
    train_experts,
    train_routers,
)

RANK = 3
SETTINGS = StageSettings(steps=4, per_domain_batch=2, lr=1e-2, weight_decay=0.01, max_length=14)


def moa_model(arch: str = "llama", domains: int = 3, gate: str = "top1") -> MixtureModel:
    config = MixtureConfig(
        method="moa",
        target_modules=tiny_models.TARGETS[arch],
        r=RANK,
        num_experts=domains,
        num_tasks=domains,
        method_options={"gate": gate},
    )
    model = get_mixture_model(tiny_models.build(arch), config)
    tiny_models.randomize_adapters(model)
    return model


def domain_examples(low: int, high: int, seed: int, count: int = 6, length: int = 12) -> list[dict[str, list[int]]]:
    """Token sequences drawn from [low, high): a domain the router can tell apart by its tokens."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        ids = torch.randint(low, high, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    return examples


def experts_of(model: MixtureModel, domain: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    span = slice(domain * RANK, (domain + 1) * RANK)
    return [(layer.lora_A[span].clone(), layer.lora_B[:, span].clone()) for layer in model.mixture_layers().values()]


def same_experts(first: list, second: list) -> bool:
    return all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, second, strict=True))


# ------------------------------------------------------------------------------------------------ math
@pytest.mark.parametrize("gate", ["top1", "soft"])
def test_layer_matches_a_loop_over_experts(gate: str) -> None:
    torch.manual_seed(0)
    config = MixtureConfig(
        method="moa", target_modules=["x"], r=RANK, num_experts=4, num_tasks=4, method_options={"gate": gate}
    )
    holder = ContextHolder()
    layer = MixtureLinear(nn.Linear(8, 6), config, MoA, holder, "layer")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.classifier.weight.normal_()
        layer.router.classifier.bias.normal_()
    x = torch.randn(5, 7, 8)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, :2] = 0
    labels = torch.tensor([0, 1, 2, 3, 1])
    with holder.activate(RoutingContext(task_ids=labels, attention_mask=mask)) as context:
        out = layer(x)
    for row in range(5):
        pooled = x[row][mask[row].bool()].mean(0)
        probs = torch.softmax(layer.router.classifier(pooled / pooled.pow(2).mean().add(1e-6).sqrt()), -1)
        weights = probs if gate == "soft" else torch.nn.functional.one_hot(probs.argmax(), 4).float()
        expected = layer.base_layer(x[row])
        for expert in range(4):
            span = slice(expert * RANK, (expert + 1) * RANK)
            delta = x[row] @ layer.lora_A[span].T @ layer.lora_B[:, span].T
            expected = expected + weights[expert] * layer.scale * delta
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)
    logits = layer.router.logits(x, mask)
    torch.testing.assert_close(context.aux_losses["router"][0], nn.functional.cross_entropy(logits, labels))
    assert context.records["layer"]["accuracy"] == float((logits.argmax(-1) == labels).float().mean())


def test_pooling_ignores_padding() -> None:
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    torch.testing.assert_close(pool_sequences(x, mask), torch.stack([x[0, :2].mean(0), x[1, 1:].mean(0)]))


def test_top1_gate_is_exactly_one_and_trains_the_router() -> None:
    model = moa_model()
    inputs = tiny_models.batch("llama")
    outputs = model(**inputs, labels=inputs["input_ids"])
    router = next(iter(domain_routers(model).values()))
    outputs.loss.backward()
    assert router.classifier.weight.grad.abs().sum() > 0
    gate = router.route(torch.randn(3, 7, 32), RoutingContext())
    assert set(gate.unique().tolist()) <= {0.0, 1.0} and torch.all(gate.sum(-1) == RANK)


# ------------------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["router", "label"])
def test_mixed_batch_routes_each_row_as_if_alone(arch: str, mode: str) -> None:
    model = moa_model(arch)
    set_route_by(model, mode)
    inputs = tiny_models.batch(arch, batch_size=3)
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        together = model(**inputs, task_ids=labels).logits
        for row in range(3):
            alone = model(**{k: v[row : row + 1] for k, v in inputs.items()}, task_ids=labels[row : row + 1]).logits
            real = inputs["attention_mask"][row].bool()
            torch.testing.assert_close(together[row][real], alone[0][real], rtol=1e-4, atol=1e-5)


def test_label_routing_overrides_router_and_needs_labels() -> None:
    model = moa_model()
    inputs = tiny_models.batch("llama")
    with torch.no_grad():
        for router in domain_routers(model).values():
            router.classifier.bias.copy_(torch.tensor([0.0, 100.0, 0.0]))  # the router always picks domain 1
        routed = model(**inputs).logits
        with route_by(model, "label"):
            with pytest.raises(ValueError, match="task_ids"):
                model(**inputs)
            by_label = [model(**inputs, task_ids=[domain] * 3).logits for domain in range(3)]
    assert model.mixture_config.method_options["route_by"] == "router"
    torch.testing.assert_close(by_label[1], routed, rtol=0, atol=0)
    assert not torch.allclose(by_label[0], routed) and not torch.allclose(by_label[2], routed)


def test_router_loss_and_accuracy_records() -> None:
    model = moa_model()
    inputs = tiny_models.batch("llama")
    plain = model(**inputs, labels=inputs["input_ids"])
    with_labels = model(**inputs, labels=inputs["input_ids"], task_ids=[0, 1, 2])
    router_loss = model.last_aux_losses["router"]
    torch.testing.assert_close(with_labels.loss, plain.loss + MoA.default_aux_loss_weight * router_loss)
    accuracy = router_accuracy(model.last_records)
    assert set(accuracy) == set(model.mixture_layers()) and all(0.0 <= a <= 1.0 for a in accuracy.values())


def test_generate_keeps_the_prompt_route_for_every_token() -> None:
    model = moa_model()
    inputs = tiny_models.batch("llama", batch_size=3)
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)  # left padding for generation
    with torch.no_grad():
        model(**inputs)
    prompt_experts = {name: record["experts"] for name, record in model.last_records.items()}
    calls: list[int] = []
    hooks = [
        router.classifier.register_forward_hook(lambda *_: calls.append(1)) for router in domain_routers(model).values()
    ]
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for hook in hooks:
        hook.remove()
    assert len(calls) == len(prompt_experts)  # one routing per layer, on the prompt
    # Reference: each layer routed by label to the expert its router chose on the prompt.
    for name, router in domain_routers(model).items():
        router.route = lambda x, context, router=router, chosen=prompt_experts[name]: router.expert_gates(
            chosen.repeat_interleave(x.shape[0] // chosen.shape[0])
        )
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("gate", ["top1", "soft"])
def test_activation_checkpointing_gives_the_same_gradients(gate: str) -> None:
    grads = []
    for checkpointing in (False, True):
        model = moa_model(gate=gate).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        inputs = tiny_models.batch("llama")
        model(**inputs, labels=inputs["input_ids"], task_ids=[0, 1, 2]).loss.backward()
        grads.append([param.grad for param in model.parameters() if param.requires_grad])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ stages
def test_stage1_expert_does_not_depend_on_other_domains_data() -> None:
    first, second = moa_model(domains=2), moa_model(domains=2)
    train_experts(first, {0: domain_examples(3, 50, seed=1), 1: domain_examples(50, 97, seed=2)}, SETTINGS)
    train_experts(second, {0: domain_examples(3, 50, seed=1), 1: domain_examples(50, 97, seed=3)}, SETTINGS)
    assert same_experts(experts_of(first, 0), experts_of(second, 0))
    assert not same_experts(experts_of(first, 1), experts_of(second, 1))


def test_stage1_leaves_absent_domains_and_routers_untouched() -> None:
    model = moa_model()
    before = experts_of(model, 1)
    routers = [router.classifier.weight.clone() for router in domain_routers(model).values()]
    losses = train_experts(model, {0: domain_examples(3, 50, 1), 2: domain_examples(50, 97, 2)}, SETTINGS)
    assert same_experts(before, experts_of(model, 1)) and len(losses) == SETTINGS.steps
    after = [router.classifier.weight for router in domain_routers(model).values()]
    assert all(torch.equal(w, r) for w, r in zip(routers, after, strict=True))


def test_stage2_learns_to_route_with_experts_frozen() -> None:
    model = moa_model(domains=2)
    domains = {0: domain_examples(3, 40, seed=1, count=8), 1: domain_examples(60, 97, seed=2, count=8)}
    frozen = experts_of(model, 0) + experts_of(model, 1)
    settings = StageSettings(steps=25, per_domain_batch=4, lr=5e-2, max_length=14)
    train_routers(model, domains, settings)
    assert same_experts(frozen, experts_of(model, 0) + experts_of(model, 1))
    batch = {"input_ids": torch.tensor([domains[0][0]["input_ids"], domains[1][0]["input_ids"]])}
    with torch.no_grad():
        model(**batch, task_ids=[0, 1])
    assert min(router_accuracy(model.last_records).values()) == 1.0


def test_add_domain_keeps_earlier_experts_byte_identical() -> None:
    model = moa_model(domains=2)
    set_route_by(model, "label")
    inputs = tiny_models.batch("llama", batch_size=2)
    with torch.no_grad():
        old_logits = model(**inputs, task_ids=[0, 1]).logits
    old = [experts_of(model, 0), experts_of(model, 1)]
    replay = {0: domain_examples(3, 40, 1, count=2), 1: domain_examples(40, 70, 2, count=2)}
    new = add_domain(model, domain_examples(70, 97, 3), replay, SETTINGS, SETTINGS)
    assert new == 2 and model.mixture_config.num_tasks == 3 and model.mixture_config.num_experts == 3
    assert same_experts(old[0], experts_of(model, 0)) and same_experts(old[1], experts_of(model, 1))
    assert all(layer.lora_B[:, 2 * RANK :].abs().sum() > 0 for layer in model.mixture_layers().values())
    assert all(router.classifier.weight.shape[0] == 3 for router in domain_routers(model).values())
    assert model.mixture_config.method_options["route_by"] == "router"
    with torch.no_grad(), route_by(model, "label"):  # equal up to the GEMM's wider rank (zero columns)
        torch.testing.assert_close(model(**inputs, task_ids=[0, 1]).logits, old_logits, rtol=1e-5, atol=1e-6)


def test_grow_domain_keeps_router_rows_and_names() -> None:
    config = MixtureConfig(
        method="moa", target_modules=["q_proj"], r=RANK, num_experts=2, num_tasks=2, task_names=["math", "qa"]
    )
    model = get_mixture_model(tiny_models.build("llama"), config)
    tiny_models.randomize_adapters(model)
    rows = {name: (r.classifier.weight.clone(), r.classifier.bias.clone()) for name, r in domain_routers(model).items()}
    with pytest.raises(ConfigError, match="name"):
        grow_domain(model, "qa")
    assert grow_domain(model, "dates") == 2 and model.mixture_config.task_names == ["math", "qa", "dates"]
    for name, router in domain_routers(model).items():
        assert torch.equal(router.classifier.weight[:2], rows[name][0])
        assert torch.equal(router.classifier.bias[:2], rows[name][1])
        assert not router.classifier.weight[2].any()
    model(**tiny_models.batch("llama"), task_ids=["dates", "qa", "math"])


# ------------------------------------------------------------------------------------------------ save / merge
def test_save_load_after_add_domain(tmp_path: Path) -> None:
    model = moa_model(domains=2)
    grow_domain(model)
    tiny_models.randomize_adapters(model, seed=5)
    inputs = tiny_models.batch("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = MixtureModel.from_pretrained(tiny_models.build("llama"), tmp_path)
    assert loaded.mixture_config.num_tasks == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)


def test_merge_with_label_equals_unmerged_and_router_mode_refuses() -> None:
    model = moa_model()
    inputs = tiny_models.batch("llama")
    with pytest.raises(TypeError, match="routes on the input"):
        model.merge(1)
    with route_by(model, "label"), torch.no_grad():
        expected = model(**inputs, task_ids=[1, 1, 1]).logits
        merged = model.merge(1)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_by_label_loads_in_peft_with_same_logits(tmp_path: Path) -> None:
    model = moa_model()
    inputs = tiny_models.batch("llama")
    with route_by(model, "label"), torch.no_grad():
        expected = model(**inputs, task_ids=[2, 2, 2]).logits
        model.export(tmp_path, task=2)
    with pytest.raises(TypeError, match="routes on the input"):
        model.export(tmp_path / "routed", task=2)
    peft_model = PeftModel.from_pretrained(tiny_models.build("llama"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="route_by"):
        MixtureConfig(method="moa", num_experts=2, num_tasks=2, method_options={"route_by": "oracle"})
    with pytest.raises(ConfigError, match="one expert per domain"):
        MixtureConfig(method="moa", num_experts=3, num_tasks=2)
    with pytest.raises(ConfigError, match="unknown keys"):
        MixtureConfig(method="moa", num_experts=2, num_tasks=2, method_options={"eta": 1})
    with pytest.raises(ValueError, match="route_by"):
        set_route_by(moa_model(), "oracle")


def test_quick_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loramix.assets import cache_dir

    if not (cache_dir() / "smollm2-135m-instruct").is_dir() or not (cache_dir() / "bigbench-1.0.0").is_dir():
        pytest.skip("SmolLM2 tokenizer or BIG-bench files not in the loramix cache")
    script = Path(__file__).parents[1] / "benchmarks" / "moa_bench.py"
    spec = importlib.util.spec_from_file_location("moa_bench", script)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "moa_bench", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path), "--threads", str(torch.get_num_threads())])
    added = json.loads((tmp_path / "moa_added.json").read_text())
    assert len(added["exact_match"]) == 5 and 0.0 <= added["router"]["vote_accuracy"] <= 1.0
    assert (tmp_path / "moa_table.md").is_file()
