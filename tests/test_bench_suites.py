"""The benchmark suites' bookkeeping: the lr sweep's order and stopping rule, and the tables' statistics."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their sibling modules
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def mtl(monkeypatch):
    return _load("mtl_bench", monkeypatch)


def test_sweep_runs_the_middle_first_and_extends_only_past_a_winning_edge(mtl):
    row = mtl.Row("lora", "lora", lr_grid=(5e-4, 1e-3, 2e-3))
    assert mtl.sweep_order(row.lr_grid) == [1e-3, 2e-3, 5e-4]
    assert mtl.next_lr(row, {}) == 1e-3
    assert mtl.next_lr(row, {1e-3: 0.7}) == 2e-3
    assert mtl.next_lr(row, {1e-3: 0.7, 2e-3: 0.6}) == 5e-4
    assert mtl.next_lr(row, {1e-3: 0.7, 2e-3: 0.6, 5e-4: 0.65}) is None  # best inside the grid
    assert mtl.next_lr(row, {1e-3: 0.7, 2e-3: 0.8, 5e-4: 0.65}) == 4e-3  # best at the top edge
    assert mtl.next_lr(row, {1e-3: 0.7, 2e-3: 0.6, 5e-4: 0.75}) == 2.5e-4  # best at the bottom edge
    assert mtl.next_lr(row, {1e-3: 0.7, 2e-3: 0.8, 5e-4: 0.65, 4e-3: 0.9}) == 8e-3
    # two extensions at most
    assert mtl.next_lr(row, {1e-3: 0.7, 2e-3: 0.8, 5e-4: 0.65, 4e-3: 0.9, 8e-3: 0.95}) is None


def _record(row: str, lr: float, seed: int, val: float, tests: dict[str, float]) -> dict:
    return {
        "row": row,
        "lr": lr,
        "seed": seed,
        "trainable_params": 100,
        "train_time_s": 1.0,
        "scores": {task: {"val": val, "test": value} for task, value in tests.items()},
        "val_average": val,
        "test_average": statistics.mean(tests.values()),
        "chosen_ranks": None,
    }


def test_table_selects_lr_on_validation_and_pairs_seeds_with_lora(mtl, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    records = [
        # lora: lr 1e-3 wins on validation although lr 2e-3 has the better test score
        _record("lora", 1e-3, 0, 0.70, {"a": 0.60, "b": 0.80}),
        _record("lora", 2e-3, 0, 0.60, {"a": 0.90, "b": 0.90}),
        _record("lora", 1e-3, 1, 0.70, {"a": 0.62, "b": 0.82}),
        _record("lora", 1e-3, 2, 0.70, {"a": 0.58, "b": 0.78}),
        _record("moelora_4x2", 1e-3, 0, 0.72, {"a": 0.70, "b": 0.80}),
        _record("moelora_4x2", 1e-3, 1, 0.72, {"a": 0.66, "b": 0.86}),
        _record("moelora_4x2", 1e-3, 2, 0.72, {"a": 0.64, "b": 0.80}),
    ]
    for record in records:
        path = mtl.run_path(tmp_path, record["row"], record["lr"], record["seed"])
        path.write_text(json.dumps(record))
    markdown = mtl.assemble(tmp_path)
    table = {row["row"]: row for row in json.loads((tmp_path / "table.json").read_text())}
    assert table["lora"]["lr"] == 1e-3 and table["lora"]["seeds"] == [0, 1, 2]
    assert table["lora"]["sweep_val"] == {"0.001": 70.0, "0.002": 60.0}
    assert table["lora"]["test_average"] == pytest.approx([0.70, 0.72, 0.68])
    diffs = [0.75 - 0.70, 0.76 - 0.72, 0.72 - 0.68]
    mean, low, high, count = table["moelora_4x2"]["paired_vs_lora"]
    half = 4.303 * statistics.stdev(diffs) / 3**0.5
    assert (mean, low, high, count) == pytest.approx((statistics.mean(diffs), mean - half, mean + half, 3))
    assert "| lora | 0.001 (0.001: 70.0, 0.002: 60.0) | 3 |" in markdown
    assert "**70.0 ± 2.0**" in markdown


def test_interference_table_pairs_seeds_and_summarises_routing(monkeypatch, tmp_path):
    bench = _load("interference_bench", monkeypatch)
    runs = tmp_path / "runs"
    runs.mkdir()
    overview = {"layers": 4, "layers_differing": 4, "active": {"first_word": 1.0, "last_word": 1.0}}
    for seed, (shared, routed) in enumerate([(0.5, 0.9), (0.4, 0.95), (0.55, 0.9)]):
        for row, score, view in (("lora_r8", shared, None), ("per_task_lora_r4", routed, overview)):
            record = {
                "row": row,
                "seed": seed,
                "exact_match": {"first_word": score, "last_word": score},
                "average": score,
                "routing_overview": view,
            }
            (runs / f"{row}__seed{seed}.json").write_text(json.dumps(record))
    markdown = bench.assemble(tmp_path)
    line = next(line for line in markdown.splitlines() if line.startswith("| per_task_lora_r4"))
    diffs = [0.4, 0.55, 0.35]
    half = 4.303 * statistics.stdev(diffs) / 3**0.5
    mean = statistics.mean(diffs)
    assert f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]" in line
    assert "tasks differ in 4/4 layers" in line


def test_alone_pilot_trains_each_task_by_itself_and_keeps_an_eight_point_lead(mtl, tmp_path, monkeypatch):
    # validation accuracy per (row, lr, task); the LoRA keeps its better lr per task
    val = {
        ("heads_only", 1e-2): {"a": 0.50, "b": 0.60, "c": 0.70},
        ("lora", 5e-4): {"a": 0.55, "b": 0.70, "c": 0.72},
        ("lora", 2e-3): {"a": 0.62, "b": 0.65, "c": 0.60},
    }
    tasks = [mtl.Task(name, ["x", "y"], {"train": [([1], 0)] * 3, "val": [([1], 0)] * 2}) for name in "abc"]
    calls = []

    def fake_run(row, lr, seed, group, scale, splits):
        calls.append((row.name, lr, [task.name for task in group], scale.steps, splits))
        scores = {task.name: {"val": val[(row.name, lr)][task.name]} for task in group}
        return {
            "row": row.name,
            "lr": lr,
            "scores": scores,
            "val_average": 0.0,
            "test_average": None,
            "trainable_params": 1,
            "train_time_s": 0.0,
        }

    monkeypatch.setattr(mtl, "load_tasks", lambda names, scale, tokenizer, source="bigbench": tasks)
    monkeypatch.setattr(mtl, "train_run", fake_run)
    mtl.pilot(mtl.SCALES["cpu"], tmp_path, None, None, alone=True)
    assert {tuple(names) for _, _, names, _, _ in calls} == {("a",), ("b",), ("c",)}  # one task per run
    assert {steps for *_, steps, _ in calls} == {mtl.ALONE_STEPS} and all(s == ("val",) for *_, s in calls)
    assert len(calls) == 9  # heads only + two LoRA lrs per task
    # a: 62 vs 50 (+12, lr 2e-3 wins) kept; b: 70 vs 60 (+10) kept; c: 72 vs 70 (+2) dropped
    assert json.loads((tmp_path / "suite.json").read_text())["tasks"] == ["a", "b"]
    assert "| a | 3 | 2 | 50.0 | 62.0 | +12.0 | yes |" in (tmp_path / "pilot_alone" / "pilot.md").read_text()
    calls.clear()
    mtl.pilot(mtl.SCALES["cpu"], tmp_path, None, None, alone=True)
    assert calls == []  # a rerun reads the finished runs

    # Processes share a pilot by candidates (``only``); they write no table, a last call without it does.
    (tmp_path / "suite.json").unlink()
    shared = tmp_path / "shared"
    mtl.pilot(mtl.SCALES["cpu"], shared, None, None, alone=True, only=["a", "c"])
    assert {tuple(names) for _, _, names, _, _ in calls} == {("a",), ("c",)} and len(calls) == 6
    assert not (shared / "suite.json").exists()
    mtl.pilot(mtl.SCALES["cpu"], shared, None, None, alone=True, only=["b"])
    calls.clear()
    mtl.pilot(mtl.SCALES["cpu"], shared, None, None, alone=True, source="wordnet")
    assert calls == []
    assert json.loads((shared / "suite.json").read_text())["source"] == "wordnet"
    assert json.loads((shared / "suite.json").read_text())["tasks"] == ["a", "b"]


WNDB_HEAD = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
LEXNAMES = "03\tnoun.Tops\t1\n05\tnoun.animal\t1\n29\tverb.body\t2\n00\tadj.all\t3\n"
DATA_NOUN = (
    "00000010 05 n 02 big_cat 0 Panthera_leo 0 002 @ 00000020 n 0000 ! 00000030 n 0102 | a large cat; "
    '"the lion roared at the big cat"; "ok"  \n'
    "00000020 03 n 01 cat 0 000 | a small animal  \n"
    "00000030 05 n 01 dog 0 000 | a loyal animal  \n"
)
DATA_VERB = '00000040 29 v 01 purr 0 000 02 + 02 00 + 08 00 | make a low sound; "the cat purrs"  \n'
DATA_ADJ = "00000050 00 s 01 large(a) 0 000 | above average in size  \n"


def test_wordnet_reader_parses_the_database_format(monkeypatch, tmp_path):
    wordnet = _load("wordnet_tasks", monkeypatch)
    (tmp_path / "lexnames").write_text(LEXNAMES)
    for name, text in {"noun": DATA_NOUN, "verb": DATA_VERB, "adj": DATA_ADJ, "adv": ""}.items():
        (tmp_path / f"data.{name}").write_text(WNDB_HEAD + text)
    synsets = {synset.key: synset for synset in wordnet.read_synsets(tmp_path)}
    assert sorted(synsets) == [("a", 50), ("n", 10), ("n", 20), ("n", 30), ("v", 40)]
    lion = synsets[("n", 10)]
    assert lion.lexname == "noun.animal" and lion.lemmas == ("big cat", "Panthera leo")
    assert lion.definition == "a large cat" and lion.examples == ("the lion roared at the big cat",)  # "ok" too short
    assert lion.pointers == (("@", ("n", 20), 0, 0), ("!", ("n", 30), 1, 2))
    purr = synsets[("v", 40)]
    assert purr.lexname == "verb.body" and purr.frames == frozenset({2, 8}) and purr.examples == ("the cat purrs",)
    assert synsets[("a", 50)].lemmas == ("large",)  # the adjective marker (a) is dropped
    assert wordnet._mentions("the big cat sat", "big cat") and not wordnet._mentions("bigger cats", "big cat")


def _wordnet_root() -> Path:
    from loramix.assets import AssetError, wordnet_dir

    try:
        return wordnet_dir()
    except AssetError:
        pytest.skip("WordNet is not in the loramix cache (loramix assets --wordnet)")


def test_wordnet_tasks_are_balanced_large_enough_and_fixed(monkeypatch):
    wordnet_dir = _wordnet_root
    wordnet = _load("wordnet_tasks", monkeypatch)
    tasks = wordnet.build_tasks(wordnet_dir())
    assert list(tasks) == list(wordnet.CANDIDATES)
    for name, (labels, examples) in tasks.items():
        counts = [sum(label == index for _, label in examples) for index in range(len(labels))]
        assert len(set(counts)) == 1, name  # balanced
        assert len(examples) >= 1000 + 150 + 300, name  # the cpu scale's train + validation + test
        assert len({text for text, _ in examples}) == len(examples), name  # no text twice
    assert wordnet.build_tasks(wordnet_dir())["pos_in_context"][1][:20] == tasks["pos_in_context"][1][:20]


def test_wordnet_generation_domains_are_large_enough_and_answerable(monkeypatch):
    root = _wordnet_root()
    wordnet = _load("wordnet_tasks", monkeypatch)
    domains = wordnet.generation_domains(root)
    assert list(domains) == list(wordnet.GENERATION_CANDIDATES)
    for name, items in domains.items():
        assert len(items) >= 1000 + 200, name  # the gpu scale's train + test per domain
        assert all(question.strip() and answers and all(a.strip() for a in answers) for question, answers in items)
        assert len({question for question, _ in items}) == len(items), name  # one item per question
    assert ("What is the plural of 'goose'?", ["geese"]) in domains["plural"]
    assert ("What is the base form of the word 'geese'?", ["goose"]) in domains["lemma"]
    supersenses = {answers[0] for _, answers in domains["supersense"]}
    assert len(supersenses) == 25 and "animal" in supersenses  # WordNet's 26 noun files but noun.Tops


def test_moa_seeds_table_averages_old_domains_and_pairs_seeds(monkeypatch, tmp_path):
    bench = _load("moa_bench", monkeypatch)
    old = {"oracle": [(0.4, 0.2), (0.3, 0.1), (0.5, 0.3)], "lora_mixed": [(0.2, 0.2), (0.2, 0.1), (0.3, 0.2)]}
    for seed in range(3):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        for run, scores in old.items():
            record = {"domains": ["a", "b"], "exact_match": list(scores[seed])}
            (folder / f"{run}.json").write_text(json.dumps(record))
        added = {
            "domains": ["a", "b", "new"],
            "exact_match": [0.1, 0.1, 0.5],
            "exact_match_with_label": [*old["oracle"][seed], 0.6],
        }
        (folder / "moa_added.json").write_text(json.dumps(added))
    (tmp_path / "seeds.log").write_text("not a seed folder")
    markdown = bench.seeds_table(tmp_path)
    rows = {line.split(" | ")[0][2:]: line for line in markdown.splitlines() if line.startswith("| ")}
    # oracle - mixed, mean of the two old domains by seed: +0.1, +0.05, +0.15
    diffs = [0.1, 0.05, 0.15]
    half = 4.303 * statistics.stdev(diffs) / 3**0.5
    assert f"+10.0 [{100 * (0.1 - half):+.1f}, {100 * (0.1 + half):+.1f}] (+10.0, +5.0, +15.0)" in rows["oracle"]
    assert "| 30.0 ± 10.0 |" in rows["oracle"]  # the old-domain mean over seeds: 0.3, 0.2, 0.4
    assert rows["moa_added (label)"].endswith("+0.0 [+0.0, +0.0] (+0.0, +0.0, +0.0) |")  # equal to the oracle
    assert "| 60.0 ± 0.0 |" in rows["moa_added (label)"]  # the new domain, by label
    assert "mean (2 old)" in markdown and (tmp_path / "moa_seeds_table.md").read_text() == markdown


@pytest.mark.parametrize("tokens", [3, 40])  # 3 tokens x top-2 of 8: most experts get no token
def test_grouped_top_k_path_gives_the_fused_layers_output_and_gradients(monkeypatch, tokens):
    topk = _load("topk_bench", monkeypatch)
    layer, fused = topk.build_layer(24, 40, experts=8, rank=3, top_k=2, device="cpu", dtype=torch.float32)
    x = torch.randn(tokens, 24, requires_grad=True)
    assert topk.check_equal(layer, fused, x) < 1e-5
    # the check sees a difference when there is one: the grouped path sending each token to the next expert
    apply = topk.GroupedExperts.apply
    shifted = lambda x, a, b, w, index, r: apply(x, a, b, w, (index + 1) % 8, r)  # noqa: E731
    monkeypatch.setattr(topk.GroupedExperts, "apply", shifted)
    assert topk.check_equal(layer, fused, x) > 1e-2


def test_topk_bench_quick_writes_its_table(monkeypatch, tmp_path):
    topk = _load("topk_bench", monkeypatch)
    report = topk.main(["--quick", "--out", str(tmp_path)])
    (case,) = report["cases"]
    assert case["fused_ms"] > 0 and case["grouped_ms"] > 0 and case["max_relative_difference"] < 1e-5
    assert "| smollm2 up | 576 -> 1536 | 4 | 64 | 1 |" in (tmp_path / "topk_bench_cpu_quick.md").read_text()
