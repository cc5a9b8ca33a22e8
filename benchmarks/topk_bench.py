"""Top-k token routing without the waste? loramix's fused MixLoRA layer against a grouped-experts path.

loramix computes a top-k token mixture (MixLoRA, MALoRA, SMoRA) as one LoRA of rank E·r whose unselected
components are gated to zero: two dense GEMMs, the router folded into the first. With top-2 of 8 experts,
three quarters of that work multiplies by zero. The alternative computes only the selected experts: sort the
(token, expert) assignments by expert, gather each expert's tokens, run its rank-r down- and up-projection,
and add the weighted results back into place (:class:`GroupedExperts`, forward and backward written out, so
the gathered inputs are recomputed in the backward instead of being kept).

This script times forward + backward of one adapted projection, the shipping layer (``MixtureLinear`` with
``method="mixlora"``) against the grouped path on the same parameters, for several projection shapes, ranks
and token counts, variants interleaved round by round, fastest round of each. Before timing, each case checks
that the grouped path gives the layer's output and the gradients of the input, both banks and the router.

    python benchmarks/topk_bench.py                    # SmolLM2 and Llama-1B projection shapes, 1 and 2 threads
    python benchmarks/topk_bench.py --device cuda      # the same on a GPU (bf16 and fp32)
    python benchmarks/topk_bench.py --quick            # a smoke test

Writes ``benchmarks/results/topk_bench[_<device>].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loramix import MixtureConfig
from loramix.context import ContextHolder, RoutingContext
from loramix.layer import MixtureLinear
from loramix.methods import get_method

RESULTS = Path(__file__).parent / "results"
# (name, d_in, d_out): SmolLM2-135M's MLP and attention projections, a ~1B Llama's
SHAPES = [
    ("smollm2 up", 576, 1536),
    ("smollm2 down", 1536, 576),
    ("smollm2 q", 576, 576),
    ("llama1b up", 2048, 8192),
    ("llama1b down", 8192, 2048),
    ("llama1b q", 2048, 2048),
]


class GroupedExperts(torch.autograd.Function):
    """``out[n] = Σ_j w[n, j] · B_e (A_e x[n])`` over the k experts e = index[n, j] of each token n.

    Inputs: x [N, d_in], A [E·r, d_in], B [d_out, E·r], weights [N, k], index LongTensor[N, k], rank r.
    Saves x, the banks, the sorted weights and the rank-r activations (N·k x r); the gathered inputs and
    output gradients are rebuilt in the backward.
    """

    @staticmethod
    def forward(ctx, x, bank_a, bank_b, weights, index, rank):  # noqa: ANN001, ANN205 (autograd signature)
        tokens, top_k = index.shape
        num_experts = bank_a.shape[0] // rank
        order = index.reshape(-1).argsort(stable=True)
        counts = torch.bincount(index.reshape(-1), minlength=num_experts).tolist()
        rows = order // top_k  # the token of each sorted assignment
        gathered = x.index_select(0, rows)
        sorted_weights = weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        low = x.new_empty(tokens * top_k, rank)
        up = x.new_empty(tokens * top_k, bank_b.shape[0])
        start = 0
        for expert, count in enumerate(counts):
            part, comps = slice(start, start + count), slice(expert * rank, (expert + 1) * rank)
            torch.mm(gathered[part], bank_a[comps].T, out=low[part])
            torch.mm(low[part] * sorted_weights[part], bank_b[:, comps].T, out=up[part])
            start += count
        out = x.new_zeros(tokens, bank_b.shape[0]).index_add_(0, rows, up)
        ctx.save_for_backward(x, bank_a, bank_b, sorted_weights, rows, order, low)
        ctx.counts, ctx.rank, ctx.top_k = counts, rank, top_k
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, bank_a, bank_b, sorted_weights, rows, order, low = ctx.saved_tensors
        rank = ctx.rank
        grad_rows = grad_out.index_select(0, rows)
        gathered = x.index_select(0, rows)
        weighted = low * sorted_weights
        grad_weighted = torch.empty_like(low)
        grad_gathered = torch.empty_like(gathered)
        grad_a, grad_b = torch.empty_like(bank_a), torch.empty_like(bank_b)
        start = 0
        for expert, count in enumerate(ctx.counts):
            part, comps = slice(start, start + count), slice(expert * rank, (expert + 1) * rank)
            torch.mm(grad_rows[part], bank_b[:, comps], out=grad_weighted[part])
            torch.mm(grad_rows[part].T, weighted[part], out=grad_b[:, comps])
            grad_low = grad_weighted[part] * sorted_weights[part]
            torch.mm(grad_low.T, gathered[part], out=grad_a[comps])
            torch.mm(grad_low, bank_a[comps], out=grad_gathered[part])
            start += count
        grad_sorted = (grad_weighted * low).sum(-1)
        grad_weights = torch.empty_like(grad_sorted).scatter_(0, order, grad_sorted).view(-1, ctx.top_k)
        grad_x = torch.zeros_like(x).index_add_(0, rows, grad_gathered)
        return grad_x, grad_a, grad_b, grad_weights, None, None


def grouped_forward(layer: MixtureLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's output computed with :class:`GroupedExperts` (same parameters, same math)."""
    router = layer.router
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(F.linear(flat, router.proj.weight).float(), dim=-1)
    values, index = probs.topk(router.top_k, dim=-1)
    weights = (values / values.sum(-1, keepdim=True)).to(x.dtype)
    delta = GroupedExperts.apply(flat, layer.lora_A, layer.lora_B, weights, index, router.rank)
    return layer.base_layer(x) + (delta * layer.scale).view(*x.shape[:-1], -1)


def build_layer(d_in: int, d_out: int, experts: int, rank: int, top_k: int, device: str, dtype: torch.dtype):
    """A MixLoRA-adapted projection with non-zero B (so every gradient is exercised) and its call."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    config = MixtureConfig(
        method="mixlora", r=rank, num_experts=experts, lora_alpha=2 * rank, method_options={"top_k": top_k}
    )
    holder = ContextHolder()
    layer = MixtureLinear(base, config, get_method("mixlora"), holder, "bench").to(device=device, dtype=dtype)
    layer.train()
    nn.init.normal_(layer.lora_B, std=0.02)
    context = RoutingContext()

    def fused(x: torch.Tensor) -> torch.Tensor:
        with holder.activate(context):
            return layer(x)

    return layer, fused


def check_equal(layer: MixtureLinear, fused: Callable, x: torch.Tensor) -> float:
    """Largest relative difference between the two paths over the output and every gradient."""
    params = [x, layer.lora_A, layer.lora_B, layer.router.proj.weight]
    results = []
    for run in (fused, lambda inputs: grouped_forward(layer, inputs)):
        out = run(x)
        grads = torch.autograd.grad(out.float().square().sum(), params)
        results.append([out, *grads])
    worst = 0.0
    for a, b in zip(*results, strict=True):
        worst = max(worst, ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp(min=1e-12)).item())
    return worst


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_case(candidates: dict[str, Callable[[], None]], rounds: int, repeats: int, device: str) -> dict[str, float]:
    """Seconds per call of each candidate: fastest of interleaved rounds, after one warm-up call each."""
    for run in candidates.values():
        run()
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / repeats)
    return best


def run_case(shape: tuple[str, int, int], experts: int, rank: int, top_k: int, tokens: int, args) -> dict:
    name, d_in, d_out = shape
    dtype = getattr(torch, args.dtype)
    layer, fused = build_layer(d_in, d_out, experts, rank, top_k, args.device, dtype)
    x = torch.randn(tokens, d_in, device=args.device, dtype=dtype, requires_grad=True)
    error = check_equal(layer, fused, x)

    def step(call: Callable) -> Callable[[], None]:
        def run() -> None:
            call(x).sum().backward()

        return run

    seconds = time_case(
        {"fused": step(fused), "grouped": step(lambda inputs: grouped_forward(layer, inputs))},
        args.rounds,
        args.repeats,
        args.device,
    )
    return {
        "shape": name,
        "d_in": d_in,
        "d_out": d_out,
        "experts": experts,
        "rank": rank,
        "top_k": top_k,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "fused_ms": 1000 * seconds["fused"],
        "grouped_ms": 1000 * seconds["grouped"],
        "grouped_over_fused": seconds["grouped"] / seconds["fused"],
        "max_relative_difference": error,
    }


def markdown(report: dict) -> str:
    lines = [
        "# Top-k token routing: the fused layer against a grouped-experts path",
        "",
        f"`{report['command']}`",
        "",
        f"Device {report['device']} ({report['device_name']}), {report['dtype']}, torch {report['torch']}. One adapted "
        f"projection, forward + backward, MixLoRA top-{report['top_k']} of {report['experts']} experts; fastest of "
        f"{report['rounds']} interleaved rounds of {report['repeats']} calls. Ratio < 1: the grouped path is faster. "
        "Difference: the largest relative difference between the two paths over the output and the gradients "
        "of the input, both banks and the router.",
        "",
        "| shape | d_in -> d_out | r | tokens | threads | fused ms | grouped ms | grouped / fused | difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["cases"]:
        lines.append(
            f"| {row['shape']} | {row['d_in']} -> {row['d_out']} | {row['rank']} | {row['tokens']} | {row['threads']} "
            f"| {row['fused_ms']:.2f} | {row['grouped_ms']:.2f} | {row['grouped_over_fused']:.2f} "
            f"| {row['max_relative_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads (ignored on cuda)")
    parser.add_argument("--shapes", nargs="+", help="shape names (default: all)", default=[s[0] for s in SHAPES])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one small case each, for a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    shapes = [shape for shape in SHAPES if shape[0] in args.shapes]
    if args.quick:
        shapes, args.ranks, args.tokens, args.threads, args.rounds, args.repeats = shapes[:1], [4], [64], [1], 1, 1
    threads = args.threads if args.device == "cpu" else [torch.get_num_threads()]
    cases = []
    for count in threads:
        torch.set_num_threads(count)
        for shape in shapes:
            for tokens in args.tokens:
                for rank in args.ranks:
                    case = run_case(shape, args.experts, rank, args.top_k, tokens, args)
                    print(json.dumps(case), flush=True)
                    cases.append(case)
    suffix = "" if args.device == "cpu" and not args.quick else f"_{args.device}" + ("_quick" if args.quick else "")
    report = {
        "command": "python benchmarks/topk_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "experts": args.experts,
        "top_k": args.top_k,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"topk_bench{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"topk_bench{suffix}.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
