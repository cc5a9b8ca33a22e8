"""Step time of loramix's Trainer: one process against 2-process DDP and 2-process FSDP2 (gloo on the CPU).

The three layouts train the same small Llama (MOELoRA on all attention and MLP projections) with the same
global batch (8 rows of 64 tokens per optimizer step, targets of varied length): one process with batch 8,
and two processes with batch 4 each, launched by torchrun (FSDP2 through the environment that
``accelerate launch --config_file recipes/accelerate/fsdp.yaml`` sets). Each process uses one thread; a
step's time is the wall time between two optimizer steps on rank 0, and each layout reports the median of
its timed steps after warm-up (the first steps are dropped). On a machine shared with other work the
figures are noisy: compare the layouts of one run only.

    python benchmarks/dist_bench.py                # 12 timed steps per layout
    python benchmarks/dist_bench.py --steps 4      # quick

Writes benchmarks/results/dist_bench.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
GLOBAL_BATCH = 8
SEQ_LEN = 64
VOCAB = 2048
WARMUP = 3


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramix import MixtureConfig, get_mixture_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=SEQ_LEN,
        pad_token_id=0,
    )
    mixture = MixtureConfig(
        method="moelora",
        r=8,
        num_experts=4,
        num_tasks=2,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_mixture_model(LlamaForCausalLM(config), mixture)


def _examples(count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for index in range(count):
        prompt = int(torch.randint(8, 24, (1,), generator=generator))
        length = int(torch.randint(prompt + 4, SEQ_LEN + 1, (1,), generator=generator))
        input_ids = torch.zeros(SEQ_LEN, dtype=torch.long)
        input_ids[:length] = torch.randint(3, VOCAB, (length,), generator=generator)
        labels = torch.full((SEQ_LEN,), -100, dtype=torch.long)
        labels[prompt:length] = input_ids[prompt:length]
        mask = (torch.arange(SEQ_LEN) < length).long()
        examples.append(
            {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "task_ids": torch.tensor(index % 2)}
        )
    return examples


def worker(steps: int, output: Path, result: Path) -> None:
    """Train ``WARMUP + steps`` optimizer steps; rank 0 writes the step times."""
    torch.set_num_threads(1)
    from loramix.train import TensorBatches, Trainer, TrainingSettings

    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = GLOBAL_BATCH // world
    examples = _examples(GLOBAL_BATCH * (WARMUP + steps + 1))
    stamps: list[float] = []
    settings = TrainingSettings(
        max_steps=WARMUP + steps,
        batch_size=batch,
        learning_rate=1e-3,
        progress_bar=False,
        mixed_precision="no",
        use_cpu=True,
        keep_last=1,
    )

    def factory(stage, rank: int, world_size: int) -> TensorBatches:
        return TensorBatches(examples, batch, rank=rank, world_size=world_size)

    trainer = Trainer(_model(), settings, factory, output, callbacks=[lambda state: stamps.append(time.perf_counter())])
    started = time.perf_counter()
    trainer.train()
    if trainer.accelerator.is_main_process:
        times = [later - earlier for earlier, later in zip([started, *stamps], stamps, strict=False)]
        result.write_text(
            json.dumps(
                {
                    "engine": trainer.accelerator.distributed_type.name,
                    "processes": trainer.accelerator.num_processes,
                    "step_s": times[WARMUP:],
                }
            )
        )


def _run(layout: str, steps: int, directory: Path, port: int) -> dict:
    result = directory / f"{layout}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    script = [str(Path(__file__).resolve()), "--worker", "--steps", str(steps), str(directory / layout), str(result)]
    if layout == "1 process":
        command = [sys.executable, *script]
    else:
        if layout.startswith("FSDP"):
            env.update({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
        command = [sys.executable, *launcher, *script]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{layout} failed:\n{completed.stderr[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per layout (after warm-up)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, Path(args.paths[0]), Path(args.paths[1]))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, layout in enumerate(("1 process", "DDP 2 processes", "FSDP2 2 processes")):
            data = _run(layout, args.steps, Path(scratch), 29700 + index)
            rows[layout] = {**data, "median_step_s": statistics.median(data["step_s"])}
            print(f"{layout:>18}: {rows[layout]['median_step_s'] * 1000:8.1f} ms/step ({data['engine']})", flush=True)
    base = rows["1 process"]["median_step_s"]
    RESULTS.mkdir(exist_ok=True)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "global_batch": GLOBAL_BATCH,
        "seq_len": SEQ_LEN,
        "timed_steps": args.steps,
        "layouts": rows,
    }
    (RESULTS / "dist_bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Trainer step time by layout (CPU, gloo, one thread per process)",
        "",
        f"{summary['machine']}; global batch {GLOBAL_BATCH} x {SEQ_LEN} tokens; median of {args.steps} steps.",
        "",
        "| layout | engine | ms / step | vs 1 process |",
        "|---|---|---|---|",
    ]
    for layout, row in rows.items():
        ratio = row["median_step_s"] / base
        lines.append(f"| {layout} | {row['engine']} | {row['median_step_s'] * 1000:.1f} | {ratio:.2f}x |")
    (RESULTS / "dist_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
