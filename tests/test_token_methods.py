"""HydraLoRA, MixLoRA, MoDE, SMoRA and MTL-LoRA against slow references written here, and on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loramix import MixtureConfig, MixtureModel, get_mixture_model
from loramix.config import ConfigError
from loramix.context import ContextHolder, RoutingContext
from loramix.layer import MixtureLinear
from loramix.methods import get_method
from tiny_models import INPUT_ROUTED, METHOD_SETTINGS, TARGETS, batch, build, randomize_adapters

D_IN, D_OUT, TASKS = 12, 10, 3


def make_layer(**settings) -> tuple[MixtureLinear, ContextHolder]:
    config = MixtureConfig(num_tasks=TASKS, **settings)
    holder = ContextHolder()
    torch.manual_seed(5)
    layer = MixtureLinear(torch.nn.Linear(D_IN, D_OUT), config, get_method(config.method), holder, "layer")
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if not name.startswith("base_layer"):
                param.normal_(0, 0.4)
    return layer, holder


def run(layer: MixtureLinear, holder: ContextHolder, x: torch.Tensor, **context) -> torch.Tensor:
    with holder.activate(RoutingContext(**context)):
        return layer(x)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 5, D_IN)


def test_hydralora_matches_reference(x) -> None:
    rank, heads = 3, 4
    layer, holder = make_layer(method="hydralora", r=rank, num_experts=heads)
    weights = torch.softmax(x @ layer.router.proj.weight.T, dim=-1)
    shared = x @ layer.lora_A.T
    delta = sum(weights[..., i : i + 1] * (shared @ layer.lora_B[:, i * rank : (i + 1) * rank].T) for i in range(heads))
    torch.testing.assert_close(run(layer, holder, x), layer.base_layer(x) + (16 / rank) * delta)
    assert layer.lora_A.shape == (rank, D_IN) and layer.lora_B.shape == (D_OUT, rank * heads)


def test_mixlora_matches_reference_and_balances(x) -> None:
    rank, experts = 2, 4
    layer, holder = make_layer(method="mixlora", r=rank, num_experts=experts)
    probs = torch.softmax(x @ layer.router.proj.weight.T, dim=-1)
    expected = layer.base_layer(x).clone()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            top = probs[b, t].topk(2)
            for value, expert in zip(top.values / top.values.sum(), top.indices.tolist(), strict=True):
                a = layer.lora_A[expert * rank : (expert + 1) * rank]
                bank = layer.lora_B[:, expert * rank : (expert + 1) * rank]
                expected[b, t] += (16 / rank) * value * (bank @ (a @ x[b, t]))
    layer.train()
    context = RoutingContext(attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    with holder.activate(context):
        output = layer(x)
    torch.testing.assert_close(output, expected)
    keep = context.attention_mask.bool()
    chosen = torch.zeros_like(probs).scatter(-1, probs.topk(2).indices, 1.0)[keep]
    fraction = chosen.sum(0) / chosen.sum()
    reference = experts * (fraction * probs[keep].mean(0)).sum()
    torch.testing.assert_close(context.aux_losses["balance"][0], reference)


def test_mode_matches_reference(x) -> None:
    rank, experts = 3, 2
    layer, holder = make_layer(method="mode", r=rank, num_experts=experts)
    logits = (x @ layer.router.proj.weight.T).unflatten(-1, (rank, experts))
    weights = torch.softmax(logits, dim=-1)
    expected = layer.base_layer(x).clone()
    for j in range(rank):
        projection = x @ layer.lora_A[j]  # a_j · x
        for i in range(experts):
            column = layer.lora_B[:, i * rank + j]
            expected += (16 / rank) * (weights[..., j, i] * projection)[..., None] * column
    torch.testing.assert_close(run(layer, holder, x), expected)


def test_smora_matches_reference_and_updates_bias(x) -> None:
    rank, k = 6, 2
    layer, holder = make_layer(method="smora", r=rank, top_k=k, lora_alpha=4)
    with torch.no_grad():
        layer.router.balance_bias.copy_(torch.linspace(-0.2, 0.2, rank))
    scores = torch.sigmoid(x @ layer.router.proj.weight.T) + layer.router.balance_bias
    expected = layer.base_layer(x).clone()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            top = scores[b, t].topk(k)
            for value, i in zip(top.values, top.indices.tolist(), strict=True):
                gate = k * value / top.values.sum()
                expected[b, t] += (4 / k) * gate * layer.lora_B[:, i] * (layer.lora_A[i] @ x[b, t])
    layer.train()
    torch.testing.assert_close(run(layer, holder, x), expected)
    counts = layer.router.counts.clone()
    assert counts.sum() == x.shape[0] * x.shape[1] * k
    bias = layer.router.balance_bias.clone()
    layer.router.step_end()
    torch.testing.assert_close(layer.router.balance_bias, bias + 1e-5 * torch.sign(counts.mean() - counts))
    assert layer.router.counts.sum() == 0


def test_mtl_lora_matches_reference(x) -> None:
    rank, ups = 3, 3
    layer, holder = make_layer(method="mtl_lora", r=rank, num_experts=ups)
    router = layer.router
    tasks = torch.tensor([2, 0])
    rows = []
    for b, task in enumerate(tasks.tolist()):
        weights = torch.softmax(router.task_logits[task] / 0.1, dim=0)
        mixed_b = sum(weights[j] * layer.lora_B[:, j * rank : (j + 1) * rank] for j in range(ups))
        delta = x[b] @ layer.lora_A.T @ router.task_transform[task].T @ mixed_b.T
        rows.append(layer.base_layer(x[b]) + (16 / rank) * delta)
    torch.testing.assert_close(run(layer, holder, x, task_ids=tasks), torch.stack(rows))
    for task in range(TASKS):
        expected = run(layer, holder, x, task_ids=torch.full((2,), task))
        torch.testing.assert_close(layer.base_layer(x) + x @ layer.delta_weight(task).T, expected)


def test_malora_matches_reference(x) -> None:
    experts, rank, subspace = 4, 2, 4
    layer, holder = make_layer(method="malora", r=rank, num_experts=experts, method_options={"subspace_rank": subspace})
    wide = rank + (rank * experts - subspace) // experts
    assert layer.lora_A.shape == (subspace, D_IN) and layer.lora_B.shape == (D_OUT, experts * wide)
    probs = torch.softmax(x @ layer.router.proj.weight.T, dim=-1)
    shared = x @ layer.lora_A.T
    expected = layer.base_layer(x).clone()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            top = probs[b, t].topk(2)
            for value, e in zip(top.values / top.values.sum(), top.indices.tolist(), strict=True):
                projection = layer.router.expert_proj[e * wide : (e + 1) * wide]
                up = layer.lora_B[:, e * wide : (e + 1) * wide]
                expected[b, t] += (16 / wide) * value * (up @ (projection @ shared[b, t]))
    torch.testing.assert_close(run(layer, holder, x), expected)


def test_malora_sizes_and_svd_init() -> None:
    config = MixtureConfig(method="malora", r=8, num_experts=8, method_options={"subspace_rank": 32})
    layer = MixtureLinear(torch.nn.Linear(64, 16), config, get_method("malora"), ContextHolder(), "layer")
    assert layer.lora_A.shape == (32, 64) and layer.lora_B.shape == (16, 8 * 12)  # r̄ = 12, as in the paper
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.scale == 16 / 12
    rows = layer.router.expert_proj @ layer.lora_A  # each expert's P_t S_A: a rank-32 approximation
    assert torch.linalg.matrix_rank(rows) == 32
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("conditional", [True, False])
def test_conditional_mixlora_matches_reference(x, conditional: bool) -> None:
    pool, rank = 6, 2
    layer, holder = make_layer(
        method="conditional_mixlora", r=rank, num_experts=pool, method_options={"conditional": conditional}
    )
    router = layer.router
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    expected = layer.base_layer(x).clone()
    for b in range(x.shape[0]):
        z = x[b, : int(mask[b].sum())].mean(0)
        index_a = (router.select_a.weight @ z).topk(rank).indices
        scores_b = router.select_b.weight @ z
        if conditional:
            for k in range(rank):
                scores_b = scores_b + torch.softmax(layer.lora_A[index_a[k]] @ router.condition[k], dim=0)
        index_b = scores_b.topk(rank).indices
        for k in range(rank):
            factor = layer.lora_B[:, index_b[k]][:, None] @ layer.lora_A[index_a[k]][None, :]
            expected[b] += (16 / rank) * x[b] @ factor.T
    layer.train()
    output = run(layer, holder, x, attention_mask=mask)
    torch.testing.assert_close(output, expected)
    output.pow(2).sum().backward()
    selectors = [router.select_a.weight, router.select_b.weight] + ([router.condition] if conditional else [])
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in selectors)


def _mixture(method: str, settings: dict) -> tuple[torch.nn.Module, MixtureModel]:
    base = build("llama")
    reference = copy.deepcopy(base)
    config = MixtureConfig(method=method, num_tasks=TASKS, target_modules=TARGETS["llama"], **settings)
    return reference, get_mixture_model(base, config)


@pytest.mark.parametrize("method", [*INPUT_ROUTED, "mtl_lora"])
def test_trains_and_round_trips(method: str, tmp_path) -> None:
    reference, mixture = _mixture(method, METHOD_SETTINGS[method])
    inputs = batch("llama")
    tasks = torch.tensor([0, 1, 2])
    optimizer = torch.optim.AdamW([p for p in mixture.parameters() if p.requires_grad], lr=1e-2)
    mixture.train()
    losses = []
    for _ in range(8):
        loss = mixture(**inputs, labels=inputs["input_ids"], task_ids=tasks).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mixture.step_end()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    mixture.eval()
    expected = mixture(**inputs, task_ids=tasks).logits
    mixture.save_pretrained(tmp_path)
    restored = MixtureModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(restored(**inputs, task_ids=tasks).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", INPUT_ROUTED)
def test_token_methods_refuse_merge_and_export(method: str, tmp_path) -> None:
    _, mixture = _mixture(method, METHOD_SETTINGS[method])
    with pytest.raises(TypeError, match="routes on the input"):
        mixture.merge(0)
    with pytest.raises(TypeError, match="routes on the input"):
        mixture.export(tmp_path, task=0)


@pytest.mark.parametrize("diagonal", [False, True])
def test_mtl_lora_merges_and_exports(diagonal: bool, tmp_path) -> None:
    reference, mixture = _mixture("mtl_lora", {"r": 2, "num_experts": 3, "method_options": {"diagonal": diagonal}})
    randomize_adapters(mixture)
    mixture.eval()
    inputs = batch("llama")
    tasks = torch.full((3,), 1)
    expected = mixture(**inputs, task_ids=tasks).logits
    torch.testing.assert_close(mixture.merge(1)(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    mixture.export(tmp_path, task=1)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    torch.testing.assert_close(peft_model(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


def test_smora_bias_is_saved(tmp_path) -> None:
    reference, mixture = _mixture("smora", METHOD_SETTINGS["smora"])
    layer = next(iter(mixture.mixture_layers().values()))
    with torch.no_grad():
        layer.router.balance_bias.fill_(0.25)
    mixture.save_pretrained(tmp_path)
    restored = MixtureModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    assert torch.equal(next(iter(restored.mixture_layers().values())).router.balance_bias, layer.router.balance_bias)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "smora", "r": 4, "method_options": {"top_k": 5}}, r"in \[1, r=4\]"),
        ({"method": "smora", "r": 4, "num_experts": 2}, "each of the r ranks an expert"),
        ({"method": "mtl_lora", "method_options": {"temperature": 0}}, "temperature"),
        ({"method": "mtl_lora", "method_options": {"tau": 1}}, "unknown keys"),
    ],
)
def test_bad_options(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MixtureConfig(**settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "mixlora", "r": 2, "num_experts": 4},
        {"method": "hydralora", "r": 3, "num_experts": 4},
        {"method": "malora", "r": 2, "num_experts": 4},
        {"method": "smora", "r": 6, "method_options": {"top_k": 3}},
    ],
    ids=lambda settings: settings["method"],
)
def test_router_folded_into_the_a_gemm_equals_a_separate_router(settings, x) -> None:
    """The layer stacks the router's weight under A (one GEMM); forward and every gradient equal the unfolded path."""
    layer, holder = make_layer(**settings)
    layer.double().train()  # float64: the two paths sum in different orders
    x = x.double()
    router = layer.router
    folded = router.project(x, x, layer.lora_A)
    assert folded.shape[-1] == layer.lora_A.shape[0] + router.scorer().weight.shape[0]
    assert router.project(x.clone(), x, layer.lora_A).shape[-1] == layer.lora_A.shape[0]  # dropout: not folded
    x_folded = x.clone().requires_grad_(True)
    with holder.activate(RoutingContext()):
        out = layer(x_folded)
    out.pow(2).sum().backward()
    folded_grads = {name: param.grad.clone() for name, param in layer.named_parameters() if param.grad is not None}
    layer.zero_grad()
    x_plain = x.clone().requires_grad_(True)
    with holder.activate(RoutingContext()):
        hidden = router.mix(x_plain @ layer.lora_A.T, x_plain, RoutingContext(), layer.lora_A)
        expected = layer.base_layer(x_plain) + layer.scale * hidden @ layer.lora_B.T
    expected.pow(2).sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x_folded.grad, x_plain.grad)
    assert {name for name in folded_grads if not name.startswith("base_layer")} == {
        "lora_A",
        "lora_B",
        "router.proj.weight",
    } | ({"router.expert_proj"} if settings["method"] == "malora" else set())
    for name, param in layer.named_parameters():
        if name in folded_grads:
            torch.testing.assert_close(folded_grads[name], param.grad, msg=name)


@pytest.mark.parametrize("method", ["mixlora", "smora"])
def test_folded_router_keeps_no_stacked_copy_and_follows_autocast(method, x) -> None:
    """The backward reads A and the router weight themselves: no [K_A + S, d_in] stack is kept per layer;
    under bf16 autocast the gradients come back in the parameters' dtype, close to the unfolded path's."""
    settings = {"method": method, "r": 4, "num_experts": 4} if method == "mixlora" else {"method": method, "r": 6}
    layer, holder = make_layer(**settings)
    layer.train()
    stacked_rows = layer.lora_A.shape[0] + layer.router.scorer().weight.shape[0]
    params = {param.untyped_storage().data_ptr() for param in layer.parameters()}
    kept = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            kept.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run(layer, holder, x.clone().requires_grad_(True))  # as between layers: the input's gradient is needed
    assert kept and all(sorted(shape) != sorted((stacked_rows, D_IN)) for shape in kept)

    grads = []
    for fold in (True, False):
        layer.zero_grad()
        inputs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), holder.activate(RoutingContext()):
            if fold:
                out = layer(inputs)
            else:
                hidden = layer.router.mix(inputs @ layer.lora_A.T, inputs, RoutingContext(), layer.lora_A)
                out = layer.base_layer(inputs) + layer.scale * hidden @ layer.lora_B.T
        out.float().pow(2).sum().backward()
        grads.append(
            {"x": inputs.grad, **{name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}}
        )
    for name, grad in grads[0].items():
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, grads[1][name], rtol=0.05, atol=0.05 * grads[1][name].abs().max().item())


def saved_bytes(function) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while ``function()`` runs."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function()
    return output, sum(storages.values())


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "mixlora", "r": 3, "num_experts": 4},
        {"method": "malora", "r": 3, "num_experts": 4},
        {"method": "smora", "r": 6},
        {"method": "hydralora", "r": 3, "num_experts": 4},
    ],
    ids=lambda settings: settings["method"],
)
def test_weighted_up_projection_keeps_no_weighted_copy(settings, x) -> None:
    """Token routers give their mix as factors: the layer weighs and projects up in one step whose backward
    redoes the weighting, so it keeps one [tokens, K_B] tensor less than mix-then-addmm, with the same
    output and the same gradients of the input and every parameter; ``factored_up_projection = False``
    is mix-then-addmm."""
    layer, holder = make_layer(**settings)
    layer.train()
    tokens = x.shape[0] * x.shape[1]

    def composed(inputs):  # what the layer did before: the weighted components, then one addmm
        context = RoutingContext()
        with holder.activate(context):
            hidden = layer.router.mix(layer.router.project(inputs, inputs, layer.lora_A), inputs, context, layer.lora_A)
            result = layer.base_layer(inputs)
            flat = torch.addmm(
                result.reshape(-1, D_OUT), hidden.reshape(-1, hidden.shape[-1]), layer.lora_B.t(), alpha=layer.scale
            )
        return flat.view(result.shape), context

    outputs, grads, kept = [], [], []
    for mode in ("factored", "composed", "native"):
        layer.zero_grad()
        layer.factored_up_projection = mode == "factored"
        inputs = x.clone().requires_grad_(True)
        if mode != "composed":
            context = RoutingContext()

            def call(inputs=inputs, context=context):
                with holder.activate(context):
                    return layer(inputs)

            out, nbytes = saved_bytes(call)
        else:
            (out, context), nbytes = saved_bytes(lambda inputs=inputs: composed(inputs))
        loss = out.pow(2).sum() + sum(sum(losses) for losses in context.aux_losses.values())
        loss.backward()
        outputs.append(out.detach())
        kept.append(nbytes)
        grads.append(
            {"x": inputs.grad, **{n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}}
        )
    assert {"x", "lora_A", "lora_B"} <= grads[0].keys()
    for other in (1, 2):
        torch.testing.assert_close(outputs[0], outputs[other])
        assert grads[0].keys() == grads[other].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[other][name], msg=name)
    assert kept[1] - kept[0] == tokens * layer.lora_B.shape[1] * 4  # the weighted copy, float32
    assert kept[2] == kept[1]  # factored_up_projection=False is mix-then-addmm
