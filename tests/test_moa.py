"""MoA: the routed math against a slow reference, routing per row, generate, stages, new domains, save/merge."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

import tiny_models
from loramix import ConfigError, MixtureConfig, MixtureModel, get_mixture_model
from loramix.cli import main
from loramix.context import ContextHolder, RoutingContext
from loramix.gating import pool_sequences
from loramix.layer import MixtureLinear
from loramix.methods.moa import MoA
from loramix.moa import (
    DomainStreams,
    StageSettings,
    add_domain,
    domain_routers,
    grow_domain,
    route_by,
    router_accuracy,
    set_gate,
    set_route_by,
    train_experts,
    train_routers,
)
from loramix.runs.build import build_run, load_run
from loramix.runs.settings import RecipeError
from loramix.train import Recipe, Trainer, TrainerState

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

    sources = [name for name in ("bigbench-1.0.0", "wordnet-3.3") if (cache_dir() / name).is_dir()]
    if not (cache_dir() / "smollm2-135m-instruct").is_dir() or not sources:
        pytest.skip("SmolLM2 tokenizer, or BIG-bench's or WordNet's files, not in the loramix cache")
    script = Path(__file__).parents[1] / "benchmarks" / "moa_bench.py"
    monkeypatch.syspath_prepend(str(script.parent))  # it imports wordnet_tasks beside it
    spec = importlib.util.spec_from_file_location("moa_bench", script)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "moa_bench", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    source = "bigbench" if sources[0].startswith("bigbench") else "wordnet"
    bench.main(["--quick", "--source", source, "--out", str(tmp_path), "--threads", str(torch.get_num_threads())])
    added = json.loads((tmp_path / "moa_added.json").read_text())
    assert len(added["exact_match"]) == 5 and 0.0 <= added["router"]["vote_accuracy"] <= 1.0
    assert (tmp_path / "moa_table.md").is_file()


# ------------------------------------------------------------------------------------------------ core grow / one mode
def test_routing_mode_lives_in_the_config_only() -> None:
    model = moa_model()
    inputs = tiny_models.batch("llama")
    with torch.no_grad():
        routed = model(**inputs).logits
        model.mixture_config.method_options["route_by"] = "label"  # one write switches every layer
        assert all(router.route_by == "label" for router in domain_routers(model).values())
        by_label = model(**inputs, task_ids=[2, 2, 2]).logits
    assert not torch.allclose(routed, by_label)
    router = next(iter(domain_routers(model).values()))
    with pytest.raises(AttributeError):
        router.route_by = "router"  # no second copy to keep in step
    set_gate(model, "soft")
    assert router.gate == "soft" and model.mixture_config.method_options["gate"] == "soft"


def test_layer_grow_refuses_a_mixer_that_cannot_grow_and_changes_nothing() -> None:
    config = MixtureConfig(method="lora", target_modules=["q_proj"], r=RANK)
    model = get_mixture_model(tiny_models.build("llama"), config)
    layer = next(iter(model.mixture_layers().values()))
    before = {key: value.clone() for key, value in model.adapter_state_dict().items()}
    with pytest.raises(TypeError, match="cannot grow"):
        layer.grow_experts(1, RANK)
    after = model.adapter_state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before) and set(before) == set(after)


def test_grow_tasks_checks_every_name_before_changing_anything() -> None:
    config = MixtureConfig(
        method="moa", target_modules=["q_proj"], r=RANK, num_experts=2, num_tasks=2, task_names=["math", "qa"]
    )
    model = get_mixture_model(tiny_models.build("llama"), config)
    before = {key: value.clone() for key, value in model.adapter_state_dict().items()}
    with pytest.raises(ConfigError, match="'qa'"):
        MoA.grow_tasks(model, ["dates", "qa"])
    after = model.adapter_state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before) and set(before) == set(after)
    assert model.mixture_config.num_tasks == 2 and model.mixture_config.task_names == ["math", "qa"]
    assert MoA.grow_tasks(model, ["dates", "units"]) == [2, 3]
    assert model.mixture_config.num_experts == 4 and model.mixture_config.task_names[2:] == ["dates", "units"]
    for layer in model.mixture_layers().values():
        assert layer.lora_A.shape[0] == 4 * RANK and layer.router.classifier.out_features == 4
        assert layer.lora_A.requires_grad and layer.router.classifier.weight.requires_grad
    with torch.no_grad():
        model(**tiny_models.batch("llama"), task_ids=["units", "dates", "qa"])


def test_domain_streams_resume_where_they_stood() -> None:
    domains = {0: domain_examples(3, 50, seed=1, count=5), 1: domain_examples(50, 97, seed=2, count=3)}
    first = DomainStreams(domains, per_domain=2, max_length=14, pad_token_id=0, seed=4)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    second = DomainStreams(domains, per_domain=2, max_length=14, pad_token_id=0, seed=4)
    second.load_state_dict(state)
    for _ in range(4):
        expected, got = first.next_batch(), second.next_batch()
        assert all(torch.equal(expected[key], got[key]) for key in expected)


# ------------------------------------------------------------------------------------------------ recipes
SHIPPED = Path(__file__).parents[1] / "recipes"
DOMAIN_WORDS = {
    "colours": ["red", "blue", "green", "yellow", "purple", "orange"],
    "numbers": ["one", "two", "three", "four", "five", "six"],
    "animals": ["cat", "dog", "fish", "bird", "horse", "sheep"],
}
STAGE1_STEPS, STAGE2_STEPS = 4, 14


def write_domain(path: Path, name: str, count: int = 28) -> Path:
    rng = random.Random(name)
    lines = []
    for _ in range(count):
        words = [rng.choice(DOMAIN_WORDS[name]) for _ in range(4)]
        lines.append({"text": " ".join(words), "target": words[0]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def tiny_moa_recipe(
    tmp_path: Path, shipped: str, output: str, domains: list[str], data_dir: Path | None = None, **changes
) -> dict:
    """A shipped MoA recipe with its stages as they are, on tiny-llama and small JSONL domains (in ``data_dir``)."""
    data_dir = data_dir or tmp_path
    recipe = yaml.safe_load((SHIPPED / shipped).read_text())
    recipe["output_dir"] = str(tmp_path / output)
    recipe["model"] = {"name": "tiny-llama", "task_type": "generation", "max_length": 24}
    recipe["mixture"]["r"] = 2
    recipe["mixture"]["target_modules"] = ["q_proj", "v_proj"]
    recipe["data"] = {
        "tasks": [{"jsonl": str(write_domain(data_dir / f"{name}.jsonl", name)), "task": name} for name in domains],
        "validation": 4,
        "test": 4,
        "sampler": "uniform",
    }
    recipe["training"] = {
        "batch_size": 8,
        "learning_rate": 1e-2,
        "weight_decay": 0.05,
        "warmup_steps": 1,
        "keep_last": None,
        "log_every": 1,
        "progress_bar": False,
        "mixed_precision": "no",
        "use_cpu": True,
    }
    recipe["eval"] = {"batch_size": 8, "max_new_tokens": 2}
    recipe.update(changes)
    return recipe


def write_recipe(tmp_path: Path, recipe: dict, name: str) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def staged_recipe(tmp_path: Path, output: str = "run") -> dict:
    recipe = tiny_moa_recipe(tmp_path, "moa_smollm2.yaml", output, ["colours", "numbers"])
    experts, routers = recipe["stages"]
    assert experts["options"] == {"route_by": "label"} and routers["options"] == {"route_by": "router"}
    experts["max_steps"], routers["max_steps"] = STAGE1_STEPS, STAGE2_STEPS
    routers["learning_rate"], routers["warmup_steps"] = 5e-2, 1
    return recipe


def checkpoint_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"checkpoint-{step:08d}" / "adapter_model.safetensors"))


def router_accuracy_on(run, names: list[str]) -> float:
    """Mean router accuracy over layers on the run's validation and test prompts of the given domains."""
    examples = [example for example in run.split("validation") + run.split("test") if example.task in names]
    encoded = run.tokenizer([example.text for example in examples], return_tensors="pt", padding=True)
    with torch.no_grad():
        run.model(**encoded, task_ids=[run.task_set.task_id(example.task) for example in examples])
    accuracy = router_accuracy(run.model.last_records)
    return sum(accuracy.values()) / len(accuracy)


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("moa_recipe")
    assert main(["train", str(write_recipe(tmp_path, staged_recipe(tmp_path), "recipe.yaml"))]) == 0
    return tmp_path


def test_staged_recipe_trains_experts_then_routers(staged_run: Path) -> None:
    run_dir = staged_run / "run"
    initial = build_run(Recipe.from_yaml(staged_run / "recipe.yaml")).model.adapter_state_dict()
    after_experts = checkpoint_state(run_dir, STAGE1_STEPS)
    after_routers = checkpoint_state(run_dir, STAGE1_STEPS + STAGE2_STEPS)
    experts = [key for key in initial if ".lora_" in key]
    routers = [key for key in initial if ".router." in key]
    assert experts and routers and len(experts) + len(routers) == len(initial)
    for key in experts:  # stage 1 moves every expert, stage 2 none
        assert not torch.equal(initial[key], after_experts[key]), key
        assert torch.equal(after_experts[key], after_routers[key]), key
    for key in routers:  # stage 1 leaves the routers, stage 2 moves them
        assert torch.equal(initial[key], after_experts[key]), key
    assert all(not torch.equal(after_experts[key], after_routers[key]) for key in routers if key.endswith("weight"))
    config = json.loads((run_dir / f"checkpoint-{STAGE1_STEPS:08d}" / "loramix_config.json").read_text())
    assert config["method_options"]["route_by"] == "label"
    run = load_run(run_dir / "adapter")
    assert run.model.mixture_config.method_options["route_by"] == "router"
    assert router_accuracy_on(run, ["colours", "numbers"]) >= 0.75  # chance: 0.5


class Crash(RuntimeError):
    """The injected failure."""


def crash_at(step: int):
    def callback(state: TrainerState) -> None:
        if state.global_step == step:
            raise Crash(f"crash at step {step}")

    return callback


def train_with_crash(recipe: Recipe, directory: Path, crash: int | None) -> dict[str, torch.Tensor]:
    """Train ``recipe`` into ``directory``; with ``crash``, stop at that step and resume in a new process state."""

    def trainer(callbacks=()) -> Trainer:
        run = build_run(recipe)
        return Trainer(run.model, recipe.training, run.batches, directory, stages=recipe.stages, callbacks=callbacks)

    if crash is not None:
        with pytest.raises(Crash):
            trainer([crash_at(crash)]).train()
    resumed = trainer()
    resumed.train(resume_from=crash is not None)
    return resumed.model.adapter_state_dict()


def test_resume_across_the_stage_boundary_is_exact(tmp_path: Path) -> None:
    data = staged_recipe(tmp_path)
    data["training"]["save_every"] = 3  # checkpoints at 3, 4 (stage end) and 3 steps into stage 2
    recipe = Recipe.from_dict(data)
    expected = train_with_crash(recipe, tmp_path / "reference", None)
    got = train_with_crash(recipe, tmp_path / "resumed", crash=STAGE1_STEPS + 2)  # resumes at the boundary
    assert set(got) == set(expected) and all(torch.equal(got[key], expected[key]) for key in expected)


def add_domain_recipe_dict(tmp_path: Path, adapter: Path, output: str) -> dict:
    recipe = tiny_moa_recipe(
        tmp_path,
        "moa_smollm2_add_domain.yaml",
        output,
        ["colours", "numbers", "animals"],
        data_dir=adapter.parents[1],
        init_adapter=str(adapter),
    )
    new_expert, routers = recipe["stages"]
    assert new_expert["options"]["train_experts"] == ["counting"]
    new_expert["options"]["train_experts"] = ["animals"]
    new_expert["data"]["only_tasks"] = ["animals"]
    new_expert["max_steps"], routers["max_steps"] = 4, STAGE2_STEPS
    routers["learning_rate"] = 5e-2
    routers["data"]["limit_train"] = {"colours": 6, "numbers": 6}
    recipe["training"]["save_every"] = 2
    return recipe


def test_add_domain_recipe_holds_old_experts_bit_identical_across_a_resume(staged_run: Path, tmp_path: Path) -> None:
    adapter = staged_run / "run" / "adapter"
    old = load_file(str(adapter / "adapter_model.safetensors"))
    recipe = add_domain_recipe_dict(tmp_path, adapter, "grown")
    assert main(["train", str(write_recipe(tmp_path, recipe, "grow.yaml"))]) == 0
    grown = load_run(tmp_path / "grown" / "adapter")
    assert grown.task_set.names == ["colours", "numbers", "animals"]
    state = grown.model.adapter_state_dict()
    rank = 2
    for key, value in old.items():
        if key.endswith("lora_A"):
            assert state[key].shape[0] == 3 * rank and digest(state[key][: 2 * rank]) == digest(value), key
        elif key.endswith("lora_B"):
            assert digest(state[key][:, : 2 * rank]) == digest(value), key
            assert state[key][:, 2 * rank :].abs().sum() > 0, key  # the new expert learned
    # the grown split keeps the earlier domains' examples as they were
    earlier = load_run(adapter)
    assert [e for e in grown.split("test") if e.task != "animals"] == earlier.split("test")
    assert router_accuracy_on(grown, ["colours", "numbers", "animals"]) > 0.5  # chance: 1/3
    # crash inside the new expert's stage and resume: the held experts are those of the checkpoint, the same
    resumed = train_with_crash(
        Recipe.from_dict(add_domain_recipe_dict(tmp_path, adapter, "resumed")), tmp_path / "resumed", 3
    )
    assert set(resumed) == set(state) and all(torch.equal(resumed[key], state[key]) for key in state)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"route_by": "oracle"}, "route_by='oracle'"),
        ({"train_experts": ["weather"]}, "'weather'"),
        ({"eta": 1.0}, "unknown keys \\['eta'\\]"),
    ],
)
def test_bad_stage_options_are_refused_before_anything_is_written(
    tmp_path: Path, options: dict, message: str, capsys: pytest.CaptureFixture
) -> None:
    recipe = staged_recipe(tmp_path)
    recipe["stages"][0]["options"] = options
    assert main(["train", str(write_recipe(tmp_path, recipe, "recipe.yaml"))]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_init_adapter_with_another_split_is_refused(staged_run: Path, tmp_path: Path) -> None:
    recipe = add_domain_recipe_dict(tmp_path, staged_run / "run" / "adapter", "grown")
    recipe["data"]["test"] = 5
    with pytest.raises(RecipeError, match="data.test=5"):
        build_run(Recipe.from_dict(recipe))


def test_cli_resume_from_the_stage_boundary_checkpoint_gives_the_same_adapter(staged_run: Path, tmp_path: Path) -> None:
    """The boundary checkpoint's config routes by label, the recipe's by default: resume must accept it."""
    copy = tmp_path / "run"
    shutil.copytree(staged_run / "run", copy)
    shutil.rmtree(copy / f"checkpoint-{STAGE1_STEPS + STAGE2_STEPS:08d}")
    shutil.rmtree(copy / "adapter")
    recipe = yaml.safe_load((staged_run / "recipe.yaml").read_text())
    recipe["output_dir"] = str(copy)
    assert main(["train", str(write_recipe(tmp_path, recipe, "recipe.yaml")), "--resume"]) == 0
    expected = load_file(str(staged_run / "run" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(copy / "adapter" / "adapter_model.safetensors"))
    assert set(got) == set(expected) and all(torch.equal(got[key], expected[key]) for key in expected)


@pytest.mark.parametrize("name", ["moa_smollm2", "moa_smollm2_add_domain"])
def test_shipped_moa_recipes_load_round_trip_and_their_stage_options_check(name: str, tmp_path: Path) -> None:
    recipe = Recipe.from_yaml(SHIPPED / f"{name}.yaml")
    recipe.to_yaml(tmp_path / "copy.yaml")
    assert Recipe.from_yaml(tmp_path / "copy.yaml") == recipe
    names = [source.task for source in recipe.data.tasks]
    config = MixtureConfig(
        method="moa", target_modules=["q_proj"], r=2, num_experts=len(names), num_tasks=len(names), task_names=names
    )
    for stage in recipe.stages:
        MoA.check_stage_options(config, stage.options)


def test_resume_from_a_changed_init_adapter_is_refused_and_changes_nothing(
    staged_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    adapter = tmp_path / "init"  # a copy of the adapter the new run starts from, to change it afterwards
    shutil.copytree(staged_run / "run" / "adapter", adapter)
    data = add_domain_recipe_dict(tmp_path, staged_run / "run" / "adapter", "grown")
    data["init_adapter"] = str(adapter)
    recipe = write_recipe(tmp_path, data, "grow.yaml")
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "grown"
    assert "init_adapter" in json.loads((run / "run.json").read_text())["fingerprint"]
    weights = adapter / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(key for key in state if key.endswith("lora_B"))
    state[key] = state[key] + 1.0  # the adapter the run started from is not the same any more
    save_file(state, str(weights))
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    assert main(["train", str(recipe), "--resume"]) == 2
    assert "init_adapter.adapter_model.safetensors" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
