"""Interference suite: tasks that share their inputs but want different outputs, on SmolLM2-135M-Instruct.

Every task reads the same BIG-bench inputs (``sports_understanding`` sentences: "Jamal Murray was perfect
from the line") and answers with a different rule of the text (``first_word`` -> "Jamal", ``last_word``
-> "line"; ``--scale gpu`` adds ``second_word`` and ``second_last_word``). Nothing in the input names the
task, and the causal LM's output head is shared, so one shared LoRA has to give one answer per input and
cannot fit the rules together, while a method routed by the task id can fit each. Input-routed mixtures
(MixLoRA) see only the text, so they are in the shared LoRA's position.

The runs go through the library as a user's would: the recipe of ``recipes/demo.yaml`` (tasks from
:func:`loramix.demo.write_interference_tasks`, ``train_recipe``, ``evaluate_adapters``), with the
suite's steps, seeds and rows. Exact match on each task's test split; the routing summary of each run
(MoRE's chosen ranks, MOELoRA's gates) is kept with the run.

Each run writes ``results/interference_<scale>/runs/<row>__seed<k>.json`` when it ends and is skipped
when that file exists; ``assemble`` writes ``table.md`` / ``table.json`` from the finished runs (mean ±
sd over seeds and the paired difference to the shared LoRA, 95% t interval).

Usage::

    python benchmarks/interference_bench.py run                 # every row, seeds 0 1 2 (cpu scale)
    python benchmarks/interference_bench.py assemble
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from loramix import assets
from loramix.demo import routing_overview, write_interference_tasks

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
TOP_ATTENTION = r"model\.layers\.(2[2-9])\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
ALL_ATTENTION = r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
SCALES: dict[str, dict[str, Any]] = {
    "cpu": {"rules": ["first_word", "last_word"], "steps": 60, "targets": TOP_ATTENTION, "examples": 1000, "test": 300},
    "gpu": {
        "rules": ["first_word", "last_word", "second_word", "second_last_word"],
        "steps": 400,
        "targets": ALL_ATTENTION,
        "examples": 1000,
        "test": 300,
    },
}
SEEDS = (0, 1, 2)


def rows(num_tasks: int) -> list[tuple[str, dict[str, Any]]]:
    """(row name, mixture without targets) in queue order; total rank 8 per adapted layer for every row."""
    return [
        ("lora_r8", {"method": "lora", "r": 8, "lora_alpha": 16}),
        (
            f"per_task_lora_r{8 // num_tasks}",
            {"method": "per_task_lora", "num_experts": "tasks", "r": 8 // num_tasks, "lora_alpha": 16 // num_tasks},
        ),
        ("more_r8", {"method": "more", "r": 8, "lora_alpha": 16, "method_options": {"linear_scaling": True}}),
        (
            "more_r8_no_linear_scaling",
            {"method": "more", "r": 8, "lora_alpha": 16, "method_options": {"linear_scaling": False}},
        ),
        ("moelora_4x2", {"method": "moelora", "r": 2, "num_experts": 4, "lora_alpha": 4}),
        ("mixlora_4x2_top2", {"method": "mixlora", "r": 2, "num_experts": 4, "top_k": 2, "lora_alpha": 4}),
    ]


def run_one(name: str, mixture: dict[str, Any], seed: int, scale: dict[str, Any], data_tasks: list[dict]) -> dict:
    """Train and evaluate one row with one seed through the library; return its record."""
    from loramix.eval import evaluate_adapters
    from loramix.runs.recipe import Recipe
    from loramix.train.pipeline import train_recipe

    spec = yaml.safe_load(DEMO.read_text())
    data = copy.deepcopy(spec["recipe"])
    data["data"]["tasks"] = data_tasks
    data["data"]["test"] = scale["test"]  # the demo's 60 make one example 1.7 points; 300 make it 0.33
    data["training"].update(max_steps=scale["steps"], seed=seed, warmup_steps=max(1, scale["steps"] // 10))
    work = Path(tempfile.mkdtemp(prefix=f"interference_{name}_"))
    try:
        data.update(name=name, mixture={**mixture, "target_modules": scale["targets"]}, output_dir=str(work / name))
        recipe = Recipe.from_dict(data)
        start = time.perf_counter()
        train_recipe(recipe)
        train_time = time.perf_counter() - start
        outcome = evaluate_adapters([work / name / "adapter"], work / "report", plots=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    scores = {task: metrics["exact_match"] for task, metrics in outcome["results"][name].items()}
    routing = outcome["routing"][name]
    return {
        "row": name,
        "inputs": input_source(),
        "mixture": mixture,
        "seed": seed,
        "scale": scale,
        "recipe": {key: data[key] for key in ("model", "data", "training", "eval")},
        "train_time_s": round(train_time, 1),
        "exact_match": scores,
        "average": statistics.mean(scores.values()),
        "routing_overview": routing_overview(routing),
        "routing": routing,
    }


def input_source() -> str:
    """Where the suite's inputs come from: ``"bigbench"`` (the demo's BIG-bench task) when its files are
    present, else the demo's fallback (``fortunes``: sayings of a packaged fortune file)."""
    try:
        assets.bigbench_tasks_dir()
    except assets.AssetError:
        return yaml.safe_load(DEMO.read_text())["interference"].get("fallback") or "bigbench"
    return "bigbench"


def run(scale_name: str, out: Path, only: list[str] | None, seeds: tuple[int, ...]) -> None:
    """Run every (row, seed) whose file is missing, seed-major (every row's seed 0 first)."""
    scale = SCALES[scale_name]
    spec = yaml.safe_load(DEMO.read_text())["interference"]
    spec = {**spec, "rules": scale["rules"], "max_examples": scale["examples"]}
    if input_source() != "bigbench":
        print(f"BIG-bench files not found: the inputs are the {spec.get('fallback')!r} fallback's", flush=True)
    data_tasks = write_interference_tasks(spec, out / "data")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for name, mixture in rows(len(scale["rules"])):
            if only and name not in only:
                continue
            path = out / "runs" / f"{name}__seed{seed}.json"
            if path.exists():
                continue
            print(f"{time.strftime('%H:%M:%S')} start {name} seed {seed}", flush=True)
            try:
                record = run_one(name, mixture, seed, scale, data_tasks)
            except Exception as error:  # one failing row must not stop the rest
                print(f"{name} seed {seed} failed: {error!r}", flush=True)
                continue
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(path)
            print(f"{time.strftime('%H:%M:%S')} done {name} seed {seed}: {record['exact_match']}", flush=True)


def separation(routing: dict[str, Any]) -> float | None:
    """How differently a task-routed method's tasks use the adapter: the total variation distance between
    two tasks' gates (each normalised to sum 1; 0 = the same components in the same proportions, 1 =
    disjoint), averaged over task pairs and layers. ``None`` for input-routed methods."""
    if routing.get("kind") != "gate":
        return None
    tasks = list(routing["tasks"].values())
    distances = []
    for first in range(len(tasks)):
        for second in range(first + 1, len(tasks)):
            for layer, gate in tasks[first].items():
                a, b = sum(gate), sum(tasks[second][layer])
                other = tasks[second][layer]
                distances.append(0.5 * sum(abs(x / a - y / b) for x, y in zip(gate, other, strict=True)))
    return statistics.mean(distances) if distances else None


def _t95(n: int) -> float:
    return {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}.get(n - 1, 1.96)


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def assemble(out: Path) -> str:
    """``table.md`` / ``table.json`` from the finished runs; returns the Markdown."""
    records = [json.loads(path.read_text()) for path in sorted((out / "runs").glob("*.json"))]
    if not records:
        return "no runs yet\n"
    by_row: dict[str, list[dict]] = {}
    for record in records:
        by_row.setdefault(record["row"], []).append(record)
    tasks = list(records[0]["exact_match"])
    shared = {record["seed"]: record["average"] for record in by_row.get("lora_r8", [])}
    lines = [
        "| row | seeds | " + " | ".join(tasks) + " | average | Δ vs lora_r8 [95% CI] | routing |",
        "|" + "---|" * (len(tasks) + 5),
    ]
    table = []
    order = [name for name, _ in rows(len(tasks))]
    for name in sorted(by_row, key=lambda n: order.index(n) if n in order else len(order)):
        runs = sorted(by_row[name], key=lambda record: record["seed"])
        diffs = [run["average"] - shared[run["seed"]] for run in runs if run["seed"] in shared]
        paired = "–"
        if name != "lora_r8" and len(diffs) >= 2:
            mean, half = statistics.mean(diffs), _t95(len(diffs)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
            paired = f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]"
        elif name != "lora_r8" and diffs:
            paired = f"{100 * diffs[0]:+.1f} (1 seed)"
        overviews = [run["routing_overview"] for run in runs if run.get("routing_overview")]
        separations = [value for value in (separation(run.get("routing") or {}) for run in runs) if value is not None]
        routing = "–"
        if separations:
            routing = f"separation {statistics.mean(separations):.2f}"
        if overviews:
            differing = statistics.mean(view["layers_differing"] for view in overviews)
            active = {task: statistics.mean(view["active"][task] for view in overviews) for task in tasks}
            routing += f"; tasks differ in {differing:.0f}/{overviews[0]['layers']} layers; active " + ", ".join(
                f"{task} {value:.1f}" for task, value in active.items()
            )
        per_task = [_cell([run["exact_match"][task] for run in runs]) for task in tasks]
        average = _cell([run["average"] for run in runs])
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(per_task) + f" | **{average}** | {paired} | {routing} |")
        table.append({"row": name, "runs": runs})
    markdown = "\n".join(lines) + "\n"
    (out / "table.md").write_text(markdown)
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    return markdown


def main(argv: list[str] | None = None) -> None:
    """Command line: ``run`` or ``assemble``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run", "assemble"])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--rows", nargs="*", help="only these rows")
    parser.add_argument("--seeds", nargs="*", type=int, help="seeds (default 0 1 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    parser.add_argument("--out", type=Path, help="results folder (default results/interference_<scale>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = input_source()
    suffix = "" if source == "bigbench" else f"_{source}"
    out = args.out or RESULTS / f"interference_{args.scale}{suffix}"
    if args.command == "run":
        run(args.scale, out, args.rows, tuple(args.seeds) if args.seeds else SEEDS)
    print(assemble(out))


if __name__ == "__main__":
    main()
