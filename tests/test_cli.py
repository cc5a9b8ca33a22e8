"""The command line on tiny models: train, eval (report and plots), merge and export that load and match."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from loramix.cli import main
from loramix.eval import matplotlib_available, routing_choices, routing_summary
from loramix.train import Recipe, RecipeError, load_run, stack_examples
from train_fixtures import classification_examples, classifier

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish"]


def _write_data(path, generation: bool) -> None:
    rng = random.Random(0)
    lines = []
    for index in range(48):
        words = rng.sample(WORDS, 4)
        if generation:
            task = "copy" if index % 2 else "first"
            target = " ".join(words) if task == "copy" else words[0]
            lines.append({"task": task, "text": " ".join(words), "target": target})
        else:
            task = "colour" if index % 2 else "animal"
            wanted = {"red", "blue", "green"} if task == "colour" else {"cat", "dog", "fish"}
            label = "yes" if wanted & set(words) else "no"
            lines.append({"task": task, "text": " ".join(words), "label": label})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _recipe(tmp_path, generation: bool, **overrides) -> dict:
    data_file = tmp_path / "data.jsonl"
    _write_data(data_file, generation)
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "model": {
            "name": "tiny-llama" if generation else "tiny-bert",
            "task_type": "generation" if generation else "classification",
            "max_length": 32,
            **({} if generation else {"pooling": "pooler"}),
        },
        "mixture": {
            "method": "moelora",
            "r": 2,
            "num_experts": 2,
            "target_modules": ["q_proj", "v_proj"] if generation else ["query", "value"],
        },
        "data": {
            "tasks": [
                {"jsonl": str(data_file), "labels": ["no", "yes"]} if not generation else {"jsonl": str(data_file)}
            ],
            "validation": 4,
            "test": 6,
        },
        "training": {
            "max_steps": 4,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "log_every": 2,
            "eval_every": 2,
            "progress_bar": False,
            "mixed_precision": "no",
            "use_cpu": True,
        },
        "eval": {"batch_size": 8, "max_new_tokens": 4},
    }
    recipe.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("classification")
    assert main(["train", str(_recipe(tmp_path, generation=False))]) == 0
    return tmp_path


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("generation")
    assert main(["train", str(_recipe(tmp_path, generation=True)), "--max-steps", "3"]) == 0
    return tmp_path


def test_train_writes_adapter_logs_and_checkpoint(classification_run, capsys):
    run_dir = classification_run / "run"
    assert (run_dir / "adapter" / "recipe.yaml").is_file()
    assert (run_dir / "checkpoint-00000004" / "trainer_state.json").is_file()
    kinds = [json.loads(line)["kind"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 2 and kinds.count("eval") == 2
    assert main(["train", str(classification_run / "recipe.yaml"), "--resume"]) == 0


def test_eval_writes_report_and_plots(classification_run, tmp_path):
    adapter = classification_run / "run" / "adapter"
    assert main(["eval", "--adapter", str(adapter), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["results"]["tiny"]) == {"animal", "colour"}
    assert report["results"]["tiny"]["colour"]["count"] == 6
    assert report["routing"]["tiny"]["kind"] == "gate"
    assert "| colour |" in (tmp_path / "report.md").read_text()
    if matplotlib_available():
        assert (tmp_path / "scores.png").stat().st_size > 0 and (tmp_path / "routing_tiny.png").stat().st_size > 0


def test_merged_classifier_matches_the_mixture(classification_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    adapter = classification_run / "run" / "adapter"
    assert main(["merge", "--adapter", str(adapter), "--task", "colour", "--out", str(tmp_path / "m")]) == 0
    run = load_run(adapter)
    batch = run.tokenizer(["red cat sun tree", "dog moon rock fish"], return_tensors="pt", padding=True)
    task = run.task_set.task_id("colour")
    with torch.no_grad():
        expected = run.model(**batch, task_ids=torch.tensor([task, task])).logits
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    assert merged.config.id2label == {0: "no", 1: "yes"}


def test_export_and_merge_of_a_causal_lm_match(generation_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = generation_run / "run" / "adapter"
    assert main(["export", "--adapter", str(adapter), "--task", "copy", "--out", str(tmp_path / "peft")]) == 0
    assert main(["merge", "--adapter", str(adapter), "--task", "1", "--out", str(tmp_path / "merged")]) == 0
    run = load_run(adapter)
    task = run.task_set.task_id("copy")
    assert task == 1
    inputs = run.tokenizer(["red cat sun tree"], return_tensors="pt")
    with torch.no_grad():
        expected = run.model(**inputs, task_ids=torch.tensor([task])).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
        peft_model = PeftModel.from_pretrained(_fresh_base(run), tmp_path / "peft").eval()
        torch.testing.assert_close(peft_model(**inputs).logits, expected, rtol=1e-4, atol=1e-5)


def _fresh_base(run):
    from loramix.runs.build import load_base_model

    return load_base_model(run.recipe.model, run.tokenizer, None)


def test_generation_eval_reports_exact_match(generation_run, tmp_path):
    adapter = generation_run / "run" / "adapter"
    assert main(["eval", "--adapter", str(adapter), "--out", str(tmp_path), "--no-plots", "--split", "validation"]) == 0
    results = json.loads((tmp_path / "report.json").read_text())["results"]["tiny"]
    assert set(results) == {"first", "copy"} and all("exact_match" in scores for scores in results.values())
    assert not list(tmp_path.glob("*.png"))


def test_bad_recipe_key_is_named(tmp_path, capsys):
    path = _recipe(tmp_path, generation=False, trainig={"max_steps": 1})
    assert main(["train", str(path)]) == 2
    assert "trainig" in capsys.readouterr().err
    text = yaml.safe_load(path.read_text())
    del text["trainig"]
    text["training"]["lr"] = 1.0
    path.write_text(yaml.safe_dump(text))
    assert main(["train", str(path)]) == 2
    assert "unknown key(s) ['lr'] in training" in capsys.readouterr().err


def test_routing_summary_of_an_input_routed_method():
    model = classifier(method="moa", num_experts=2)
    examples = classification_examples(8)
    batches = {
        "t0": [stack_examples([e for e in examples if int(e["task_ids"]) == 0])],
        "t1": [stack_examples([e for e in examples if int(e["task_ids"]) == 1])],
    }
    summary = routing_summary(model, lambda: batches)
    assert summary["kind"] == "experts" and set(summary["tasks"]) == {"t0", "t1"}
    shares = summary["tasks"]["t0"]
    assert set(shares) == set(model.mixture_layers())
    assert all(len(values) == 2 and sum(values) == pytest.approx(1.0) for values in shares.values())
    assert all(choice in (0, 1) for choice in routing_choices(summary)["t1"].values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"name": "tiny-bert", "task_typ": "classification"}}, r"unknown key\(s\) \['task_typ'\] in model"),
        ({"model": {"name": "tiny-bert", "task_type": "regression"}}, "model.task_type='regression'"),
        ({"data": {"tasks": [{"csv": "x.csv"}]}}, r"unknown key\(s\) \['csv'\] in data.tasks\[0\]"),
        ({"data": {"tasks": [{"jsonl": "a.jsonl", "hf": "b"}]}}, "exactly one of"),
        ({"data": {"tasks": [{"jsonl": "a.jsonl"}], "sampler": "random"}}, "data.sampler='random'"),
        ({"stages": [{"name": "s", "trainable": ["("]}]}, r"stages\[s\].trainable"),
        ({"eval": {"split": "train"}}, "eval.split='train'"),
    ],
)
def test_recipe_errors_name_the_key(change, message):
    recipe = {
        "model": {"name": "tiny-bert"},
        "mixture": {"method": "lora"},
        "data": {"tasks": [{"jsonl": "a.jsonl"}]},
        **change,
    }
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(recipe)


def test_mixture_errors_name_the_field(tmp_path, capsys):
    path = _recipe(tmp_path, generation=False, mixture={"method": "moelora", "r": 0})
    assert main(["train", str(path)]) == 2
    assert "mixture: MixtureConfig.r=0 is invalid" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["more_minilm", "two_stage_moelora", "smollm2_generation"])
def test_shipped_recipes_load_and_round_trip(name, tmp_path):
    recipe = Recipe.from_yaml(RECIPES / f"{name}.yaml")
    recipe.to_yaml(tmp_path / "copy.yaml")
    assert Recipe.from_yaml(tmp_path / "copy.yaml") == recipe


def test_add_domain_keeps_earlier_experts(tmp_path):
    recipe = _recipe(
        tmp_path,
        generation=True,
        mixture={"method": "moa", "r": 2, "num_experts": "tasks", "target_modules": ["q_proj", "v_proj"]},
    )
    assert main(["train", str(recipe), "--max-steps", "2"]) == 0
    adapter = tmp_path / "run" / "adapter"
    before = load_run(adapter).model
    new_data = tmp_path / "reverse.jsonl"
    rng = random.Random(1)
    lines = []
    for _ in range(30):
        words = rng.sample(WORDS, 3)
        lines.append({"text": " ".join(words), "target": " ".join(reversed(words))})
    new_data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "grown"
    args = [
        "add-domain",
        "--adapter",
        str(adapter),
        "--data",
        str(new_data),
        "--name",
        "reverse",
        "--out",
        str(out),
        "--expert-steps",
        "2",
        "--router-steps",
        "2",
        "--max-length",
        "24",
    ]
    assert main(args) == 0
    grown = load_run(out / "adapter")
    assert grown.task_set.names == [*load_run(adapter).task_set.names, "reverse"]
    old_layers = before.mixture_layers()
    for name, layer in grown.model.mixture_layers().items():
        old = old_layers[name]
        rank = old.lora_A.shape[0]
        assert layer.lora_A.shape[0] == rank + 2
        assert torch.equal(layer.lora_A[:rank], old.lora_A) and torch.equal(layer.lora_B[:, :rank], old.lora_B)
        assert layer.lora_B[:, rank:].abs().sum() > 0
    grown_dir = str(out / "adapter")
    again = ["add-domain", "--adapter", grown_dir, "--data", str(new_data), "--name", "reverse", "--out", str(tmp_path)]
    assert main(again) == 2  # the name is taken: a one-line error, nothing written


def test_bench_runs_a_benchmark_script(tmp_path):
    assert main(["bench", "layer", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "layer_bench_quick.json").read_text())
    assert [row["experts"] for row in report["layer"]] == [1, 4, 8, 16]
    assert all(row["mixture_ms"] > 0 and row["peft_lora_ms"] > 0 for row in report["layer"])


def test_a_command_leaves_the_process_group_a_launcher_opened(tmp_path, monkeypatch, capsys):
    """Under torchrun/accelerate launch the CLI destroys the process group when its command ends (also on an
    error), so the ranks do not exit with gloo's threads still running."""
    from loramix import assets

    monkeypatch.setattr(assets, "asset_status", lambda: [])
    for argv, code in ((["assets", "--check"], 0), (["train", str(tmp_path / "missing.yaml")], 2)):
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / ('store-' + argv[0])}", rank=0, world_size=1
        )
        assert torch.distributed.is_initialized()
        assert main(argv) == code
        assert not torch.distributed.is_initialized()
    capsys.readouterr()
