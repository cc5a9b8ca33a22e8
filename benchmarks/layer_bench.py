"""Speed of the fused mixture layer against PEFT LoRA of the same total rank and a per-expert loop.

Measures forward+backward of one adapted linear layer (d x d, batch x seq tokens) for 1, 4, 8 and 16
experts at a fixed total rank (MOELoRA routing: a task gate per sequence), and one whole training step of a
small Llama with the mixture on all linear layers. Every ratio compares timings taken in the same run,
interleaved round by round; each side's time is its fastest round, the figure least disturbed by load
from other processes on a shared machine.

    python benchmarks/layer_bench.py                 # d=1024, 2048 tokens, total rank 32
    python benchmarks/layer_bench.py --quick         # small sizes, for a smoke test

Writes benchmarks/results/layer_bench.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from loramix import MixtureConfig, get_mixture_model
from loramix.context import ContextHolder, RoutingContext
from loramix.layer import MixtureLinear
from loramix.methods import get_method

RESULTS = Path(__file__).parent / "results"


class ExpertLoop(nn.Module):
    """The straightforward reference: a Python loop over E LoRA experts, each weighted by its task gate."""

    def __init__(self, base: nn.Linear, experts: int, rank: int, tasks: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.down = nn.ModuleList(nn.Linear(base.in_features, rank, bias=False) for _ in range(experts))
        self.up = nn.ModuleList(nn.Linear(rank, base.out_features, bias=False) for _ in range(experts))
        self.task_embedding = nn.Embedding(tasks, 64)
        self.gate = nn.Linear(64, experts, bias=False)
        for up in self.up:
            nn.init.normal_(up.weight, std=0.01)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.gate(self.task_embedding(task_ids)), dim=-1)
        out = self.base(x)
        for expert, (down, up) in enumerate(zip(self.down, self.up, strict=True)):
            out = out + up(down(x)) * (weights[:, expert, None, None] * self.scale)
        return out


def time_rounds(candidates: dict[str, Callable[[], None]], rounds: int, repeats: int) -> dict[str, float]:
    """Seconds per call of each candidate: the fastest of interleaved rounds, after one warm-up."""
    for run in candidates.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            _synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            _synchronize()
            samples[name].append((time.perf_counter() - start) / repeats)
    return {name: min(values) for name, values in samples.items()}


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.get_default_device().type == "cuda":
        torch.cuda.synchronize()


def forward_backward(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module(x).sum().backward()

    return run


def layer_case(dim: int, batch: int, seq: int, total_rank: int, experts: int, rounds: int) -> dict[str, float]:
    """Time the three layers for one expert count; returns seconds and ratios."""
    torch.manual_seed(0)
    tasks = 4
    rank = total_rank // experts
    x = torch.randn(batch, seq, dim, requires_grad=True)
    task_ids = torch.arange(batch) % tasks
    base = nn.Linear(dim, dim)
    base.requires_grad_(False)
    method = "lora" if experts == 1 else "moelora"
    config = MixtureConfig(method=method, r=rank, num_experts=experts, num_tasks=tasks, lora_alpha=2 * rank)
    holder = ContextHolder()
    mixture = MixtureLinear(base, config, get_method(method), holder, "bench")
    nn.init.normal_(mixture.lora_B, std=0.01)
    context = RoutingContext(task_ids=task_ids)

    def mixture_call(inputs: torch.Tensor) -> torch.Tensor:
        with holder.activate(context):
            return mixture(inputs)

    peft_layer = get_peft_model(
        _Wrap(nn.Linear(dim, dim)), LoraConfig(r=total_rank, lora_alpha=2 * total_rank, target_modules=["linear"])
    )
    loop = ExpertLoop(base, experts, rank, tasks, scale=2.0)
    candidates = {
        "mixture": forward_backward(mixture_call, x),
        "peft_lora": forward_backward(peft_layer, x),
        "expert_loop": forward_backward(lambda inputs: loop(inputs, task_ids), x),
        "frozen_base": forward_backward(base, x),
    }
    seconds = time_rounds(candidates, rounds=rounds, repeats=3)
    return {
        "experts": experts,
        "rank_per_expert": rank,
        **{f"{name}_ms": 1000 * value for name, value in seconds.items()},
        "mixture_over_peft": seconds["mixture"] / seconds["peft_lora"],
        "loop_over_mixture": seconds["expert_loop"] / seconds["mixture"],
        # the adapter paths alone: each time less the frozen base layer's forward+backward
        "adapter_loop_over_mixture": (seconds["expert_loop"] - seconds["frozen_base"])
        / (seconds["mixture"] - seconds["frozen_base"]),
    }


class _Wrap(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def llama_step_case(hidden: int, layers: int, batch: int, seq: int, total_rank: int, experts: int, rounds: int) -> dict:
    """One AdamW training step of a small Llama: loramix MOELoRA (E experts) vs PEFT LoRA of the same total rank."""
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=seq,
    )
    torch.manual_seed(0)
    input_ids = torch.randint(0, 2048, (batch, seq))
    task_ids = torch.arange(batch) % 4

    def build() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    mixture = get_mixture_model(
        build(),
        MixtureConfig(
            method="moelora", r=total_rank // experts, num_experts=experts, num_tasks=4, target_modules="all-linear"
        ),
    )
    peft_model = get_peft_model(
        build(), LoraConfig(r=total_rank, lora_alpha=2 * total_rank, target_modules="all-linear")
    )

    def step_of(model: nn.Module, **extra) -> Callable[[], None]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run() -> None:
            model(input_ids=input_ids, labels=input_ids, **extra).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    seconds = time_rounds({"mixture": step_of(mixture, task_ids=task_ids), "peft_lora": step_of(peft_model)}, rounds, 1)
    return {
        "experts": experts,
        "mixture_step_ms": 1000 * seconds["mixture"],
        "peft_lora_step_ms": 1000 * seconds["peft_lora"],
        "mixture_over_peft": seconds["mixture"] / seconds["peft_lora"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (larger sizes on cuda)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 3 quick, 7 cpu, 10 cuda)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_device(args.device)
    if args.device == "cuda":
        layer_sizes = {"dim": 4096, "batch": 8, "seq": 1024, "total_rank": 64}
        llama_sizes = {"hidden": 1024, "layers": 8, "batch": 8, "seq": 512}
        rounds, expert_counts = 10, (1, 4, 8, 16)
    elif args.quick:
        layer_sizes = {"dim": 128, "batch": 2, "seq": 32, "total_rank": 16}
        llama_sizes = {"hidden": 64, "layers": 2, "batch": 2, "seq": 32}
        rounds, expert_counts = 3, (1, 4, 8, 16)
    else:
        layer_sizes = {"dim": 1024, "batch": 4, "seq": 512, "total_rank": 32}
        llama_sizes = {"hidden": 512, "layers": 4, "batch": 4, "seq": 256}
        rounds, expert_counts = 7, (1, 4, 8, 16)
    rounds = args.rounds or rounds
    layer_rows = [layer_case(**layer_sizes, experts=e, rounds=rounds) for e in expert_counts]
    llama_row = llama_step_case(**llama_sizes, total_rank=layer_sizes["total_rank"], experts=4, rounds=rounds)
    report = {
        "command": "python benchmarks/layer_bench.py"
        + (" --quick" if args.quick else "")
        + (f" --device {args.device}" if args.device != "cpu" else ""),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "layer_sizes": layer_sizes,
        "llama_sizes": llama_sizes,
        "layer": layer_rows,
        "llama_step": llama_row,
    }
    lines = [
        f"# Layer benchmark\n\n`{report['command']}` ({report['device']}, {args.threads} CPU threads, torch "
        f"{torch.__version__})\n",
        f"Layer: d={layer_sizes['dim']}, {layer_sizes['batch'] * layer_sizes['seq']} tokens, total rank "
        f"{layer_sizes['total_rank']}; forward+backward, fastest of {rounds} interleaved rounds.\n",
        "| experts | rank/expert | loramix ms | PEFT LoRA ms | loop ms | frozen base ms | loramix / PEFT "
        "| loop / loramix | adapter path: loop / loramix |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in layer_rows:
        lines.append(
            f"| {row['experts']} | {row['rank_per_expert']} | {row['mixture_ms']:.1f} | {row['peft_lora_ms']:.1f} | "
            f"{row['expert_loop_ms']:.1f} | {row['frozen_base_ms']:.1f} | {row['mixture_over_peft']:.3f} | "
            f"{row['loop_over_mixture']:.2f} | {row['adapter_loop_over_mixture']:.2f} |"
        )
    lines += [
        "",
        f"Llama training step (hidden {llama_sizes['hidden']}, {llama_sizes['layers']} layers, batch "
        f"{llama_sizes['batch']} x {llama_sizes['seq']}, all linear layers): loramix MOELoRA 4 experts "
        f"{llama_row['mixture_step_ms']:.0f} ms, PEFT LoRA same total rank {llama_row['peft_lora_step_ms']:.0f} ms, "
        f"ratio {llama_row['mixture_over_peft']:.3f}.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "layer_bench" + ("_quick" if args.quick else "") + ("_cuda" if args.device == "cuda" else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
