"""MoRE: the math against a slow reference, the release's defects as tests, ablation switches, benchmark."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from loramix import ConfigError, MixtureConfig, MixtureModel, get_mixture_model
from loramix.context import RoutingContext
from loramix.gating import pool_sequences
from loramix.methods.more import RankSelectorRouter
from tiny_models import TARGETS, batch, build, randomize_adapters

NUM_TASKS = 3
RANK = 4
CLOSE = {"rtol": 1e-4, "atol": 1e-5}
TASKS = torch.tensor([0, 2, 1])


class TinyProjection(nn.Module):
    """One linear layer, the smallest model a mixture can wrap."""

    def __init__(self, d_in: int = 6, d_out: int = 5) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def tiny_layer(**options) -> MixtureModel:
    """A MoRE mixture of rank 4 on one 6 -> 5 linear layer, with random adapter and router weights."""
    torch.manual_seed(0)
    config = MixtureConfig(
        method="more", target_modules=["proj"], r=RANK, lora_alpha=8.0, num_tasks=NUM_TASKS, method_options=options
    )
    mixture = get_mixture_model(TinyProjection(), config)
    randomize_adapters(mixture, std=0.5)
    return mixture


def reference_delta(mixture: MixtureModel, x: torch.Tensor, tasks: torch.Tensor, **options) -> torch.Tensor:
    """MoRE's delta written out: a loop over rows and an explicit prefix sum of rank-1 terms.

    For row b of task t: p = softmax(gate(e_t)) (or the logit table), k = the argmax candidate, and
    delta_b = s · Σ_{i < k} w_i · B[:, i] (A[i] · x_b), w_i = ((i + 1) / R)²; without the straight-through
    choice, delta_b = s · Σ_j p_j Σ_{i < c_j} w_i · B[:, i] (A[i] · x_b).
    """
    layer = mixture.mixture_layers()["proj"]
    router = layer.router
    candidates = sorted(options.get("candidate_ranks", range(1, RANK + 1)))  # the gate lists ranks ascending
    rows = []
    for row, task in zip(x, tasks.tolist(), strict=True):
        if options.get("task_embedding", True):
            logits = router.task_embedding[task] @ router.gate.weight.T + router.gate.bias
        else:
            logits = router.task_logits[task]
        probs = torch.softmax(logits, dim=-1)
        weights = [probs[j] for j in range(len(candidates))]
        if options.get("straight_through", True):
            best = int(probs.argmax())
            weights = [torch.tensor(1.0 if j == best else 0.0) for j in range(len(candidates))]
        delta = torch.zeros(layer.out_features)
        for weight, rank in zip(weights, candidates, strict=True):
            for i in range(rank):
                scaling = ((i + 1) / RANK) ** 2 if options.get("linear_scaling", False) else 1.0
                delta = delta + weight * scaling * layer.scale * layer.lora_B[:, i] * (layer.lora_A[i] @ row)
        rows.append(delta)
    return torch.stack(rows)


ABLATIONS = [
    {},
    {"linear_scaling": True},
    {"straight_through": False},
    {"task_embedding": False},
    {"candidate_ranks": [1, 2, 4]},
    {"candidate_ranks": [4, 1], "linear_scaling": False, "contrastive": False},
]


@pytest.mark.parametrize("options", ABLATIONS, ids=lambda options: ",".join(options) or "default")
def test_forward_matches_slow_reference_row_by_row(options) -> None:
    mixture = tiny_layer(**options).eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    tasks = torch.tensor([0, 2, 1, 2, 0])
    with torch.no_grad():
        expected = mixture.base_model.proj.base_layer(x) + reference_delta(mixture, x, tasks, **options)
        torch.testing.assert_close(mixture(x, task_ids=tasks), expected, **CLOSE)


def test_options_reach_the_router() -> None:
    router = tiny_layer(candidate_ranks=[1, 2, 4], linear_scaling=False).mixture_layers()["proj"].router
    assert router.candidate_ranks.tolist() == [1, 2, 4]
    assert router.prefix_masks.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert router.component_scaling.tolist() == [1.0] * RANK
    assert tiny_layer().mixture_layers()["proj"].router.component_scaling.tolist() == [1.0] * RANK  # default
    scaled = tiny_layer(linear_scaling=True).mixture_layers()["proj"].router.component_scaling
    torch.testing.assert_close(scaled, torch.tensor([1 / 16, 4 / 16, 9 / 16, 1.0]))
    assert not hasattr(tiny_layer(task_embedding=False).mixture_layers()["proj"].router, "task_embedding")


@pytest.mark.parametrize("linear_scaling", [False, True])
def test_task_gate_is_the_hard_prefix_with_scaling(linear_scaling) -> None:
    router = tiny_layer(linear_scaling=linear_scaling).mixture_layers()["proj"].router
    for task, rank in enumerate(router.chosen_ranks().tolist()):
        weight = [((i + 1) / RANK) ** 2 if linear_scaling else 1.0 for i in range(RANK)]
        expected = torch.tensor([weight[i] if i < rank else 0.0 for i in range(RANK)])
        torch.testing.assert_close(router.task_gate(task), expected)


def test_gate_gets_a_gradient_and_its_choice_changes_in_training() -> None:
    """The release froze the ranks at the first forward; here the straight-through gradient moves the gate."""
    # the release's scaling, under which this seed's other tasks keep their ranks (the gate is shared by tasks)
    mixture = tiny_layer(contrastive=False, linear_scaling=True).train()
    router = mixture.mixture_layers()["proj"].router
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
    tasks = torch.zeros(8, dtype=torch.long)
    before = router.chosen_ranks().clone()
    optimizer = torch.optim.SGD(router.parameters(), lr=5.0)
    base = mixture.base_model.proj.base_layer(x).detach()
    for _ in range(200):
        loss = (mixture(x, task_ids=tasks) - base).pow(2).mean()
        loss.backward()
        assert router.gate.weight.grad.abs().sum() > 0 and router.task_embedding.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        if router.chosen_ranks()[0] != before[0]:
            break
    assert router.chosen_ranks()[0] != before[0]
    assert torch.equal(router.chosen_ranks()[1:], before[1:])


def test_soft_mixture_and_logit_table_get_gradients() -> None:
    for options in ({"straight_through": False}, {"task_embedding": False}):
        mixture = tiny_layer(**options).train()
        mixture(torch.randn(3, 6), task_ids=TASKS).sum().backward()
        router = mixture.mixture_layers()["proj"].router
        assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in router.parameters())


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_contrastive_loss_matches_reference(pooling: str) -> None:
    options = dataclasses.replace(tiny_layer().mixture_layers()["proj"].router.options, contrastive_pooling=pooling)
    router = RankSelectorRouter(NUM_TASKS, 6, RANK, options)
    x = torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    if pooling == "first":
        pooled = x[:, 0]
    else:
        pooled = torch.stack([x[row, : int(mask[row].sum())].mean(0) for row in range(3)])
    torch.testing.assert_close(pool_sequences(x, mask, pooling), pooled)
    cosine = F.cosine_similarity(pooled[:, None], router.task_embedding[None], dim=-1)
    expected = F.cross_entropy(cosine / 0.05, TASKS)
    got = router.contrastive_loss(x, TASKS, RoutingContext(task_ids=TASKS, attention_mask=mask))
    torch.testing.assert_close(got, expected)


def make(arch: str, **overrides) -> tuple[nn.Module, MixtureModel]:
    """A reference base model and a MoRE mixture (random adapters, dropout off) over a copy of it."""
    base = build(arch)
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0  # T5's attention applies functional dropout with this rate
    reference = copy.deepcopy(base)
    settings = {"method": "more", "r": RANK, "num_tasks": NUM_TASKS, "target_modules": TARGETS[arch], **overrides}
    mixture = get_mixture_model(base, MixtureConfig(**settings))
    randomize_adapters(mixture)
    return reference, mixture.eval()


def chosen_ranks(mixture: MixtureModel) -> dict[str, list[int]]:
    return {name: layer.router.chosen_ranks().tolist() for name, layer in mixture.mixture_layers().items()}


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_mixed_batch_equals_single_task_rows(arch: str) -> None:
    _, mixture = make(arch)
    inputs = batch(arch)
    with torch.no_grad():
        mixed = mixture(**inputs, task_ids=TASKS).logits
        for row, task in enumerate(TASKS.tolist()):
            single = mixture(**inputs, task_ids=torch.full((3,), task)).logits
            torch.testing.assert_close(mixed[row], single[row], **CLOSE)


@pytest.mark.parametrize("arch,options", [("bert", {}), ("llama", {}), ("bert", {"straight_through": False})])
def test_merge_and_peft_export_equal_unmerged_forward(arch: str, options, tmp_path: Path) -> None:
    reference, mixture = make(arch, method_options=options)
    inputs = batch(arch)
    ranks = chosen_ranks(mixture)
    for task in range(NUM_TASKS):
        with torch.no_grad():
            expected = mixture(**inputs, task_ids=torch.full((3,), task)).logits
            torch.testing.assert_close(mixture.merge(task)(**inputs).logits, expected, **CLOSE)
        mixture.export(tmp_path / str(task), task=task, minimal_rank=True)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / str(task)).eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(**inputs).logits, expected, **CLOSE)
        saved = json.loads((tmp_path / str(task) / "adapter_config.json").read_text())["rank_pattern"]
        exported = {pattern.strip("^$").replace("\\", ""): rank for pattern, rank in saved.items()}
        assert exported == {name: ranks[name][task] if not options else RANK for name in ranks}


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_save_load_keeps_outputs_and_chosen_ranks(arch: str, tmp_path: Path) -> None:
    _, mixture = make(arch, method_options={} if arch == "bert" else {"contrastive_pooling": "mean"})
    optimizer = torch.optim.AdamW([p for p in mixture.parameters() if p.requires_grad], lr=0.05)
    inputs = batch(arch)
    mixture.train()
    labels = torch.tensor([0, 1, 2]) if arch == "bert" else inputs["input_ids"]
    for _ in range(3):
        mixture(**inputs, labels=labels, task_ids=TASKS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    mixture.eval()
    mixture.save_pretrained(tmp_path)
    loaded = MixtureModel.from_pretrained(build(arch), tmp_path)
    assert chosen_ranks(loaded) == chosen_ranks(mixture)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, task_ids=TASKS).logits, mixture(**inputs, task_ids=TASKS).logits)


@pytest.mark.parametrize("arch,pooling", [("bert", "first"), ("llama", "mean"), ("t5", "mean")])
def test_contrastive_loss_is_in_outputs_loss(arch: str, pooling: str) -> None:
    """The release computed the decoder's contrastive loss and dropped it."""
    _, mixture = make(arch, aux_loss_weight=0.5, method_options={"contrastive_pooling": pooling})
    inputs = batch(arch)
    labels = torch.tensor([0, 1, 2]) if arch == "bert" else inputs.get("decoder_input_ids", inputs["input_ids"])
    task_loss = mixture(**inputs, labels=labels, task_ids=TASKS).loss
    assert mixture.last_aux_losses == {}
    outputs = mixture.train()(**inputs, labels=labels, task_ids=TASKS)
    contrastive = outputs["aux_losses"]["contrastive"]
    assert contrastive > 0
    torch.testing.assert_close(outputs.loss, task_loss + 0.5 * contrastive)
    outputs.loss.backward()
    layer = next(iter(mixture.mixture_layers().values()))
    assert layer.router.task_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [{"contrastive": False}, {"task_embedding": False}])
def test_switches_turn_the_contrastive_loss_off(options) -> None:
    _, mixture = make("bert", method_options=options)
    outputs = mixture.train()(**batch("bert"), labels=torch.tensor([0, 1, 2]), task_ids=TASKS)
    assert "aux_losses" not in outputs and mixture.last_aux_losses == {}


def test_default_aux_loss_weight_is_a_tenth() -> None:
    _, mixture = make("bert")
    assert mixture.method.aux_loss_weight(mixture.mixture_config) == 0.1


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"method_options": {"candidate_rank": [1]}}, "unknown keys"),
        ({"method_options": {"candidate_ranks": [0, 2]}}, "candidate_ranks"),
        ({"method_options": {"candidate_ranks": [2, 9]}}, "candidate_ranks"),
        ({"method_options": {"candidate_ranks": [2, 2]}}, "candidate_ranks"),
        ({"method_options": {"candidate_ranks": []}}, "candidate_ranks"),
        ({"method_options": {"linear_scaling": "no"}}, "linear_scaling"),
        ({"method_options": {"task_embedding": False, "contrastive": True}}, "contrastive"),
        ({"method_options": {"temperature": 0}}, "temperature"),
        ({"method_options": {"contrastive_pooling": "last"}}, "contrastive_pooling"),
        ({"num_experts": 2}, "num_experts"),
    ],
)
def test_bad_options_raise_config_error_naming_the_field(overrides, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        MixtureConfig(method="more", r=8, num_tasks=2, **overrides)


def test_config_round_trip_keeps_options(tmp_path: Path) -> None:
    config = MixtureConfig(method="more", r=8, num_tasks=2, method_options={"candidate_ranks": [1, 2, 4, 8]})
    config.to_json(tmp_path / "config.json")
    assert MixtureConfig.from_json(tmp_path / "config.json") == config


def test_quick_benchmark_runs(tmp_path: Path, monkeypatch) -> None:
    """The benchmark's --quick form, on two rows (needs the MiniLM package and the BIG-bench cache)."""
    from loramix.assets import AssetError, bigbench_tasks_dir, minilm_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        bigbench_tasks_dir()
        minilm_path()
    except AssetError as error:
        pytest.skip(str(error))
    path = Path(__file__).parents[1] / "benchmarks" / "more_bench.py"
    spec = importlib.util.spec_from_file_location("more_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "more_bench", bench)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--variants", "lora_r8", "more_r8", "--out", str(tmp_path / "runs")])
    records = [json.loads(path.read_text()) for path in sorted((tmp_path / "runs").glob("*.json"))]
    assert [record["variant"] for record in records] == ["lora_r8", "more_r8"]
    assert set(records[1]["chosen_ranks"]) == {"multiemo_en", "hyperbaton"}
    assert "more_r8" in (tmp_path / "runs_table.md").read_text()


def test_mixtures_saved_before_the_default_change_load_with_linear_scaling(tmp_path):
    """loramix 0.2.0 turned MoRE's linear scaling off by default; a 0.1.0 save that relied on the old default
    (no ``linear_scaling`` key) still loads with it on, so its outputs are the ones it was trained with."""
    config = MixtureConfig(
        method="more", target_modules=TARGETS["llama"], r=4, num_tasks=2, method_options={"linear_scaling": True}
    )
    trained = get_mixture_model(build("llama"), config)
    randomize_adapters(trained)
    trained.eval()
    inputs = batch("llama")
    with torch.no_grad():
        expected = trained(**inputs, task_ids=[0, 1, 0]).logits
    trained.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "loramix_config.json"
    saved = json.loads(path.read_text())
    del saved["method_options"]["linear_scaling"]
    for version, scaled in (("0.1.0", True), ("0.2.0", False)):
        path.write_text(json.dumps({**saved, "loramix_version": version}))
        loaded = MixtureModel.from_pretrained(build("llama"), tmp_path / "old")
        assert loaded.mixture_config.method_options.get("linear_scaling", False) is scaled
        with torch.no_grad():
            got = loaded(**inputs, task_ids=[0, 1, 0]).logits
        assert torch.equal(got, expected) is scaled, version
