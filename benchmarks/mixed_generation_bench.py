"""Mixed-task generation without a server: loramix unmerged against PEFT's ``adapter_names`` mixed batch.

16 prompts of 4 tasks in one left-padded batch, 32 new tokens each (greedy, exactly 32), on SmolLM2-135M
(``loramix.assets.smollm2_path()``) with random adapters of rank 16 on every linear layer. Each candidate's
time is a ratio to the plain base model's ``generate`` measured in the same run, interleaved round by round
(each side's time is its fastest round, the figure least disturbed by other processes):

- ``peft_adapter_names``: 4 PEFT LoRA adapters loaded in one ``PeftModel``, the batch routed with
  ``adapter_names=[...]`` (PEFT's mixed-batch inference). The adapters are loramix's ``per_task_lora``
  tasks exported with ``MixtureModel.export``, so both sides run the same weights and must give the same
  tokens (checked).
- ``loramix_<method>``: the unmerged mixture with ``task_ids`` (task-routed methods).
- ``merged_one_task``: one task merged into the weights (``MixtureModel.merge``): the base model's cost.

    python benchmarks/mixed_generation_bench.py              # SmolLM2, threads=1, 3 rounds
    python benchmarks/mixed_generation_bench.py --quick      # a tiny random Llama, for a smoke test

Writes benchmarks/results/mixed_generation.json and .md (``--quick``: ``mixed_generation_quick.*``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loramix import MixtureConfig, get_mixture_model

RESULTS = Path(__file__).parent / "results"
TASKS = ["translate", "summarise", "classify", "answer"]
PROMPTS = [
    "Translate to French: the cat sleeps on the warm windowsill.",
    "Translate to French: where is the train station?",
    "Translate to French: I would like a cup of coffee, please.",
    "Translate to French: the weather is lovely today.",
    "Summarise: The committee met on Tuesday and agreed to extend the library's opening hours.",
    "Summarise: Rain is expected all week, so the outdoor concert moves to the town hall.",
    "Summarise: The new bridge opened after two years of work and cuts the commute by ten minutes.",
    "Summarise: Sales rose in spring, fell in summer and recovered in the autumn.",
    "Is this review positive or negative? The food was cold and the waiter rude.",
    "Is this review positive or negative? A wonderful film with a moving score.",
    "Is this review positive or negative? It broke after two days.",
    "Is this review positive or negative? Great value, would buy again.",
    "Question: what is the capital of Italy? Answer:",
    "Question: how many legs does a spider have? Answer:",
    "Question: what gas do plants absorb from the air? Answer:",
    "Question: who wrote Romeo and Juliet? Answer:",
]
METHODS = {
    "per_task_lora": {"r": 16, "num_experts": 4},
    "moelora": {"r": 16, "num_experts": 4},
    "more": {"r": 16},
}


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def randomize(mixture: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Non-zero adapters (B starts at zero) small enough to keep the model's text coherent."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in mixture.named_parameters():
            if "lora_" in name or "router" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def time_rounds(candidates: dict[str, Callable[[], torch.Tensor]], rounds: int) -> dict[str, float]:
    """Seconds per call of each candidate: the fastest of interleaved rounds, after one warm-up."""
    for run in candidates.values():
        run()
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, for a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import PeftModel

    from loramix import assets

    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token

    def load_base() -> torch.nn.Module:
        return tiny_model() if args.quick else AutoModelForCausalLM.from_pretrained(path).eval()

    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    task_ids = torch.arange(len(PROMPTS)) // (len(PROMPTS) // len(TASKS))
    options = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    base = load_base()
    candidates: dict[str, Callable[[], torch.Tensor]] = {"base": lambda: base.generate(**inputs, **options)}
    mixtures = {}
    for method, settings in METHODS.items():
        config = MixtureConfig(
            method=method, target_modules="all-linear", num_tasks=len(TASKS), task_names=TASKS, **settings
        )
        mixture = get_mixture_model(load_base(), config).eval()
        randomize(mixture, seed=len(mixtures))
        mixtures[method] = mixture
        candidates[f"loramix_{method}"] = lambda m=mixture: m.generate(**inputs, task_ids=task_ids, **options)

    with tempfile.TemporaryDirectory() as scratch:
        for task in TASKS:
            mixtures["per_task_lora"].export(Path(scratch) / task, task=task)
        peft_model = PeftModel.from_pretrained(load_base(), Path(scratch) / TASKS[0], adapter_name=TASKS[0])
        for task in TASKS[1:]:
            peft_model.load_adapter(Path(scratch) / task, adapter_name=task)
    peft_model.eval()
    names = [TASKS[int(task)] for task in task_ids]
    candidates["peft_adapter_names"] = lambda: peft_model.generate(**inputs, adapter_names=names, **options)
    merged = mixtures["moelora"].merge(1)
    candidates["merged_one_task"] = lambda: merged.generate(**inputs, **options)

    with torch.no_grad():
        same = torch.equal(candidates["peft_adapter_names"](), candidates["loramix_per_task_lora"]())
        seconds = time_rounds(candidates, args.rounds)
    ratios = {name: seconds[name] / seconds["base"] for name in seconds}
    report = {
        "model": "tiny-llama" if args.quick else "SmolLM2-135M-Instruct",
        "prompts": len(PROMPTS),
        "tasks": len(TASKS),
        "new_tokens": args.new_tokens,
        "rank": 16,
        "threads": args.threads,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "peft_tokens_equal_loramix_per_task_lora": same,
        "seconds": seconds,
        "ratio_to_base": ratios,
        "methods": {name: dict(settings) for name, settings in METHODS.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "mixed_generation_quick" if args.quick else "mixed_generation"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Mixed-task generation: {report['model']}, {len(PROMPTS)} prompts of {len(TASKS)} tasks x "
        f"{args.new_tokens} new tokens, greedy, r=16 on all linear layers, {args.threads} thread(s)",
        "",
        "| candidate | seconds | x base |",
        "|---|---:|---:|",
        *(f"| {name} | {seconds[name]:.3f} | {ratios[name]:.2f} |" for name in seconds),
        "",
        f"PEFT `adapter_names` tokens equal loramix per_task_lora tokens: {same}.",
        "`merged_one_task` does exactly the base model's work, so the distance of its ratio from 1.00 is the",
        "measurement noise of this run (other processes share the machine).",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
