"""``loramix demo``: the interference tasks it derives, the recipes it builds, and what it plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from loramix import assets
from loramix.demo import demo_recipes, interference_examples, routing_overview, run_demo
from loramix.train import RecipeError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SENTENCES = [
    "Jamal Murray was perfect from the line",
    "Jonas Valanciunas beat the buzzer",
    "Malcolm Brogdon banked the shot in",
    "Too short",  # fewer than 4 words: left out
    "Shot after shot he shot",  # "Shot" vs "shot": different targets, kept
    "line after line by line",  # first and last word equal: left out
    "Mookie Betts hit a walkoff single",
    "Tom Brady threw a touchdown pass",
    "Sergio Aguero scored a bicycle kick",
    "Kevin Durant hit the step back jumper",
    "Carson Wentz took the snap quickly",
    "Lionel Messi curled a free kick",
]


@pytest.fixture
def fake_bigbench(tmp_path, monkeypatch):
    """A BIG-bench directory holding one ``sports_understanding`` task of the sentences above."""
    root = tmp_path / "bigbench"
    (root / "sports_understanding").mkdir(parents=True)
    examples = [{"input": text, "target_scores": {"plausible": 1, "implausible": 0}} for text in SENTENCES]
    (root / "sports_understanding" / "task.json").write_text(json.dumps({"examples": examples}))
    monkeypatch.setattr(assets, "bigbench_tasks_dir", lambda *args, **kwargs: root)
    return root


def test_interference_tasks_share_inputs_and_need_different_outputs(fake_bigbench):
    records = interference_examples("sports_understanding", ["first_word", "last_word", "second_word"])
    texts = [[row["text"] for row in rows] for rows in records.values()]
    assert texts[0] == texts[1] == texts[2]
    assert "Too short" not in texts[0] and "line after line by line" not in texts[0]
    assert len(texts[0]) == len(SENTENCES) - 2
    first = {row["text"]: row["target"] for row in records["first_word"]}
    last = {row["text"]: row["target"] for row in records["last_word"]}
    second = {row["text"]: row["target"] for row in records["second_word"]}
    assert first["Jamal Murray was perfect from the line"] == "Jamal"
    assert last["Jamal Murray was perfect from the line"] == "line"
    assert second["Jamal Murray was perfect from the line"] == "Murray"
    assert (first["Shot after shot he shot"], last["Shot after shot he shot"]) == ("Shot", "shot")
    assert all(first[text] != last[text] != second[text] != first[text] for text in first)


def test_demo_file_gives_one_recipe_per_method_over_the_derived_tasks(fake_bigbench, tmp_path):
    spec = yaml.safe_load((RECIPES / "demo.yaml").read_text())
    recipes = demo_recipes(spec, tmp_path / "out", max_steps=3)
    assert [recipe.label for recipe in recipes] == ["lora", "per_task_lora", "more"]
    assert all(recipe.training.max_steps == 3 for recipe in recipes)
    assert [recipe.mixture["method"] for recipe in recipes] == ["lora", "per_task_lora", "more"]
    for recipe in recipes:
        assert [source.task for source in recipe.data.tasks] == spec["interference"]["rules"]
        assert recipe.output_dir == str(tmp_path / "out" / recipe.label)
    lines = (tmp_path / "out" / "data" / "last_word.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"text": SENTENCES[0], "target": "line"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rules": ["first_word"]}, "at least 2 different rules"),
        ({"rules": ["first_word", "middle_word"]}, r"unknown \['middle_word'\]"),
        ({"source": "x"}, "needs the keys bigbench and rules"),
    ],
)
def test_bad_interference_section_is_named_and_writes_nothing(fake_bigbench, tmp_path, change, message):
    spec = yaml.safe_load((RECIPES / "demo.yaml").read_text())
    spec["interference"].update(change)
    with pytest.raises(RecipeError, match=message):
        demo_recipes(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_bigbench(tmp_path, monkeypatch):
    """BIG-bench's files are missing (as on a fresh machine); the fortunes source gives the sentences below."""

    def missing(*args, **kwargs):
        raise assets.AssetError("BIG-bench task files are not available (nothing cached). Set LORAMIX_BIGBENCH")

    monkeypatch.setattr(assets, "bigbench_tasks_dir", missing)
    monkeypatch.setattr(assets, "fortune_sayings", lambda: list(reversed(SENTENCES)))


def test_without_bigbench_the_fallback_gives_the_inputs_and_says_so(no_bigbench, tmp_path, capsys):
    records = interference_examples("sports_understanding", ["first_word", "last_word"], 8, fallback="fortunes")
    # The fallback's first 8 texts, less the two that give no distinct targets (as for BIG-bench inputs).
    kept = [text for text in list(reversed(SENTENCES))[:8] if text not in ("Too short", "line after line by line")]
    assert [row["text"] for row in records["last_word"]] == kept and len(kept) == 7
    assert records["first_word"][0] == {"text": "Lionel Messi curled a free kick", "target": "Lionel"}
    err = capsys.readouterr().err
    assert "BIG-bench task files are not available (nothing cached); inputs instead: one-line sayings" in err

    with pytest.raises(assets.AssetError, match="LORAMIX_BIGBENCH"):  # no fallback: the asset error stands
        interference_examples("sports_understanding", ["first_word", "last_word"])
    spec = yaml.safe_load((RECIPES / "demo.yaml").read_text())
    assert spec["interference"]["fallback"] == "fortunes"
    recipes = demo_recipes(spec, tmp_path / "out", max_steps=3)
    assert [source.task for source in recipes[0].data.tasks] == ["first_word", "last_word"]
    lines = (tmp_path / "out" / "data" / "first_word.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"text": "Lionel Messi curled a free kick", "target": "Lionel"}
    assert len(lines) == len(SENTENCES) - 2


def test_unknown_fallback_is_refused_before_reading_anything(no_bigbench, tmp_path):
    spec = yaml.safe_load((RECIPES / "demo.yaml").read_text())
    spec["interference"]["fallback"] = "poems"
    with pytest.raises(RecipeError, match=r"interference.fallback='poems' is unknown; known: \['fortunes'\]"):
        demo_recipes(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_method_writes_no_task_file(fake_bigbench, tmp_path):
    spec = yaml.safe_load((RECIPES / "demo.yaml").read_text())
    spec["methods"][1]["mixture"]["method"] = "no_such_method"
    with pytest.raises(RecipeError, match=r"methods\[.per_task_lora.\]: mixture: .*no_such_method"):
        demo_recipes(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_routing_overview_counts_only_task_dependent_routing():
    shared = {
        "kind": "gate",
        "tasks": {"a": {"l0": [1.0, 1.0], "l1": [1.0, 1.0]}, "b": {"l0": [1.0, 1.0], "l1": [1.0, 1.0]}},
    }
    assert routing_overview(shared) is None
    ranks = {
        "kind": "gate",
        "tasks": {"a": {"l0": [1, 0, 0], "l1": [1, 1, 0]}, "b": {"l0": [1, 1, 1], "l1": [1, 1, 0]}},
    }
    assert routing_overview(ranks) == {"layers": 2, "layers_differing": 1, "active": {"a": 1.5, "b": 2.5}}
    assert routing_overview({"kind": "experts", "tasks": {"a": {"l0": [0.5, 0.5]}}}) is None


def test_demo_runs_end_to_end_and_plots_only_informative_routing(fake_bigbench, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    spec = {
        "interference": {"bigbench": "sports_understanding", "rules": ["first_word", "last_word"]},
        "methods": [
            {"name": "lora", "mixture": {"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]}},
            {
                "name": "per_task",
                "mixture": {
                    "method": "per_task_lora",
                    "num_experts": "tasks",
                    "r": 2,
                    "target_modules": ["q_proj", "v_proj"],
                },
            },
        ],
        "recipe": {
            "model": {"name": "tiny-llama", "task_type": "generation", "max_length": 32},
            "data": {"validation": 0, "test": 3},
            "training": {
                "max_steps": 2,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "progress_bar": False,
                "mixed_precision": "no",
                "use_cpu": True,
            },
            "eval": {"batch_size": 8, "max_new_tokens": 3},
        },
    }
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    outcome = run_demo(path, tmp_path / "out")
    assert set(outcome["results"]) == {"lora", "per_task"}
    assert all(set(scores) == {"first_word", "last_word"} for scores in outcome["results"].values())
    plots = sorted(plot.name for plot in outcome["plots"])
    # per-task LoRA routes each task to its own expert; a shared LoRA's gate is one for every task
    assert outcome["routing_overview"]["lora"] is None
    assert outcome["routing_overview"]["per_task"]["layers_differing"] > 0
    assert plots == ["routing_per_task.png", "scores.png"]  # its ranks are all equal: the gates show the split
    assert all(plot.is_file() for plot in outcome["plots"])
    assert "| first_word |" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="--overwrite"):  # a second demo does not silently mix with the first
        run_demo(path, tmp_path / "out")
    assert set(run_demo(path, tmp_path / "out", overwrite=True)["results"]) == {"lora", "per_task"}


def test_plots_show_ranks_where_they_differ_and_gates_where_only_the_weights_do(tmp_path):
    pytest.importorskip("matplotlib")
    from loramix.demo import _informative_plots

    scores = {"first_word": {"exact_match": 0.9}, "last_word": {"exact_match": 0.5}}
    outcome = {
        "results": {"lora": scores, "more": scores, "moelora": scores},
        "routing": {
            "lora": {"kind": "gate", "tasks": {"first_word": {"l0": [1.0, 1.0]}, "last_word": {"l0": [1.0, 1.0]}}},
            "more": {"kind": "gate", "tasks": {"first_word": {"l0": [1.0, 0.0]}, "last_word": {"l0": [1.0, 1.0]}}},
            "moelora": {"kind": "gate", "tasks": {"first_word": {"l0": [0.9, 0.1]}, "last_word": {"l0": [0.2, 0.8]}}},
        },
    }
    drawn = _informative_plots(outcome, tmp_path)
    assert sorted(path.name for path in drawn) == ["choices_more.png", "routing_moelora.png", "scores.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["choices_more.png", "routing_moelora.png", "scores.png"]
