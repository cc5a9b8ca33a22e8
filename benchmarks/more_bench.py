"""MoRE against LoRA baselines on five BIG-bench classification tasks with all-MiniLM-L6-v2.

The analogue, at CPU size, of MoRE's GLUE table: one MiniLM encoder shared by all tasks, a linear head per
task (``MultiTaskSequenceClassifier``), adapters on every attention and feed-forward projection
(query, key, value, attention.output.dense, intermediate.dense, output.dense) of the top
``trained_layers`` (2) of MiniLM's 6 transformer layers, 12 adapted linear layers. The frozen bottom
(embeddings and 4 layers) is run once per example and its output cached: the same function as running it
at every step with dropout off there, at a third of the cost of a step (cut to fit the 2-core budget).

Data: the ``task.json`` files of the bigbench 1.0.0 package (``loramix.assets.bigbench_tasks_dir()``);
the label of an example is the argmax of its ``target_scores``. Each task's examples are shuffled with a
fixed split seed (0, independent of the training seed) and cut into test (first 200), validation (next
100) and train (next up to 300; implicatures has only 192 left). Inputs are truncated from the left to 64
tokens (the claim, the conclusion and the question are at the end of the texts).

Training: AdamW (lr 1e-3, weight decay 0.01), linear warm-up over 10% of the steps then linear decay,
batch 16, 150 steps (2,400 examples, about 1.6 epochs) for every method, one torch thread per worker.
Batches hold one task each, drawn with MoRE's rule (probability softmax over tasks of |D_t| / Σ|D|) for
every method, except the ``more_random_sampling`` ablation, whose batches are drawn uniformly from the
pooled examples. Accuracy is measured on the
validation and test splits after the last step.

Each run writes ``results/more/<method>__seed<k>.json`` when it ends, and runs whose file exists are
skipped, so an interrupted sweep resumes. ``--table`` assembles ``results/more_table.md`` and
``results/more_table.json``. ``--quick`` is a smoke form (2 tasks, tiny splits, 1 seed, few steps) with
its own results folder.

Usage::

    python benchmarks/more_bench.py                 # the full sweep (all methods, seeds 0 1 2)
    python benchmarks/more_bench.py &               # ... started again: a second worker shares the sweep
    python benchmarks/more_bench.py --table         # assemble the table from the run files
    python benchmarks/more_bench.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from loramix import MixtureConfig, get_mixture_model
from loramix.assets import bigbench_tasks_dir, minilm_path
from loramix.data.samplers import task_probabilities
from loramix.heads import MultiTaskSequenceClassifier

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
TASKS = {
    "multiemo_en": "multiemo/all_sentence_en",
    "vitaminc": "vitaminc_fact_verification",
    "movie_dialog": "movie_dialog_same_or_different",
    "hyperbaton": "hyperbaton",
    "implicatures": "implicatures",
}
SPLIT_SEED = 0
#: This table's MoRE rows use the release's linear scaling (loramix's default before issue 11); explicit so
#: the committed table stays reproducible.
LINEAR = {"linear_scaling": True}


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method and its settings.

    Attributes:
        name: row name.
        method: loramix method, or ``None`` for heads only (frozen encoder).
        r: rank of one expert (MoRE: the maximum rank R).
        num_experts: E (``per_task_lora``: the number of tasks).
        options: ``method_options``.
        sampling: ``"more"`` (one task per batch, MoRE's rule) or ``"random"`` (mixed batches).
        lr: learning rate, or ``None`` for the sweep's.
    """

    name: str
    method: str | None
    r: int = 8
    num_experts: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    sampling: str = "more"
    lr: float | None = None


def variants(num_tasks: int) -> list[Variant]:
    """The table's rows in order."""
    return [
        Variant("heads_only", None),
        Variant("lora_r8", "lora"),
        Variant("per_task_lora_r8", "per_task_lora", num_experts=num_tasks),
        Variant("moelora_4x2", "moelora", r=2, num_experts=4),
        Variant("more_r8", "more", options=LINEAR),
        Variant("more_no_linear_scaling", "more", options={"linear_scaling": False}),
        Variant("more_no_task_embedding", "more", options={**LINEAR, "task_embedding": False}),
        Variant("more_no_contrastive", "more", options={**LINEAR, "contrastive": False}),
        Variant("more_no_straight_through", "more", options={**LINEAR, "straight_through": False}),
        Variant("more_ranks_1248", "more", options={**LINEAR, "candidate_ranks": [1, 2, 4, 8]}),
        Variant("more_random_sampling", "more", options=LINEAR, sampling="random"),
        Variant("lora_r8_lr3e-3", "lora", lr=3e-3),
        Variant("moelora_4x2_lr3e-3", "moelora", r=2, num_experts=4, lr=3e-3),
        Variant("more_r8_lr3e-3", "more", options=LINEAR, lr=3e-3),
        Variant("more_no_linear_scaling_lr3e-3", "more", options={"linear_scaling": False}, lr=3e-3),
    ]


@dataclass
class Settings:
    """Sizes of one sweep."""

    tasks: list[str]
    train: int = 300
    val: int = 100
    test: int = 200
    max_length: int = 64
    trained_layers: int = 2
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    out: Path = RESULTS / "more"


# ---------------------------------------------------------------------------------------------- data
@dataclass
class TaskData:
    """One task's labels and splits, each a list of (features FloatTensor[seq, 384], label)."""

    name: str
    labels: list[str]
    splits: dict[str, list[tuple[torch.Tensor, int]]]


class PassThroughEmbeddings(nn.Module):
    """Stands in for BERT's embeddings when the input is already a hidden state: returns it unchanged."""

    def forward(self, inputs_embeds: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return inputs_embeds


def minilm_layers(layers: slice, embeddings: bool) -> nn.Module:
    """all-MiniLM-L6-v2 keeping only ``layers`` of its 6 transformer layers.

    With ``embeddings`` it reads token ids (the frozen bottom, whose output is cached); without, its
    embeddings are a :class:`PassThroughEmbeddings` and it reads ``inputs_embeds`` = the bottom's output.
    """
    model = AutoModel.from_pretrained(minilm_path())
    model.encoder.layer = nn.ModuleList(list(model.encoder.layer)[layers])
    if not embeddings:
        model.embeddings = PassThroughEmbeddings()
    return model


@torch.no_grad()
def frozen_features(token_ids: list[list[int]], frozen_layers: int) -> list[torch.Tensor]:
    """Output of MiniLM's embeddings and first ``frozen_layers`` layers (eval mode), FloatTensor[seq, 384] each."""
    bottom = minilm_layers(slice(0, frozen_layers), embeddings=True).eval()
    features = []
    for start in range(0, len(token_ids), 64):
        chunk = token_ids[start : start + 64]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), 1
        hidden = bottom(input_ids=input_ids, attention_mask=mask).last_hidden_state
        features += [hidden[row, : len(ids)].clone() for row, ids in enumerate(chunk)]
    return features


def load_tasks(settings: Settings, tokenizer: Any) -> list[TaskData]:
    """Read, split and tokenise each task's BIG-bench examples (fixed split seed) and run the frozen bottom."""
    root = bigbench_tasks_dir()
    frozen_layers = 6 - settings.trained_layers
    tasks = []
    for name in settings.tasks:
        examples = json.loads((root / TASKS[name] / "task.json").read_text())["examples"]
        labels = sorted({label for example in examples for label in example["target_scores"]})
        rows = [(ex["input"], labels.index(max(ex["target_scores"], key=ex["target_scores"].get))) for ex in examples]
        random.Random(SPLIT_SEED).shuffle(rows)
        bounds = {"test": (0, settings.test), "val": (settings.test, settings.test + settings.val)}
        bounds["train"] = (settings.test + settings.val, settings.test + settings.val + settings.train)
        splits = {}
        for split, (start, stop) in bounds.items():
            texts, ids = zip(*rows[start:stop], strict=True)
            encoded = tokenizer(list(texts), truncation=True, max_length=settings.max_length)["input_ids"]
            splits[split] = list(zip(frozen_features(encoded, frozen_layers), ids, strict=True))
        tasks.append(TaskData(name, labels, splits))
    return tasks


def collate(rows: list[tuple[torch.Tensor, int, int]]) -> dict[str, Any]:
    """Pad (features, label, task) rows to the longest.

    Returns:
        ``inputs_embeds`` FloatTensor[batch, seq, 384], ``attention_mask`` LongTensor[batch, seq],
        ``labels`` and ``task_ids`` LongTensor[batch], and ``input_ids=None``.
    """
    width = max(features.shape[0] for features, _, _ in rows)
    inputs_embeds = torch.zeros((len(rows), width, rows[0][0].shape[-1]))
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (features, _, _) in enumerate(rows):
        inputs_embeds[row, : features.shape[0]] = features
        attention_mask[row, : features.shape[0]] = 1
    return {
        "input_ids": None,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "labels": torch.tensor([label for _, label, _ in rows]),
        "task_ids": torch.tensor([task for _, _, task in rows]),
    }


def training_batches(tasks: list[TaskData], settings: Settings, sampling: str, seed: int) -> list[list[tuple]]:
    """``settings.steps`` batches of (features, label, task) rows.

    ``"more"``: each batch is from one task drawn with MoRE's rule (``task_probabilities(sizes, "more")``),
    taking that task's examples in a reshuffled order; ``"random"``: batches of the pooled examples,
    reshuffled each epoch.
    """
    rng = random.Random(seed)
    pools = [[(ids, label, t) for ids, label in task.splits["train"]] for t, task in enumerate(tasks)]
    batches = []
    if sampling == "random":
        pooled: list[tuple] = []
        while len(batches) < settings.steps:
            if len(pooled) < settings.batch_size:
                pooled = [row for pool in pools for row in pool]
                rng.shuffle(pooled)
            batches.append([pooled.pop() for _ in range(settings.batch_size)])
        return batches
    probabilities = task_probabilities([len(pool) for pool in pools], "more")
    queues: list[list[tuple]] = [[] for _ in pools]
    for _ in range(settings.steps):
        task = rng.choices(range(len(pools)), weights=probabilities)[0]
        if len(queues[task]) < settings.batch_size:
            queues[task] = list(pools[task])
            rng.shuffle(queues[task])
        batches.append([queues[task].pop() for _ in range(settings.batch_size)])
    return batches


# ---------------------------------------------------------------------------------------------- model
def build_model(variant: Variant, tasks: list[TaskData], trained_layers: int) -> torch.nn.Module:
    """MiniLM's top layers with one head per task, wrapped with the variant's mixture (heads only: frozen)."""
    encoder = minilm_layers(slice(6 - trained_layers, 6), embeddings=False)
    model = MultiTaskSequenceClassifier(encoder, [len(task.labels) for task in tasks])
    if variant.method is None:
        model.encoder.requires_grad_(False)
        return model
    config = MixtureConfig(
        method=variant.method,
        target_modules=TARGETS,
        r=variant.r,
        num_experts=variant.num_experts,
        lora_alpha=2.0 * variant.r,
        lora_dropout=0.1,
        num_tasks=len(tasks),
        task_names=[task.name for task in tasks],
        method_options=dict(variant.options),
        modules_to_save=["heads"],
    )
    return get_mixture_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


@torch.no_grad()
def accuracy(model: torch.nn.Module, rows: list[tuple]) -> float:
    """Accuracy on (features, label, task) rows, in batches of 64."""
    model.eval()
    correct = 0
    for start in range(0, len(rows), 64):
        batch = collate(rows[start : start + 64])
        labels = batch.pop("labels")
        logits = model(**batch).logits
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(rows)


def chosen_ranks(model: torch.nn.Module, tasks: list[TaskData]) -> dict[str, list[int]] | None:
    """MoRE's rank k_t per task, one entry per adapted layer (in layer order); ``None`` for other methods."""
    layers = model.mixture_layers() if hasattr(model, "mixture_layers") else {}
    routers = [layer.router for layer in layers.values() if hasattr(layer.router, "chosen_ranks")]
    if not routers:
        return None
    with torch.no_grad():
        per_layer = [router.chosen_ranks().tolist() for router in routers]
    return {task.name: [ranks[t] for ranks in per_layer] for t, task in enumerate(tasks)}


def train_run(variant: Variant, seed: int, tasks: list[TaskData], settings: Settings) -> dict:
    """Train one variant with one seed and return its record (accuracies, parameters, times, ranks)."""
    torch.manual_seed(seed)
    model = build_model(variant, tasks, settings.trained_layers)
    params = [param for param in model.parameters() if param.requires_grad]
    lr = variant.lr or settings.lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, settings.steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    initial_ranks = chosen_ranks(model, tasks)
    losses = []
    start = time.perf_counter()
    model.train()
    for rows in training_batches(tasks, settings, variant.sampling, seed):
        outputs = model(**collate(rows))
        outputs.loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(outputs.loss.detach()))
    train_time = time.perf_counter() - start
    start = time.perf_counter()
    scores = {}
    for t, task in enumerate(tasks):
        scores[task.name] = {
            split: accuracy(model, [(features, label, t) for features, label in task.splits[split]])
            for split in ("val", "test")
        }
    final_ranks = chosen_ranks(model, tasks)
    return {
        "variant": variant.name,
        "method": variant.method,
        "r": variant.r,
        "num_experts": variant.num_experts,
        "options": variant.options,
        "sampling": variant.sampling,
        "seed": seed,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "lr": lr,
        "trained_layers": settings.trained_layers,
        "split_sizes": {task.name: {k: len(v) for k, v in task.splits.items()} for task in tasks},
        "trainable_params": trainable_parameters(model),
        "train_time_s": round(train_time, 1),
        "eval_time_s": round(time.perf_counter() - start, 1),
        "loss_first_20": sum(losses[:20]) / len(losses[:20]),
        "loss_last_20": sum(losses[-20:]) / len(losses[-20:]),
        "scores": scores,
        "test_average": statistics.mean(score["test"] for score in scores.values()),
        "initial_ranks": initial_ranks,
        "chosen_ranks": final_ranks,
        "rank_changes": None
        if final_ranks is None
        else sum(a != b for task in final_ranks for a, b in zip(initial_ranks[task], final_ranks[task], strict=True)),
    }


def claim(path: Path) -> bool:
    """Claim a run for this process (so parallel workers split the sweep); False if another live one has it."""
    lock = path.with_suffix(".running")
    try:
        owner = int(lock.read_text())
        os.kill(owner, 0)
        return owner == os.getpid()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    lock.write_text(str(os.getpid()))
    return int(lock.read_text()) == os.getpid()


def sweep(settings: Settings, only: list[str] | None) -> None:
    """Run every (variant, seed) whose JSON is missing and that no other live worker has claimed.

    Each run's JSON is written as soon as it ends, so several workers can share a sweep and an
    interrupted sweep resumes.
    """
    settings.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.truncation_side = "left"
    tasks = load_tasks(settings, tokenizer)
    for seed in settings.seeds:
        for variant in variants(len(tasks)):
            if only and variant.name not in only:
                continue
            path = settings.out / f"{variant.name}__seed{seed}.json"
            if path.exists() or not claim(path):
                continue
            record = train_run(variant, seed, tasks, settings)
            path.write_text(json.dumps(record, indent=1) + "\n")
            path.with_suffix(".running").unlink(missing_ok=True)
            print(
                f"{variant.name} seed {seed}: test avg {record['test_average']:.3f}, "
                f"{record['trainable_params']:,} params, {record['train_time_s']:.0f}s",
                flush=True,
            )


# ---------------------------------------------------------------------------------------------- table
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rank_summary(records: list[dict]) -> dict[str, float] | None:
    """Mean chosen rank per task over layers and seeds, or ``None`` for methods without a selector."""
    ranks = [record["chosen_ranks"] for record in records if record.get("chosen_ranks")]
    if not ranks:
        return None
    return {task: statistics.mean(rank for run in ranks for rank in run[task]) for task in ranks[0]}


def table(out: Path, destination: Path) -> str:
    """Assemble the run files of ``out`` into ``<destination>.md`` and ``.json``; return the Markdown."""
    records: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*.json")):
        record = json.loads(path.read_text())
        records.setdefault(record["variant"], []).append(record)
    order = [variant.name for variant in variants(5)]
    names = sorted(records, key=lambda name: order.index(name) if name in order else len(order))
    rows = []
    for name in names:
        runs = records[name]
        task_names = list(runs[0]["scores"])
        rows.append(
            {
                "variant": name,
                "seeds": sorted(run["seed"] for run in runs),
                "trainable_params": runs[0]["trainable_params"],
                "train_time_s": statistics.mean(run["train_time_s"] for run in runs),
                "test": {task: _mean_std([run["scores"][task]["test"] for run in runs]) for task in task_names},
                "val_average": _mean_std([statistics.mean(s["val"] for s in run["scores"].values()) for run in runs]),
                "test_average": _mean_std([run["test_average"] for run in runs]),
                "mean_chosen_rank": rank_summary(runs),
            }
        )
    if not rows:
        return "no runs yet\n"
    task_names = list(rows[0]["test"])
    header = ["variant", "seeds", "trainable params", "train s", *task_names, "test avg", "val avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], str(len(row["seeds"])), f"{row['trainable_params']:,}", f"{row['train_time_s']:.0f}"]
        cells += [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in (row["test"][task] for task in task_names)]
        cells += [f"**{100 * row['test_average'][0]:.1f} ± {100 * row['test_average'][1]:.1f}**"]
        cells += [f"{100 * row['val_average'][0]:.1f} ± {100 * row['val_average'][1]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    rank_rows = [row for row in rows if row["mean_chosen_rank"]]
    if rank_rows:
        lines += ["", "Mean rank chosen by MoRE's selector (over layers and seeds):", ""]
        lines += ["| variant | " + " | ".join(task_names) + " |", "|" + "---|" * (len(task_names) + 1)]
        for row in rank_rows:
            ranks = row["mean_chosen_rank"]
            lines.append(f"| {row['variant']} | " + " | ".join(f"{ranks[task]:.2f}" for task in task_names) + " |")
    markdown = "\n".join(lines) + "\n"
    destination.with_suffix(".md").write_text(markdown)
    destination.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return markdown


def main(argv: list[str] | None = None) -> None:
    """Command line: run the sweep (or its quick form), or assemble the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke form: 2 tasks, tiny splits, 1 seed, 6 steps")
    parser.add_argument("--table", action="store_true", help="only assemble the table from the run files")
    parser.add_argument("--variants", nargs="*", help="run only these rows")
    parser.add_argument("--seeds", nargs="*", type=int, help="seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--out", type=Path, help="folder of the run files")
    parser.add_argument("--trained-layers", type=int, help="top MiniLM layers adapted (the rest frozen, cached)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        settings = Settings(tasks=["multiemo_en", "hyperbaton"], train=16, val=8, test=8, steps=6, batch_size=4)
        settings.seeds, settings.out = (0,), RESULTS / "more_quick"
    else:
        settings = Settings(tasks=list(TASKS))
    settings.seeds = tuple(args.seeds) if args.seeds else settings.seeds
    settings.steps = args.steps or settings.steps
    settings.out = args.out or settings.out
    settings.trained_layers = args.trained_layers or settings.trained_layers
    if not args.table:
        sweep(settings, args.variants)
    destination = settings.out.parent / f"{settings.out.name}_table"
    print(table(settings.out, destination))


if __name__ == "__main__":
    main()
