"""MoA on SmolLM2-135M-Instruct over BIG-bench generation domains, against LoRA baselines.

Runs (each writes ``<out>/<run>.json`` when it ends; a rerun skips runs whose JSON exists):

- ``base``: the base model, no adapter.
- ``lora_mixed``: one LoRA of rank r trained on the four domains mixed.
- ``oracle``: MoA's stage-1 experts (one LoRA per domain, trained in one run) with the true domain label.
- ``moa_router``: stage 2, the router picks each sequence's expert (top-1); router accuracy.
- ``moa_soft``: the same routers with the soft gate (softmax weights over all experts).
- ``moa_router_long``: stage 2 three times longer at a higher learning rate (36 steps, 1e-2).
- ``moa_added``: after a fifth domain is added with :func:`loramix.moa.add_domain`; old domains' scores
  before (``moa_router``) and after, the new domain's score, router accuracy over five domains.

Metric: exact match of the greedy answer (first line, lower-cased, trailing period dropped) with any
reference answer. Prompts are ``Q: {input}\\nA:``, answers `` {target}<eos>``, loss on answer tokens only.

Usage::

    python benchmarks/moa_bench.py              # full run (hours on 2 CPU cores)
    python benchmarks/moa_bench.py --quick --out /tmp/moa_quick   # tiny model and data, < 60 s
    python benchmarks/moa_bench.py --table      # benchmarks/results/moa_table.{md,json} from the JSONs

Suite form (issue 11): ``--pilot`` runs the base model and per-domain experts on every candidate domain
(:data:`CANDIDATES`) and keeps those fine-tuning lifts by >= 10 points; then one run per seed on the kept
domains, and ``--seeds-table`` aggregates mean ± sd over seeds::

    python benchmarks/moa_bench.py --scale cpu --pilot            # results/moa_cpu/pilot/pilot.md
    python benchmarks/moa_bench.py --scale cpu --seed 0 --domains A B C D --new-domain E   # seeds 0, 1, 2
    python benchmarks/moa_bench.py --seeds-table benchmarks/results/moa_cpu

``--scale cpu``: 200 train / 100 test examples per domain, the original steps; ``--scale cpu_long``: the
same with four times the steps of every stage (stage 1 then sees each training example about once);
``--scale gpu``: every block adapted, 1,000 / 200 examples per domain, ten times the steps, on cuda.

``--source wordnet`` (BIG-bench's files being no longer served by the package index): the candidates are
eight question-answer domains built from WordNet (``wordnet_tasks.GENERATION_CANDIDATES``: base forms,
plurals, antonyms, hypernyms, supersenses, parts of speech, synonyms, reverse dictionary; ``loramix assets
--wordnet``), results under ``results/moa_<scale>_wordnet``::

    python benchmarks/moa_bench.py --source wordnet --scale cpu --pilot
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import wordnet_tasks
from loramix import MixtureConfig, MixtureModel, get_mixture_model
from loramix.assets import bigbench_tasks_dir, cache_dir, smollm2_path, wordnet_dir
from loramix.moa import (
    StageSettings,
    add_domain,
    route_by,
    set_gate,
    train_adapters,
    train_experts,
    train_routers,
)
from loramix.model import mixture_config_file

RESULTS = Path(__file__).parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Full run: attention and MLP projections of the last 10 of SmolLM2's 30 blocks (the backward pass then
# stops at block 20, which is what makes the run fit the shared 2-core machine).
UPPER_BLOCKS = r"model\.layers\.(2[0-9])\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
# (domain name, BIG-bench task, subtasks or None for the task's own file)
DOMAINS = [
    ("arithmetic", "arithmetic", ["2_digit_addition", "2_digit_subtraction", "2_digit_multiplication"]),
    ("unscramble", "word_unscrambling", None),
    ("wikidata_qa", "qa_wikidata", None),
    ("elements", "periodic_elements", ["subtask_0", "subtask_1"]),
]
NEW_DOMAIN = ("counting", "object_counting", None)
ALL_BLOCKS = r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
#: Domains a pilot (``--pilot``) chooses from: (BIG-bench task, subtasks or None). Short answers only.
CANDIDATES: dict[str, tuple[str, list[str] | None]] = {
    "arithmetic": ("arithmetic", ["2_digit_addition", "2_digit_subtraction", "2_digit_multiplication"]),
    "unscramble": ("word_unscrambling", None),
    "wikidata_qa": ("qa_wikidata", None),
    "elements": ("periodic_elements", ["subtask_0", "subtask_1"]),
    "counting": ("object_counting", None),
    "unit_conversion": ("unit_conversion", None),
    "color": ("color", None),
    "linguistic_mappings": ("linguistic_mappings", None),
}
#: WordNet's question-answer domains (``--source wordnet``): (``"wordnet"``, [domain]).
CANDIDATES.update({name: ("wordnet", [name]) for name in wordnet_tasks.GENERATION_CANDIDATES})
PILOT_MARGIN = 0.10


def source_candidates(source: str) -> list[str]:
    """The candidate domains of a data source (``bigbench`` or ``wordnet``)."""
    return [name for name, (task, _) in CANDIDATES.items() if (task == "wordnet") == (source == "wordnet")]


def set_domains(names: Sequence[str], new: str | None) -> None:
    """Use these candidate domains (and this added domain) instead of the defaults."""
    global DOMAINS, NEW_DOMAIN
    unknown = [name for name in [*names, *([new] if new else [])] if name not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown domains {unknown}; candidates: {sorted(CANDIDATES)}")
    DOMAINS = [(name, *CANDIDATES[name]) for name in names]
    if new:
        NEW_DOMAIN = (new, *CANDIDATES[new])


RUN_ORDER = ["oracle", "moa_router", "moa_added", "lora_mixed", "base", "moa_soft", "moa_router_long"]
Item = tuple[str, list[str]]


@dataclass
class Bench:
    """Sizes of one benchmark run (the full defaults; ``--quick`` shrinks them)."""

    quick: bool = False
    train_per_domain: int = 120
    test_per_domain: int = 30
    max_length: int = 40
    max_new_tokens: int = 8
    rank: int = 8
    lora_alpha: float = 16.0
    targets: list[str] | str = UPPER_BLOCKS
    stage1: StageSettings = None  # type: ignore[assignment]
    stage2: StageSettings = None  # type: ignore[assignment]
    stage2_long: StageSettings = None  # type: ignore[assignment]
    new_expert: StageSettings = None  # type: ignore[assignment]
    new_routers: StageSettings = None  # type: ignore[assignment]
    replay_per_domain: int = 16
    eval_batch: int = 50
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        length = {"max_length": self.max_length, "seed": self.seed}
        self.stage1 = self.stage1 or StageSettings(steps=24, per_domain_batch=2, lr=4e-3, **length)
        self.stage2 = self.stage2 or StageSettings(steps=12, per_domain_batch=2, lr=3e-3, **length)
        self.stage2_long = self.stage2_long or StageSettings(steps=36, per_domain_batch=2, lr=1e-2, **length)
        self.new_expert = self.new_expert or StageSettings(steps=20, per_domain_batch=4, lr=4e-3, **length)
        self.new_routers = self.new_routers or StageSettings(steps=6, per_domain_batch=1, lr=3e-3, **length)


def scale_bench(scale: str, seed: int) -> Bench:
    """The sizes of ``--scale cpu`` (>= 100 test examples per domain) or ``--scale gpu`` (every block of
    SmolLM2 adapted, ten times the steps, 1,000 training and 200 test examples per domain, on cuda)."""
    if scale == "cpu":
        return Bench(train_per_domain=200, test_per_domain=100, seed=seed)
    if scale == "cpu_long":  # the cpu scale trained four times longer (stage 1: about one pass over its data)
        plain = Bench(seed=seed)
        longer = {
            stage: replace(getattr(plain, stage), steps=4 * getattr(plain, stage).steps)
            for stage in ("stage1", "stage2", "stage2_long", "new_expert", "new_routers")
        }
        return Bench(train_per_domain=200, test_per_domain=100, seed=seed, **longer)
    length = {"max_length": 64, "seed": seed}
    return Bench(
        train_per_domain=1000,
        test_per_domain=200,
        max_length=64,
        targets=ALL_BLOCKS,
        stage1=StageSettings(steps=400, per_domain_batch=8, lr=1e-3, **length),
        stage2=StageSettings(steps=100, per_domain_batch=8, lr=3e-3, **length),
        stage2_long=StageSettings(steps=300, per_domain_batch=8, lr=3e-3, **length),
        new_expert=StageSettings(steps=200, per_domain_batch=16, lr=1e-3, **length),
        new_routers=StageSettings(steps=60, per_domain_batch=4, lr=3e-3, **length),
        replay_per_domain=64,
        eval_batch=200,
        seed=seed,
        device="cuda",
    )


def quick_bench() -> Bench:
    """Tiny sizes for the test suite."""
    tiny = StageSettings(steps=2, per_domain_batch=1, lr=1e-2, max_length=24)
    return Bench(
        quick=True,
        train_per_domain=4,
        test_per_domain=2,
        max_length=24,
        max_new_tokens=3,
        rank=2,
        targets=TARGETS,
        stage1=tiny,
        stage2=tiny,
        stage2_long=tiny,
        new_expert=tiny,
        new_routers=tiny,
        replay_per_domain=2,
        eval_batch=8,
    )


# ---------------------------------------------------------------------------------------------- data
def load_items(task: str, subtasks: Sequence[str] | None) -> list[Item]:
    """(input, reference answers) of a BIG-bench task; multiple-choice items keep their best choice.
    ``task == "wordnet"``: the WordNet domain ``subtasks[0]``."""
    if task == "wordnet":
        return [(question, list(answers)) for question, answers in _wordnet_domains()[subtasks[0]]]
    root = bigbench_tasks_dir() / task
    if subtasks is None:  # a task split into subtasks keeps its examples in them
        subtasks = sorted(path.parent.name for path in root.glob("*/task.json")) or None
    files = [root / sub / "task.json" for sub in subtasks] if subtasks else [root / "task.json"]
    items: list[Item] = []
    for file in files:
        for example in json.loads(file.read_text()).get("examples", []):
            target = example.get("target")
            if target is None:
                scores = example["target_scores"]
                target = max(scores, key=scores.get)
            answers = [target] if isinstance(target, str) else list(target)
            if answers and all(answer.strip() for answer in answers):
                items.append((example["input"].strip(), [answer.strip() for answer in answers]))
    return items


@functools.cache
def _wordnet_domains() -> dict[str, list[tuple[str, list[str]]]]:
    return wordnet_tasks.generation_domains(wordnet_dir())


def prompt_of(text: str) -> str:
    """The prompt of one input."""
    return f"Q: {text}\nA:"


def tokenize(tokenizer: Any, item: Item) -> dict[str, list[int]]:
    """``input_ids`` (prompt + first answer + eos) and ``labels`` (-100 on the prompt)."""
    prompt = tokenizer(prompt_of(item[0]), add_special_tokens=False)["input_ids"]
    answer = tokenizer(" " + item[1][0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def split_domain(name: str, items: list[Item], tokenizer: Any, bench: Bench) -> tuple[list, list[Item]]:
    """Seeded train/test split of the items whose tokenized example fits ``max_length``."""
    order = list(items)
    random.Random(f"moa-bench/{name}/{bench.seed}").shuffle(order)
    wanted = bench.test_per_domain + bench.train_per_domain
    fitting: list[Item] = []
    for item in order:
        if len(fitting) == wanted:
            break
        if len(tokenize(tokenizer, item)["input_ids"]) <= bench.max_length:
            fitting.append(item)
    test = fitting[: bench.test_per_domain]
    train = fitting[bench.test_per_domain : bench.test_per_domain + bench.train_per_domain]
    return [tokenize(tokenizer, item) for item in train], test


# ---------------------------------------------------------------------------------------------- model
def load_base(bench: Bench, tokenizer: Any) -> torch.nn.Module:
    """SmolLM2-135M-Instruct, or a tiny random Llama with the same tokenizer for ``--quick``."""
    if bench.quick:
        torch.manual_seed(bench.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return LlamaForCausalLM(config).eval()
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    return model.to(bench.device if bench.device != "cuda" or torch.cuda.is_available() else "cpu")


def mixture(bench: Bench, tokenizer: Any, method: str, num_domains: int) -> MixtureModel:
    """A fresh mixture on a fresh base model."""
    config = MixtureConfig(
        method=method,
        target_modules=bench.targets,
        r=bench.rank,
        lora_alpha=bench.lora_alpha,
        num_experts=1 if method == "lora" else num_domains,
        num_tasks=num_domains,
    )
    return get_mixture_model(load_base(bench, tokenizer), config)


def left_padded(tokenizer: Any, items: Sequence[Item]) -> dict[str, torch.Tensor]:
    """Prompts left-padded to one length: ``input_ids`` and ``attention_mask``, LongTensor[batch, seq]."""
    prompts = [tokenizer(prompt_of(text), add_special_tokens=False)["input_ids"] for text, _ in items]
    length = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def normalize(text: str) -> str:
    """First line, lower-cased, single-spaced, without a trailing period."""
    line = text.strip().split("\n")[0].strip().lower()
    return " ".join(line.split()).rstrip(".")


@torch.no_grad()
def exact_match(
    model: torch.nn.Module, tokenizer: Any, tests: list[list[Item]], bench: Bench, use_labels: bool = False
) -> list[float]:
    """Greedy exact match per domain (domain i = ``tests[i]``); ``use_labels`` passes the domain ids."""
    scores = []
    for domain, items in enumerate(tests):
        correct = 0
        for start in range(0, len(items), bench.eval_batch):
            chunk = items[start : start + bench.eval_batch]
            device = next(model.parameters()).device
            inputs = {key: value.to(device) for key, value in left_padded(tokenizer, chunk).items()}
            if use_labels:
                inputs["task_ids"] = torch.full((len(chunk),), domain, dtype=torch.long, device=device)
            generated = model.generate(
                **inputs,
                max_new_tokens=bench.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for text, (_, answers) in zip(texts, chunk, strict=True):
                correct += normalize(text) in {normalize(answer) for answer in answers}
        scores.append(correct / len(items))
    return scores


@torch.no_grad()
def router_stats(model: MixtureModel, tokenizer: Any, tests: list[list[Item]], bench: Bench) -> dict[str, Any]:
    """Router accuracy on the test prompts: per layer, mean/min over layers, and the layers' majority vote."""
    hits: dict[str, int] = {}
    votes_correct = 0
    total = 0
    for domain, items in enumerate(tests):
        for start in range(0, len(items), bench.eval_batch):
            chunk = items[start : start + bench.eval_batch]
            device = next(model.parameters()).device
            labels = torch.full((len(chunk),), domain, dtype=torch.long, device=device)
            model(**{key: value.to(device) for key, value in left_padded(tokenizer, chunk).items()}, task_ids=labels)
            chosen = torch.stack([record["experts"] for record in model.last_records.values()])
            for name, record in model.last_records.items():
                hits[name] = hits.get(name, 0) + int((record["experts"] == labels).sum())
            votes_correct += int((chosen.mode(dim=0).values == labels).sum())
            total += len(chunk)
    per_layer = {name: count / total for name, count in hits.items()}
    return {
        "mean_layer_accuracy": sum(per_layer.values()) / len(per_layer),
        "min_layer_accuracy": min(per_layer.values()),
        "vote_accuracy": votes_correct / total,
        "per_layer": per_layer,
    }


# ---------------------------------------------------------------------------------------------- runs
class Runner:
    """Builds the data once, trains what a run needs (caching adapters), writes one JSON per run."""

    def __init__(self, bench: Bench, out: Path, adapters: Path) -> None:
        self.bench = bench
        self.out = out
        self.adapters = adapters
        path = str(smollm2_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.names = [name for name, _, _ in DOMAINS]
        self.n = len(DOMAINS)
        self.train: list[list] = []
        self.test: list[list[Item]] = []
        for name, task, subtasks in [*DOMAINS, NEW_DOMAIN]:
            train, test = split_domain(name, load_items(task, subtasks), self.tokenizer, bench)
            self.train.append(train)
            self.test.append(test)
        self.logs: dict[str, list[float]] = {}

    def _settings(self, settings: StageSettings) -> StageSettings:
        return replace(settings, pad_token_id=self.tokenizer.pad_token_id)

    def _log(self, tag: str) -> Callable[[int, dict[str, float]], None]:
        def log(step: int, metrics: dict[str, float]) -> None:
            self.logs.setdefault(tag, []).append(round(sum(metrics.values()), 4))
            print(f"[{tag}] step {step} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)

        return log

    def _cached(self, tag: str, build: Callable[[], MixtureModel]) -> MixtureModel:
        directory = self.adapters / tag
        if (directory / "adapter_model.safetensors").is_file():
            config = json.loads(mixture_config_file(directory).read_text())
            model = MixtureModel.from_pretrained(load_base(self.bench, self.tokenizer), directory)
            print(f"[{tag}] loaded {directory} ({config['method']})", flush=True)
            return model
        start = time.time()
        model = build()
        model.eval()
        model.save_pretrained(directory)
        (directory / "train.json").write_text(json.dumps({"seconds": time.time() - start, "loss": self.logs}))
        return model

    def _train_seconds(self, tag: str) -> float | None:
        path = self.adapters / tag / "train.json"
        return json.loads(path.read_text())["seconds"] if path.is_file() else None

    def lora_mixed(self) -> MixtureModel:
        def build() -> MixtureModel:
            model = mixture(self.bench, self.tokenizer, "lora", self.n)
            domains = dict(enumerate(self.train[: self.n]))
            train_adapters(model, domains, self._settings(self.bench.stage1), self._log("lora_mixed"))
            return model

        return self._cached("lora_mixed", build)

    def stage1(self) -> MixtureModel:
        def build() -> MixtureModel:
            model = mixture(self.bench, self.tokenizer, "moa", self.n)
            domains = dict(enumerate(self.train[: self.n]))
            train_experts(model, domains, self._settings(self.bench.stage1), self._log("stage1"))
            return model

        return self._cached("stage1", build)

    def stage2(self, tag: str = "stage2") -> MixtureModel:
        settings = self.bench.stage2_long if tag == "stage2_long" else self.bench.stage2

        def build() -> MixtureModel:
            model = self.stage1()
            model.requires_grad_(False)
            train_routers(model, dict(enumerate(self.train[: self.n])), self._settings(settings), self._log(tag))
            return model

        return self._cached(tag, build)

    def added(self) -> MixtureModel:
        def build() -> MixtureModel:
            model = self.stage2()
            replay = {d: self.train[d][: self.bench.replay_per_domain] for d in range(self.n)}
            add_domain(
                model,
                self.train[self.n],
                replay,
                self._settings(self.bench.new_expert),
                self._settings(self.bench.new_routers),
                log=self._log("added"),
            )
            return model

        return self._cached("added", build)

    def run(self, name: str) -> dict[str, Any]:
        """Compute one run's result."""
        tests, names = self.test[: self.n], self.names
        result: dict[str, Any] = {"domains": names}
        start = time.time()
        if name == "base":
            model = load_base(self.bench, self.tokenizer)
            result["exact_match"] = exact_match(model, self.tokenizer, self.test, self.bench)
            result["domains"] = [*names, NEW_DOMAIN[0]]
        elif name == "lora_mixed":
            result["exact_match"] = exact_match(self.lora_mixed(), self.tokenizer, tests, self.bench)
            result["train_seconds"] = self._train_seconds("lora_mixed")
        elif name == "oracle":
            model = self.stage1()
            with route_by(model, "label"):
                result["exact_match"] = exact_match(model, self.tokenizer, tests, self.bench, use_labels=True)
            result["train_seconds"] = self._train_seconds("stage1")
        elif name in ("moa_router", "moa_soft", "moa_router_long"):
            model = self.stage2("stage2_long" if name == "moa_router_long" else "stage2")
            if name == "moa_soft":
                set_gate(model, "soft")
            result["exact_match"] = exact_match(model, self.tokenizer, tests, self.bench)
            result["router"] = router_stats(model, self.tokenizer, tests, self.bench)
            result["train_seconds"] = self._train_seconds("stage2_long" if name == "moa_router_long" else "stage2")
        elif name == "moa_added":
            model = self.added()
            result["domains"] = [*names, NEW_DOMAIN[0]]
            result["exact_match"] = exact_match(model, self.tokenizer, self.test, self.bench)
            result["router"] = router_stats(model, self.tokenizer, self.test, self.bench)
            with route_by(model, "label"):
                result["exact_match_with_label"] = exact_match(
                    model, self.tokenizer, self.test, self.bench, use_labels=True
                )
            result["train_seconds"] = self._train_seconds("added")
        else:
            raise ValueError(f"unknown run {name!r}; runs: {RUN_ORDER}")
        result["eval_seconds"] = time.time() - start
        result["settings"] = asdict(self.bench)
        return result


def run_all(bench: Bench, out: Path, adapters: Path, runs: Sequence[str]) -> None:
    """Run every run in ``runs`` whose JSON is not yet in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [name for name in runs if not (out / f"{name}.json").is_file()]
    if not todo:
        return
    runner = Runner(bench, out, adapters)
    for name in todo:
        if (out / f"{name}.json").is_file():  # written meanwhile by another process
            continue
        print(f"=== {name}", flush=True)
        result = runner.run(name)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"=== {name}: {result['exact_match']}", flush=True)


# ---------------------------------------------------------------------------------------------- table
def sizes_note(settings: dict[str, Any]) -> str:
    """One paragraph saying how big the runs were."""
    steps = {key: settings[key]["steps"] for key in ("stage1", "stage2", "new_expert", "new_routers")}
    return (
        f"{settings['train_per_domain']} train / {settings['test_per_domain']} test examples per domain "
        f"(seeded splits), rows of {settings['max_length']} tokens, greedy decoding of "
        f"{settings['max_new_tokens']} tokens; r = {settings['rank']}, alpha = {settings['lora_alpha']}, targets "
        f"`{settings['targets']}`. Steps (rows per domain per step): stage 1 and mixed LoRA {steps['stage1']} "
        f"({settings['stage1']['per_domain_batch']}), stage 2 {steps['stage2']}, new expert {steps['new_expert']} "
        f"({settings['new_expert']['per_domain_batch']}), new routers {steps['new_routers']} with "
        f"{settings['replay_per_domain']} replay examples per old domain. Router accuracy on the test prompts: "
        "majority vote of the layers' routers / mean over layers."
    )


def table(out: Path, command: str) -> str:
    """Markdown table of the runs in ``out``; also writes ``moa_table.md`` and ``moa_table.json`` next to it."""
    paths = {name: out / f"{name}.json" for name in RUN_ORDER}
    results = {name: json.loads(path.read_text()) for name, path in paths.items() if path.is_file()}
    names = [name for name, _, _ in DOMAINS] + [NEW_DOMAIN[0]]
    rows = [
        "| run | " + " | ".join(names) + f" | mean ({len(DOMAINS)} old) | router acc. (vote / mean layer) | train s |"
    ]
    rows.append("|" + "---|" * (len(names) + 4))
    for run, result in results.items():
        scores = dict(zip(result["domains"], result["exact_match"], strict=True))
        cells = [f"{100 * scores[name]:.0f}" if name in scores else "–" for name in names]
        old = [scores[name] for name in names[: len(DOMAINS)]]
        router = result.get("router")
        router_cell = "–"
        if router:
            router_cell = f"{100 * router['vote_accuracy']:.0f} / {100 * router['mean_layer_accuracy']:.0f}"
        seconds = result.get("train_seconds")
        rows.append(
            f"| {run} | "
            + " | ".join(cells)
            + f" | {100 * sum(old) / len(old):.1f} | {router_cell} | "
            + (f"{seconds:.0f}" if seconds else "–")
            + " |"
        )
        if "exact_match_with_label" in result:
            label = dict(zip(result["domains"], result["exact_match_with_label"], strict=True))
            cells = [f"{100 * label[name]:.0f}" for name in names]
            old = [label[name] for name in names[: len(DOMAINS)]]
            rows.append(f"| {run} (label) | " + " | ".join(cells) + f" | {100 * sum(old) / len(old):.1f} | – | – |")
    markdown = "\n".join(rows)
    text = f"# MoA benchmark (exact match, %)\n\nCommand: `{command}`\n\n{markdown}\n"
    if results:
        text += "\n" + sizes_note(results.get("moa_added", next(iter(results.values())))["settings"]) + "\n"
    target = out.parent if out.name == "moa" else out
    target.mkdir(parents=True, exist_ok=True)
    (target / "moa_table.md").write_text(text)
    (target / "moa_table.json").write_text(json.dumps({"command": command, "runs": results}, indent=2) + "\n")
    return text


def pilot(bench: Bench, out: Path, adapters: Path, source: str = "bigbench") -> str:
    """Base model and per-domain experts (oracle) on every candidate domain; keep those lifted by >= 10 points.

    Writes ``out/pilot.md`` and ``out/pilot.json`` (with the kept domains) and returns the Markdown.
    """
    set_domains(source_candidates(source), None)
    global NEW_DOMAIN
    NEW_DOMAIN = DOMAINS[-1]  # the runner reads one more domain; unused by base/oracle on the candidates
    run_all(bench, out, adapters, ["base", "oracle"])
    base = json.loads((out / "base.json").read_text())
    oracle = json.loads((out / "oracle.json").read_text())
    base_scores = dict(zip(base["domains"], base["exact_match"], strict=False))
    oracle_scores = dict(zip(oracle["domains"], oracle["exact_match"], strict=True))
    lines = ["| domain | base | oracle (per-domain LoRA) | lift | kept |", "|---|---|---|---|---|"]
    kept = []
    for name, score in oracle_scores.items():
        lift = score - base_scores[name]
        kept += [name] if lift >= PILOT_MARGIN else []
        lines.append(
            f"| {name} | {100 * base_scores[name]:.0f} | {100 * score:.0f} | {100 * lift:+.0f} | "
            f"{'yes' if lift >= PILOT_MARGIN else 'no'} |"
        )
    markdown = "\n".join(lines) + f"\n\nKept (lift >= {100 * PILOT_MARGIN:.0f} points): {kept}\n"
    (out / "pilot.md").write_text(markdown)
    (out / "pilot.json").write_text(json.dumps({"kept": kept, "base": base_scores, "oracle": oracle_scores}) + "\n")
    return markdown


#: Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def _paired(diffs: list[float]) -> str:
    """Mean of paired differences (points) with its 95% t interval, and the differences themselves."""
    if len(diffs) < 2:
        return f"{100 * diffs[0]:+.1f} (1 seed)" if diffs else "–"
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = T95.get(len(diffs) - 1, 1.96) * sd / len(diffs) ** 0.5
    each = ", ".join(f"{100 * diff:+.1f}" for diff in diffs)
    return f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}] ({each})"


def seeds_table(root: Path) -> str:
    """Mean ± sd over the ``seed*`` folders of ``root`` of every run's exact match per domain and on average
    over the old domains, and that average's paired difference (by seed, 95% t interval) to the mixed LoRA
    and to the oracle; ``moa_added (label)`` is the grown model routed by the true label. Writes
    ``root/moa_seeds_table.md``."""
    results: dict[str, dict[int, dict[str, float]]] = {}
    names: list[str] = []
    old: list[str] = []
    for folder in sorted(path for path in root.glob("seed*") if path.is_dir() and path.name[4:].isdigit()):
        seed = int(folder.name[4:])
        for name in RUN_ORDER:
            path = folder / f"{name}.json"
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            scores = {"": dict(zip(record["domains"], record["exact_match"], strict=True))}
            if "exact_match_with_label" in record:
                scores[" (label)"] = dict(zip(record["domains"], record["exact_match_with_label"], strict=True))
            for suffix, by_domain in scores.items():
                results.setdefault(name + suffix, {})[seed] = by_domain
            names += [domain for domain in record["domains"] if domain not in names]
            if name == "oracle":
                old = list(record["domains"])
    if not results:
        return "no runs yet\n"
    old = old or names

    def average(by_domain: dict[str, float]) -> float:
        return statistics.mean(by_domain[name] for name in old)

    def versus(run: str, reference: str) -> str:
        common = sorted(set(results[run]) & set(results.get(reference, {})))
        return _paired([average(results[run][s]) - average(results[reference][s]) for s in common])

    header = ["run", "seeds", *names, f"mean ({len(old)} old)", "Δ vs lora_mixed [95% CI] (by seed)", "Δ vs oracle"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, by_seed in results.items():
        cells = []
        for name in [*names, None]:
            values = [average(scores) if name is None else scores.get(name) for scores in by_seed.values()]
            values = [value for value in values if value is not None]
            if not values:
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{100 * values[0]:.1f}")
            else:
                cells.append(f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}")
        paired = [versus(run, ref) if run != ref and run != "base" else "–" for ref in ("lora_mixed", "oracle")]
        lines.append(f"| {run} | {len(by_seed)} | " + " | ".join([*cells, *paired]) + " |")
    votes = [
        json.loads(path.read_text())["router"]["vote_accuracy"] for path in sorted(root.glob("seed*/moa_router.json"))
    ]
    if votes:
        lines += [
            "",
            f"Router accuracy (vote of the layers) of moa_router over seeds: {[round(100 * v) for v in votes]}",
        ]
    markdown = "\n".join(lines) + "\n"
    (root / "moa_seeds_table.md").write_text(markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and data (for tests)")
    parser.add_argument("--table", action="store_true", help="only write the table from existing JSONs")
    parser.add_argument(
        "--scale", choices=["cpu", "cpu_long", "gpu"], help="preset sizes (default: the original small run)"
    )
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--domains", nargs="*", help=f"old domains, from {sorted(CANDIDATES)}")
    parser.add_argument("--new-domain", help="the domain added to the trained MoA")
    parser.add_argument("--pilot", action="store_true", help="base and oracle on every candidate domain")
    parser.add_argument("--source", choices=["bigbench", "wordnet"], default="bigbench", help="the pilot's candidates")
    parser.add_argument("--seeds-table", type=Path, help="only aggregate the seed*/ folders of this directory")
    parser.add_argument("--out", type=Path, help="folder of the per-run JSONs")
    parser.add_argument("--runs", nargs="*", default=RUN_ORDER, choices=RUN_ORDER)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.seeds_table:
        print(seeds_table(args.seeds_table))
        return
    if args.source == "wordnet" and not args.domains and not args.pilot:  # four old domains and one added
        names = source_candidates("wordnet")
        set_domains(names[:4], args.new_domain or names[4])
    elif args.domains or args.new_domain:
        set_domains(args.domains or [name for name, _, _ in DOMAINS], args.new_domain)
    command = "python benchmarks/moa_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.quick:
        bench = quick_bench()
    elif args.scale:
        bench = scale_bench(args.scale, args.seed)
    else:
        bench = Bench(seed=args.seed)
    tag = (f"moa_{args.scale}" if args.scale else "moa") + ("_wordnet" if args.source == "wordnet" else "")
    out = args.out or (RESULTS / tag / f"seed{args.seed}" if args.scale else RESULTS / tag)
    adapters = cache_dir() / f"{tag}_bench" / f"seed{args.seed}"
    if args.quick:
        adapters = out / "adapters"
    elif not args.scale and args.seed == 0 and args.source == "bigbench":
        adapters = cache_dir() / "moa_bench"  # where the committed table's adapters were cached
    if args.pilot:
        folder = args.out or (out.parent if args.scale else out) / "pilot"  # beside the seed folders
        print(pilot(bench, folder, adapters / "pilot", args.source))
        return
    if not args.table:
        run_all(bench, out, adapters, args.runs)
    print(table(out, command))


if __name__ == "__main__":
    main()
