"""Full training step and peak memory of every loramix method against PEFT LoRA, on a causal LM.

One step is forward + backward + AdamW (and ``step_end()`` for loramix, as a training loop calls it) on
a fixed batch with labels, all linear layers of the decoder adapted (the output head excluded). Every
method is measured twice where the two differ:

- **equal rank**: the method's factor banks hold as many rank-1 components as the PEFT LoRA's rank
  (``--rank``, default 32): ``r x num_experts = rank`` (MoRE: R = rank; SMoRA: r = rank; conditional
  MixLoRA: pools of ``rank`` factors, r = rank / 4 chosen per sequence);
- **matched**: the method's size (r, or the pool size) chosen so that its trainable parameters come
  closest to the PEFT LoRA's (counted on a one-layer copy of the model, times the number of layers).

Methods whose router has only a few hundred parameters per layer (``lora``, ``per_task_lora``,
``moelora``, ``moa``) have one variant that serves both. The reference is PEFT LoRA of rank ``--rank``
(``lora_alpha = 2 r``); the floor is the frozen model's forward and backward alone (input embeddings
requiring grad, no optimizer). Task ids are ``arange(batch) % 4``.

Each (round, variant) runs in a fresh process forked from this one before it did any tensor work: the
child builds the model, resets its peak resident set size (``/proc/self/clear_refs``), wraps it, runs one
warm-up step and ``--steps`` timed steps, and reports its step times and its peak RSS growth over the
unwrapped model (on CUDA: ``torch.cuda.max_memory_allocated`` over the allocation after the model is
built). Variants are run round-robin, ``--rounds`` times, so machine load hits all alike. A variant's
step time is its fastest step over all rounds (the figure least disturbed by other processes); its
memory is the smallest peak over rounds. The results files are rewritten after every child, so a killed
run keeps what finished.

A peak RSS moves by several percent with the allocator's history, more than the differences between most
variants, so each child also counts two exact figures: the bytes the autograd graph keeps for the backward
(the storages of the tensors saved during the warm-up step's forward, each once, parameters excluded; read
with ``torch.autograd.graph.saved_tensors_hooks``) and the bytes of the trainable state (parameters,
gradients and the optimizer's state). Their sum is the memory a variant adds to the frozen model at the
start of its backward, up to the temporaries of single operations.

    python benchmarks/e2e_bench.py                       # SmolLM2-135M-Instruct, batch 4 x 128, 2 threads
    python benchmarks/e2e_bench.py --threads 1 --rounds 2
    python benchmarks/e2e_bench.py --quick               # tiny Llama from a config (smoke test, < 2 min)
    python benchmarks/e2e_bench.py --model llama1b --device cuda   # ~1.1B Llama, random weights, bf16
    python benchmarks/e2e_bench.py --variants peft_lora,more_eq --profile more_eq   # torch.profiler by op

Writes benchmarks/results/e2e_bench[_quick|_llama1b][_cuda].json and .md (``--profile``:
``<stem>.profile.md``). The CUDA path was written without a GPU to test it on (untested); the
``llama1b`` preset has run on the CPU only, at batch 1 x 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from loramix import MixtureConfig, MixtureLinear, get_mixture_model
from loramix.assets import smollm2_path

RESULTS = Path(__file__).resolve().parent / "results"
NUM_TASKS = 4
NO_CUDA = "torch sees no CUDA device"
PRESETS = {
    # name: (batch, seq, default threads)
    "smollm2": (4, 128, 2),
    "llama1b": (8, 512, 2),
    "tiny": (4, 32, 1),
}


@dataclass(frozen=True)
class Variant:
    """One model to time.

    Args:
        name: short name, unique in the run.
        kind: ``"peft"`` (PEFT LoRA), ``"loramix"`` or ``"frozen"`` (no adapter: forward and backward only).
        method: the loramix method.
        r: rank (of one expert; MoRE's R; SMoRA's pool of rank-1 experts).
        num_experts: experts (conditional MixLoRA: the size of its factor pools).
        top_k: top-k of token routers, passed as ``method_options["top_k"]`` (``None``: the method's default).
        options: ``method_options`` as (key, value) pairs.
        groups: the tables it belongs to: ``reference``, ``equal_rank``, ``matched``, ``more_diagnosis``,
            ``factoring``.
        size_by: for ``matched`` variants, the field searched to match the reference's trainable parameters
            (``"r"`` or ``"num_experts"``); ``None`` when the size is given.
        note: what the variant is, for the tables.
        factored: ``MixtureLinear.factored_up_projection`` of its layers (False: token routers weigh with
            native ops and keep the weighted copy).
    """

    name: str
    kind: str
    method: str | None = None
    r: int = 0
    num_experts: int = 1
    top_k: int | None = None
    options: tuple[tuple[str, Any], ...] = ()
    groups: tuple[str, ...] = ()
    size_by: str | None = None
    note: str = ""
    factored: bool = True

    def mixture_config(self) -> MixtureConfig:
        """The loramix config of a ``loramix`` variant."""
        return MixtureConfig(
            method=self.method,
            r=self.r,
            num_experts=self.num_experts,
            num_tasks=NUM_TASKS,
            lora_alpha=2 * self.r,
            target_modules="all-linear",
            method_options={**dict(self.options), **({} if self.top_k is None else {"top_k": self.top_k})},
        )

    def shape(self) -> str:
        """A short description of the sizes, e.g. ``8 x r4 top-2``."""
        if self.kind == "frozen":
            return "-"
        if self.kind == "peft" or self.method in ("lora", "smora", "more"):
            text = f"r{self.r}" if self.method != "more" else f"R={self.r}"
        elif self.method == "conditional_mixlora":
            text = f"pools of {self.num_experts}, r{self.r}"
        else:
            text = f"{self.num_experts} x r{self.r}"
        if self.top_k is not None:
            text += f" top-{self.top_k}"
        extra = ", ".join(f"{key}={value}" for key, value in self.options)
        return f"{text} ({extra})" if extra else text


def variants_for(rank: int) -> list[Variant]:
    """Every variant of a run whose reference is PEFT LoRA of rank ``rank`` (a multiple of 8)."""
    if rank % 8:
        raise ValueError(f"--rank must be a multiple of 8 (it is split into 4 and 8 experts); got {rank}")
    both = ("equal_rank", "matched")
    eq = ("equal_rank",)
    quarter, eighth = rank // 4, rank // 8
    return [
        Variant("frozen", "frozen", groups=("reference",), note="frozen model, forward + backward only (floor)"),
        Variant("peft_lora", "peft", r=rank, groups=("reference",), note="PEFT LoRA (the reference)"),
        Variant("lora", "loramix", "lora", r=rank, groups=both),
        Variant("per_task_lora", "loramix", "per_task_lora", r=quarter, num_experts=NUM_TASKS, groups=both),
        Variant("moelora", "loramix", "moelora", r=eighth, num_experts=8, groups=both),
        Variant("moa", "loramix", "moa", r=quarter, num_experts=NUM_TASKS, groups=both, note="router-routed, top-1"),
        Variant("mixlora_eq", "loramix", "mixlora", r=eighth, num_experts=8, top_k=2, groups=eq),
        Variant("mixlora_matched", "loramix", "mixlora", num_experts=8, top_k=2, groups=("matched",), size_by="r"),
        Variant("hydralora_eq", "loramix", "hydralora", r=quarter, num_experts=4, groups=eq),
        Variant("hydralora_matched", "loramix", "hydralora", num_experts=4, groups=("matched",), size_by="r"),
        Variant("mode_eq", "loramix", "mode", r=quarter, num_experts=4, groups=eq),
        Variant("mode_matched", "loramix", "mode", num_experts=4, groups=("matched",), size_by="r"),
        Variant("mtl_lora_eq", "loramix", "mtl_lora", r=quarter, num_experts=4, groups=eq),
        Variant("mtl_lora_matched", "loramix", "mtl_lora", num_experts=4, groups=("matched",), size_by="r"),
        Variant("smora_eq", "loramix", "smora", r=rank, top_k=8, groups=eq),
        Variant("smora_matched", "loramix", "smora", top_k=8, groups=("matched",), size_by="r"),
        Variant("malora_eq", "loramix", "malora", r=eighth, num_experts=8, top_k=2, groups=eq),
        Variant("malora_matched", "loramix", "malora", num_experts=8, top_k=2, groups=("matched",), size_by="r"),
        Variant("conditional_mixlora_eq", "loramix", "conditional_mixlora", r=quarter, num_experts=rank, groups=eq),
        Variant(
            "conditional_mixlora_matched",
            "loramix",
            "conditional_mixlora",
            r=quarter,
            groups=("matched",),
            size_by="num_experts",
        ),
        Variant("more_eq", "loramix", "more", r=rank, groups=eq),
        Variant("more_matched", "loramix", "more", groups=("matched",), size_by="r"),
        # where MoRE's time goes: its selector and contrastive loss switched off one at a time
        Variant(
            "more_no_contrastive",
            "loramix",
            "more",
            r=rank,
            options=(("contrastive", False),),
            groups=("more_diagnosis",),
            note="MoRE without the contrastive loss",
        ),
        Variant(
            "more_logit_table",
            "loramix",
            "more",
            r=rank,
            options=(("task_embedding", False),),
            groups=("more_diagnosis",),
            note="MoRE with a T x candidates logit table (no task embedding, no contrastive loss)",
        ),
        Variant(
            "more_pow2_ranks",
            "loramix",
            "more",
            r=rank,
            options=(("candidate_ranks", tuple(2**i for i in range(rank.bit_length()) if 2**i <= rank)),),
            groups=("more_diagnosis",),
            note="MoRE with candidate ranks 1, 2, 4, ... (a smaller gate)",
        ),
        # the token routers' factored up-projection (no weighted copy kept) against native ops
        *(
            Variant(
                f"{method}_matched_native",
                "loramix",
                method,
                num_experts=experts,
                top_k=top_k,
                groups=("factoring",),
                size_by="r",
                note="native weighting, the weighted copy kept (factored_up_projection=False)",
                factored=False,
            )
            for method, experts, top_k in (("mixlora", 8, 2), ("smora", 1, 8))
        ),
    ]


# --------------------------------------------------------------------------------------------- models


def model_config(preset: str, layers: int | None = None) -> Any:
    """The transformers config of a preset (``layers`` overrides its depth, for parameter counting)."""
    if preset == "smollm2":
        config = AutoConfig.from_pretrained(smollm2_path())
    elif preset == "llama1b":
        # TinyLlama-1.1B's shape: 22 layers, hidden 2048, GQA with 4 key-value heads
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
    elif preset == "tiny":
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    else:
        raise ValueError(f"unknown --model {preset!r}; choose one of {sorted(PRESETS)}")
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def build_base(preset: str, device: str, dtype: torch.dtype) -> nn.Module:
    """The base model: SmolLM2's weights for ``smollm2``, seeded random weights for the others."""
    torch.manual_seed(0)
    if preset == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), torch_dtype=dtype)
    else:
        model = LlamaForCausalLM(model_config(preset)).to(dtype)
    return model.to(device)


def wrap(model: nn.Module, variant: Variant) -> nn.Module:
    """Add the variant's adapter to ``model`` (in place for the frozen floor)."""
    if variant.kind == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if variant.kind == "peft":
        config = LoraConfig(r=variant.r, lora_alpha=2 * variant.r, target_modules="all-linear")
        # keep PEFT's adapter in the model's dtype, as loramix's (PEFT upcasts bf16 adapters by default)
        return get_peft_model(model, config, autocast_adapter_dtype=False)
    mixture = get_mixture_model(model, variant.mixture_config())
    if not variant.factored:
        for module in mixture.modules():
            if isinstance(module, MixtureLinear):
                module.factored_up_projection = False
    return mixture


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_trainable(preset: str, variant: Variant) -> int:
    """Trainable parameters of ``variant`` on the full model: a one-layer copy's count times the depth."""
    config = model_config(preset, layers=1)
    config.vocab_size = 128  # the embeddings are never adapted
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    count = trainable_parameters(wrap(model, variant))
    return count * model_config(preset).num_hidden_layers


def resolve_sizes(preset: str, variants: list[Variant], rank: int) -> tuple[dict[str, int], int]:
    """The size of each ``matched`` variant that brings its trainable parameters closest to the reference's.

    Returns:
        ({variant name: size of its ``size_by`` field}, the reference's trainable parameters).
    """
    reference = count_trainable(preset, Variant("peft_lora", "peft", r=rank))
    sizes = {}
    for variant in variants:
        if variant.size_by is None:
            continue

        def count(size: int, variant: Variant = variant) -> float:
            try:
                return count_trainable(preset, dataclasses.replace(variant, **{variant.size_by: size}))
            except (ValueError, RuntimeError):  # too large for the layer (e.g. a subspace wider than d_in)
                return float("inf")

        low, high = 1, 8 * rank
        while count(low) == float("inf") and low < high:  # the smallest valid size (SMoRA: r >= top_k)
            low += 1

        while high - low > 1:  # counts grow with the size: the largest size at or under the reference
            middle = (low + high) // 2
            if count(middle) <= reference:
                low = middle
            else:
                high = middle
        sizes[variant.name] = min((low, high), key=lambda size: abs(count(size) - reference))
    return sizes, reference


# ---------------------------------------------------------------------------------------- measuring


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(preset: str, variant: Variant, device: str, threads: int, batch: int, seq: int, steps: int) -> dict:
    """Build, wrap and train ``variant`` for one warm-up and ``steps`` timed steps; step times and peak memory."""
    torch.set_num_threads(threads)
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():  # checked here: the parent must not touch CUDA before forking
        raise RuntimeError(NO_CUDA)
    dtype = torch.bfloat16 if preset == "llama1b" else torch.float32
    model = build_base(preset, device, dtype)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    mask = torch.ones_like(input_ids)
    task_ids = (torch.arange(batch) % NUM_TASKS).to(device)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        rss_method = "cuda max_memory_allocated"
    else:
        rss_method = "VmHWM after clear_refs" if reset_peak_rss() else "ru_maxrss (peak since start)"
        baseline = _rss_kib("VmRSS") * 1024
    model = wrap(model, variant)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if variant.kind != "frozen" else None
    extra = {"task_ids": task_ids} if variant.kind == "loramix" else {}
    step_end = getattr(model, "step_end", None) if variant.kind == "loramix" else None

    # What the autograd graph keeps for the backward, counted exactly (the allocator's peak is noisy): the
    # storages of the tensors saved during one forward, each once, parameters excluded (they exist anyway).
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def count_saved(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step(count: bool = False) -> None:
        if count:
            with torch.autograd.graph.saved_tensors_hooks(count_saved, lambda tensor: tensor):
                loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, **extra).loss
        else:
            loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, **extra).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step_end is not None:
            step_end()

    seconds, cpu_seconds = [], []
    for index in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(count=index == 0)
        if cuda:
            torch.cuda.synchronize()
        if index:  # the first step is the warm-up
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - baseline
    elif rss_method.startswith("VmHWM"):
        peak = _rss_kib("VmHWM") * 1024 - baseline
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    # trainable parameters, their gradients and the optimizer's state (AdamW: two moments and a step count)
    state = 2 * sum(p.numel() * p.element_size() for p in params)
    if optimizer is not None:
        state += sum(
            value.numel() * value.element_size()
            for values in optimizer.state.values()
            for value in values.values()
            if isinstance(value, torch.Tensor)
        )
    return {
        "step_seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_bytes": peak,
        "saved_bytes": sum(saved.values()),
        "state_bytes": state,
        "trainable": sum(p.numel() for p in params),
        "memory_method": rss_method,
    }


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` in a forked child and return its JSON result (or raise its error).

    The parent never runs tensor work, so the child starts with no thread pool, no CUDA context and a
    small heap: its peak memory is the variant's own.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            payload = {"ok": function(*args)}
        except BaseException:  # noqa: BLE001  (everything goes back to the parent)
            payload = {"error": traceback.format_exc()}
        with os.fdopen(write, "w") as pipe:
            json.dump(payload, pipe)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        raise RuntimeError(f"the child process died (wait status {status}) without a result")
    payload = json.loads(text)
    if "error" in payload:
        raise RuntimeError(payload["error"])
    return payload["ok"]


# ----------------------------------------------------------------------------------------- reporting


def summarize(report: dict) -> None:
    """Add each variant's figures and its ratios to PEFT LoRA (in place)."""
    for row in report["variants"]:
        runs = [run for run in row["runs"] if "step_seconds" in run]
        if runs:
            steps = [second for run in runs for second in run["step_seconds"]]
            row["step_ms"] = 1000 * min(steps)
            row["step_ms_median"] = 1000 * statistics.median(steps)
            row["cpu_ms"] = 1000 * min(second for run in runs for second in run["cpu_seconds"])
            row["peak_mib"] = min(run["peak_bytes"] for run in runs) / 2**20
            row["trainable"] = runs[0]["trainable"]
            if "saved_bytes" in runs[0]:  # the same in every run: the graph and the state are deterministic
                row["saved_mib"] = runs[0]["saved_bytes"] / 2**20
                row["state_mib"] = runs[0]["state_bytes"] / 2**20
    reference = next((row for row in report["variants"] if row["name"] == "peft_lora"), None)
    for row in report["variants"]:
        if reference is None or "step_ms" not in row or "step_ms" not in reference:
            continue
        row["step_ratio"] = row["step_ms"] / reference["step_ms"]
        row["step_ratio_median"] = row["step_ms_median"] / reference["step_ms_median"]
        row["cpu_ratio"] = row["cpu_ms"] / reference["cpu_ms"]
        row["memory_ratio"] = row["peak_mib"] / reference["peak_mib"] if reference["peak_mib"] > 0 else None
        row["params_ratio"] = row["trainable"] / reference["trainable"] if reference["trainable"] else None
        if "saved_mib" in row and "saved_mib" in reference:
            row["accounted_ratio"] = (row["saved_mib"] + row["state_mib"]) / (
                reference["saved_mib"] + reference["state_mib"]
            )


def markdown(report: dict) -> str:
    settings = report["settings"]
    memory = "CUDA max allocated" if settings["device"] == "cuda" else "peak RSS growth"
    lines = [
        "# End-to-end training step: loramix methods against PEFT LoRA\n",
        f"`{report['command']}`\n",
        f"Model {report['model_name']}, batch {settings['batch']} x {settings['seq']}, {settings['device']}, "
        f"{settings['threads']} thread(s), torch {report['torch']}, peft {report['peft']}; all linear layers "
        f"adapted; one step = forward + backward + AdamW. {settings['rounds']} round(s) of {settings['steps']} "
        f"timed step(s) per variant, variants interleaved round by round. Step time: the fastest step's CPU "
        f"time of the process (`time.process_time`, all its threads; with one thread the figure least "
        f"disturbed by other processes on a shared machine) and its wall-clock time; memory "
        f"= {memory} over the unwrapped model (smallest over rounds); saved for backward and trainable state: "
        f"counted exactly (module docstring). Load average "
        f"(1 / 5 / 15 min) at the start {report['load_start']}, at the end {report.get('load_end', '-')}.\n",
        f"Reference: PEFT LoRA r{settings['rank']}, {report['reference_trainable'] / 1e6:.2f}M trainable "
        "parameters. Ratios only (absolute times on a shared machine are not a property of the code).\n",
    ]
    titles = {
        "reference": "Reference and floor",
        "equal_rank": f"Equal rank (r x experts = {settings['rank']} components)",
        "matched": "Matched trainable parameters",
        "more_diagnosis": f"MoRE R={settings['rank']}: where its time goes",
        "factoring": "Token routers with native weighting (the matched rows above use the factored up-projection)",
    }
    for group, title in titles.items():
        rows = [row for row in report["variants"] if group in row["groups"]]
        if not rows:
            continue
        lines += [
            f"## {title}\n",
            "| variant | shape | trainable | params / PEFT | step CPU time / PEFT | step wall / PEFT | memory / PEFT "
            "| saved for backward MiB | trainable state MiB | saved + state / PEFT |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            label = row["name"] + (f" ({row['note']})" if row["note"] else "")
            if "step_ratio" not in row:
                status = "failed" if row.get("errors") else "not run"
                lines.append(f"| {label} | {row['shape']} | - | - | {status} | - | - | - | - | - |")
                continue
            memory_ratio = "-" if row["memory_ratio"] is None else f"{row['memory_ratio']:.3f}"
            params_ratio = "-" if row["params_ratio"] is None else f"{row['params_ratio']:.3f}"
            accounted = [f"{row['saved_mib']:.1f}", f"{row['state_mib']:.1f}"] if "saved_mib" in row else ["-", "-"]
            accounted.append(f"{row['accounted_ratio']:.3f}" if "accounted_ratio" in row else "-")
            lines.append(
                f"| {label} | {row['shape']} | {row['trainable'] / 1e6:.2f}M | {params_ratio} | "
                f"{row['cpu_ratio']:.3f} | {row['step_ratio']:.3f} | {memory_ratio} | {' | '.join(accounted)} |"
            )
        lines.append("")
    return "\n".join(lines)


def write(report: dict, out: Path, stem: str) -> None:
    summarize(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report) + "\n")


def load_average() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


# --------------------------------------------------------------------------------------------- profile


def profile(preset: str, variant: Variant, device: str, threads: int, batch: int, seq: int, steps: int) -> str:
    """torch.profiler's table of ``steps`` training steps of ``variant``, by op, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if preset == "llama1b" else torch.float32
    model = wrap(build_base(preset, device, dtype), variant)
    model.train()
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    input_ids = input_ids.to(device)
    extra = {"task_ids": (torch.arange(batch) % NUM_TASKS).to(device)} if variant.kind == "loramix" else {}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        with torch.profiler.record_function("forward"):
            loss = model(input_ids=input_ids, labels=input_ids, **extra).loss
        with torch.profiler.record_function("backward"):
            loss.backward()
        if optimizer is not None:
            with torch.profiler.record_function("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with run_profiler(activities=activities) as prof:
        for _ in range(steps):
            step()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)


# -------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="smollm2", help="base model preset")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, 1 round of 2 steps (smoke test)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch threads (default: 2; 1 for --quick)")
    parser.add_argument("--rank", type=int, help="PEFT LoRA's rank, the reference (default 32; 8 for --quick)")
    parser.add_argument("--batch", type=int, help="sequences per batch (default: the preset's)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 for --quick)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round (default 2)")
    parser.add_argument("--variants", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--profile", metavar="NAME", help="profile one variant by op instead of timing all")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    preset = "tiny" if args.quick else args.model
    batch, seq, threads = PRESETS[preset]
    batch, seq = args.batch or batch, args.seq or seq
    threads = args.threads or threads
    rounds = args.rounds or (1 if args.quick else 3)
    args.rank = args.rank or (8 if args.quick else 32)
    variants = variants_for(args.rank)
    if args.variants:
        wanted = args.variants.split(",")
        unknown = sorted(set(wanted) - {variant.name for variant in variants})
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {[variant.name for variant in variants]}")
        variants = [variant for variant in variants if variant.name in wanted or variant.name == "peft_lora"]
    sizes, reference_count = in_child(resolve_sizes, preset, variants, args.rank)
    variants = [
        dataclasses.replace(variant, **{variant.size_by: sizes[variant.name]}) if variant.size_by else variant
        for variant in variants
    ]
    stem = "e2e_bench" + ("_quick" if args.quick else "" if preset == "smollm2" else f"_{preset}")
    stem += "_cuda" if args.device == "cuda" else ""
    if args.profile:
        chosen = [variant for variant in variants if variant.name == args.profile]
        if not chosen:
            raise SystemExit(f"--profile {args.profile}: not among the variants run")
        table = in_child(profile, preset, chosen[0], args.device, threads, batch, seq, args.steps)
        args.out.mkdir(parents=True, exist_ok=True)
        text = f"## {chosen[0].name} ({chosen[0].shape()})\n\n`{' '.join(sys.argv)}`\n\n```\n{table}```\n"
        with open(args.out / f"{stem}.profile.md", "a") as handle:
            handle.write(text)
        print(text)
        return
    command = "python benchmarks/e2e_bench.py " + " ".join(sys.argv[1:])
    report = {
        "command": command.strip(),
        "model_name": {"smollm2": "SmolLM2-135M-Instruct", "llama1b": "Llama ~1.1B (random, bf16)"}.get(
            preset, "tiny Llama (random)"
        ),
        "settings": {
            "preset": preset,
            "device": args.device,
            "threads": threads,
            "rank": args.rank,
            "batch": batch,
            "seq": seq,
            "rounds": rounds,
            "steps": args.steps,
        },
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "peft": __import__("peft").__version__,
        "load_start": load_average(),
        "reference_trainable": reference_count,
        "variants": [
            {
                "name": variant.name,
                "shape": variant.shape(),
                "note": variant.note,
                "groups": list(variant.groups),
                "config": dataclasses.asdict(variant),
                "runs": [],
            }
            for variant in variants
        ],
    }
    rows = {row["name"]: row for row in report["variants"]}
    for round_index in range(rounds):
        # rotate the order each round, so no variant always runs right after the same neighbour
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            started = time.perf_counter()
            try:
                result = in_child(measure, preset, variant, args.device, threads, batch, seq, args.steps)
            except RuntimeError as err:
                if NO_CUDA in str(err):
                    raise SystemExit(f"--device cuda: {NO_CUDA}") from None
                rows[variant.name].setdefault("errors", []).append(str(err)[-2000:])
                print(f"round {round_index + 1}: {variant.name} FAILED\n{err}", file=sys.stderr)
                continue
            result["round"] = round_index + 1
            result["load"] = load_average()
            rows[variant.name]["runs"].append(result)
            report["load_end"] = load_average()
            write(report, args.out, stem)
            fastest, cpu = 1000 * min(result["step_seconds"]), 1000 * min(result["cpu_seconds"])
            print(
                f"round {round_index + 1}: {variant.name:28s} fastest step {fastest:8.1f} ms (CPU {cpu:8.1f} ms), peak "
                f"{result['peak_bytes'] / 2**20:8.1f} MiB, {time.perf_counter() - started:5.1f} s, "
                f"load {result['load']}",
                flush=True,
            )
    write(report, args.out, stem)
    print(markdown(report))


if __name__ == "__main__":
    main()
