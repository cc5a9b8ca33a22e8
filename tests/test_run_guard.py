"""Runs never overwrite or adopt other runs, ``--resume`` resumes only the same run, the split is saved with
the adapter, and recipe mistakes are refused before anything is written (files hashed before and after)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from loramix.cli import main
from loramix.data import DataError
from loramix.model import mixture_config_file
from loramix.runs.runinfo import RUN_FILE, SPLIT_FILE, describe_changes
from loramix.train import list_checkpoints, load_run, read_log

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish"]


def _lines(count: int, seed: int = 0, colour: str = "colour") -> list[str]:
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        words = rng.sample(WORDS, 4)
        task = colour if index % 2 else "animal"
        wanted = {"red", "blue", "green"} if task == colour else {"cat", "dog", "fish"}
        label = "yes" if wanted & set(words) else "no"
        lines.append(json.dumps({"task": task, "text": " ".join(words), "label": label}))
    return [line + "\n" for line in lines]


def _recipe(root: Path, **changes) -> dict:
    recipe = {
        "name": "guard",
        "output_dir": str(root / "run"),
        "model": {"name": "tiny-bert", "task_type": "classification", "max_length": 32, "pooling": "pooler"},
        "mixture": {"method": "moelora", "r": 2, "num_experts": 2, "lora_alpha": 16, "target_modules": ["query"]},
        "data": {"tasks": [{"jsonl": str(root / "data.jsonl"), "labels": ["no", "yes"]}], "validation": 4, "test": 4},
        "training": {
            "max_steps": 2,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "log_every": 1,
            "save_every": 1,
            "keep_last": 3,
            "progress_bar": False,
            "mixed_precision": "no",
            "use_cpu": True,
        },
        "eval": {"batch_size": 16},
    }
    for path, value in changes.items():
        section, _, key = path.rpartition(".")
        target = recipe
        for part in section.split(".") if section else []:
            target = target.setdefault(part, {})
        target[key] = value
    return recipe


def _write_recipe(root: Path, name: str = "recipe.yaml", **changes) -> str:
    path = root / name
    path.write_text(yaml.safe_dump(_recipe(root, **changes)))
    return str(path)


def _hashes(root: Path) -> dict[str, str]:
    """Every file's SHA-256 and every directory under ``root`` (so a new empty directory shows too)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints at steps 1 and 2) with its data and recipe."""
    root = tmp_path_factory.mktemp("trained")
    (root / "data.jsonl").write_text("".join(_lines(48)))
    assert main(["train", _write_recipe(root)]) == 0
    return root


def _copy(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run whose recipe and run files name the copy's data file."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    for path in [*tmp_path.rglob("*.yaml"), *tmp_path.rglob(RUN_FILE)]:
        path.write_text(path.read_text().replace(str(trained), str(tmp_path)))
    return tmp_path


# ----------------------------------------------------------------------------- refused, nothing changed
def _fresh_other_recipe(root):
    return ["train", _write_recipe(root, "other.yaml", **{"mixture.lora_alpha": 64})]


def _fresh_same_recipe(root):
    return ["train", _write_recipe(root)]


def _fresh_into_a_log(root):
    shutil.rmtree(root / "run")
    (root / "run").mkdir()
    (root / "run" / "log.jsonl").write_text('{"kind": "train", "step": 7}\n')
    return ["train", _write_recipe(root)]


def _fresh_into_checkpoints_only(root):
    for name in ("adapter", "log.jsonl", RUN_FILE):
        path = root / "run" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return ["train", _write_recipe(root)]


def _resume_alpha(root):
    return ["train", _write_recipe(root, **{"mixture.lora_alpha": 64}), "--resume"]


def _resume_task_renamed(root):
    (root / "data.jsonl").write_text("".join(_lines(48, colour="color")))
    return ["train", _write_recipe(root), "--resume"]


def _resume_data_grew(root):
    with open(root / "data.jsonl", "a") as handle:
        handle.writelines(_lines(8, seed=5))
    return ["train", _write_recipe(root), "--resume"]


def _resume_learning_rate(root):
    return ["train", _write_recipe(root, **{"training.learning_rate": 0.1}), "--resume"]


def _resume_max_steps(root):
    return ["train", _write_recipe(root), "--resume", "--max-steps", "5"]


def _resume_split_seed(root):
    return ["train", _write_recipe(root, **{"data.split_seed": 3}), "--resume"]


def _resume_legacy_alpha(root):
    (root / "run" / RUN_FILE).unlink()
    return ["train", _write_recipe(root, **{"mixture.lora_alpha": 64}), "--resume"]


def _resume_nothing(root):
    shutil.rmtree(root / "run")
    return ["train", _write_recipe(root), "--resume"]


def _resume_no_checkpoint(root):
    for path in list_checkpoints(root / "run"):
        shutil.rmtree(path)
    return ["train", _write_recipe(root), "--resume"]


def _resume_missing_path(root):
    return ["train", _write_recipe(root), "--resume", str(root / "run" / "checkpoint-00000099")]


def _resume_into_another_run(root):
    shutil.copytree(root / "run", root / "other")
    checkpoint = list_checkpoints(root / "other")[0]
    return ["train", _write_recipe(root), "--resume", str(checkpoint)]


def _resume_and_overwrite(root):
    return ["train", _write_recipe(root), "--resume", "--overwrite"]


def _max_steps_zero(root):
    return ["train", _write_recipe(root, **{"output_dir": str(root / "new")}), "--max-steps", "0"]


def _max_steps_negative(root):
    return ["train", _write_recipe(root, **{"output_dir": str(root / "new")}), "--max-steps", "-3"]


def _recipe_max_steps_zero(root):
    return ["train", _write_recipe(root, **{"training.max_steps": 0}), "--overwrite"]


def _task_without_training(root):
    sizes = {"data.validation": {"animal": 16, "colour": 4}, "data.test": {"animal": 8, "colour": 4}}
    return ["train", _write_recipe(root, **sizes), "--overwrite"]


def _max_train_zero(root):
    return ["train", _write_recipe(root, **{"data.max_train": 0}), "--overwrite"]


def _unknown_instructions(root):
    return ["train", _write_recipe(root, **{"data.instructions": {"colr": "Colour?"}}), "--overwrite"]


def _unknown_validation_task(root):
    return ["train", _write_recipe(root, **{"data.validation": {"animal": 4, "colr": 4}}), "--overwrite"]


def _stage_unknown_only_tasks(root):
    return ["train", _write_recipe(root, stages=[{"name": "a", "data": {"only_tasks": ["colr"]}}]), "--overwrite"]


def _stage_changes_split(root):
    return ["train", _write_recipe(root, stages=[{"name": "a", "data": {"validation": 2}}]), "--overwrite"]


def _stage_unknown_instructions(root):
    recipe = _write_recipe(root, stages=[{"name": "a", "data": {"instructions": {"colr": "x"}}}])
    return ["train", recipe, "--overwrite"]


def _max_length_beyond_positions(root):
    return ["train", _write_recipe(root, **{"model.name": "minilm", "model.max_length": 1000}), "--overwrite"]


def _fp16_on_cpu(root):
    return ["train", _write_recipe(root, **{"training.mixed_precision": "fp16"}), "--overwrite"]


def _output_dir_is_a_file(root):
    (root / "taken").write_text("not a directory")
    return ["train", _write_recipe(root, **{"output_dir": str(root / "taken")})]


def _output_dir_is_an_adapter(root):
    return ["train", _write_recipe(root, **{"output_dir": str(root / "run" / "adapter")}), "--overwrite"]


def _resume_incomplete_checkpoint(root):
    (root / "run" / "checkpoint-00000002" / "trainer_state.json").unlink()
    return ["train", _write_recipe(root), "--resume", str(root / "run" / "checkpoint-00000002")]


def _temperature_zero(root):
    return ["train", _write_recipe(root, **{"data.sampler": "temperature", "data.temperature": 0}), "--overwrite"]


def _negative_validation(root):
    return ["train", _write_recipe(root, **{"data.validation": -1}), "--overwrite"]


def _mixed_as_string(root):
    return ["train", _write_recipe(root, **{"data.mixed": "yes"}), "--overwrite"]


def _resume_foreign_checkpoint(root):
    config = mixture_config_file(root / "run" / "checkpoint-00000002")
    config.write_text(config.read_text().replace('"lora_alpha": 16', '"lora_alpha": 64'))
    return ["train", _write_recipe(root), "--resume"]


def _stage_trains_nothing(root):
    stages = [{"name": "a"}, {"name": "b", "trainable": ["nothing"]}]
    return ["train", _write_recipe(root, stages=stages), "--overwrite"]


def _stage_options_unknown(root):
    return ["train", _write_recipe(root, stages=[{"name": "a", "options": {"hard": True}}]), "--overwrite"]


def _stage_names_repeat(root):
    return ["train", _write_recipe(root, stages=[{"name": "a"}, {"name": "a"}]), "--overwrite"]


def _bad_field(path, value):
    def setup(root):
        return ["train", _write_recipe(root, **{path: value}), "--overwrite"]

    return setup


REFUSED = {
    "fresh run, other recipe": (_fresh_other_recipe, r"holds another run \(adapter/, checkpoint-00000001/"),
    "fresh run, same recipe": (_fresh_same_recipe, "pass --resume to continue it, --overwrite to replace it"),
    "fresh run into another run's log": (_fresh_into_a_log, r"holds another run \(log.jsonl\)"),
    "fresh run into checkpoints": (_fresh_into_checkpoints_only, r"holds another run \(checkpoint-00000001/"),
    "resume, lora_alpha changed": (_resume_alpha, "mixture.lora_alpha: 16 -> 64"),
    "resume, task renamed": (_resume_task_renamed, r"tasks: \['animal', 'colour'\] -> \['animal', 'color'\]"),
    "resume, data file grew": (_resume_data_grew, r"data file \S+data.jsonl changed .*sha256"),
    "resume, learning rate changed": (_resume_learning_rate, "training.learning_rate: 0.01 -> 0.1"),
    "resume, max steps changed": (_resume_max_steps, "training.max_steps: 2 -> 5"),
    "resume, split seed changed": (_resume_split_seed, "data.split_seed: 0 -> 3"),
    "resume, older run, alpha changed": (_resume_legacy_alpha, "mixture.lora_alpha: 16 -> 64"),
    "resume, no output directory": (_resume_nothing, "cannot resume: output directory .* has no checkpoint"),
    "resume, no checkpoint": (_resume_no_checkpoint, r"has no checkpoint \(it holds adapter/, log.jsonl, run.json"),
    "resume, missing checkpoint": (_resume_missing_path, "checkpoint-00000099 does not exist"),
    "resume into another run": (_resume_into_another_run, "into output directory .* it holds another run"),
    "resume and overwrite": (_resume_and_overwrite, "--resume and --overwrite exclude each other"),
    "--max-steps 0": (_max_steps_zero, "--max-steps 0 is invalid"),
    "--max-steps -3": (_max_steps_negative, "--max-steps -3 is invalid"),
    "training.max_steps 0": (_recipe_max_steps_zero, "training.max_steps=0 is invalid"),
    "task without training example": (_task_without_training, "task 'animal' has no training example .* 24 examples"),
    "max_train 0": (_max_train_zero, "data.max_train=0"),
    "unknown instructions task": (_unknown_instructions, r"data.instructions: unknown tasks \['colr'\]"),
    "unknown validation task": (_unknown_validation_task, r"data.validation: unknown tasks \['colr'\]"),
    "stage only_tasks unknown": (_stage_unknown_only_tasks, r"stages\[a\].data.only_tasks: unknown tasks \['colr'\]"),
    "stage changes the split": (_stage_changes_split, r"stages\[a\].data: a stage cannot change the split"),
    "stage instructions unknown": (_stage_unknown_instructions, r"stages\[a\].data.instructions: unknown tasks"),
    "max_length beyond positions": (_max_length_beyond_positions, "model.max_length=1000 is beyond the 512 positions"),
    "fp16 on the CPU": (_fp16_on_cpu, "mixed_precision='fp16' needs a CUDA GPU"),
    "resume, foreign checkpoint": (_resume_foreign_checkpoint, r"mixture.lora_alpha: 64 -> 16"),
    "stage trains nothing": (_stage_trains_nothing, r"stages\[b\]: trainable=\['nothing'\] .* leave no parameter"),
    "stage options unknown": (_stage_options_unknown, r"stages\[a\].options=.* takes no stage options"),
    "stage names repeat": (_stage_names_repeat, r"stages: names must be distinct"),
    "eval.batch_size 0": (_bad_field("eval.batch_size", 0), "eval.batch_size=0 is invalid"),
    "learning_rate nan": (_bad_field("training.learning_rate", float("nan")), "training.learning_rate=nan is invalid"),
    "classifier_dropout 1": (_bad_field("model.classifier_dropout", 1.0), "model.classifier_dropout=1.0 is invalid"),
    "source mode": (_bad_field("data.tasks", [{"bigbench": "x", "mode": "cls"}]), r"mode='cls' is invalid"),
    "source max_examples 0": (_bad_field("data.tasks", [{"bigbench": "x", "max_examples": 0}]), "max_examples=0"),
    "output_dir empty": (_bad_field("output_dir", ""), "output_dir='' is invalid"),
    "output_dir is a file": (_output_dir_is_a_file, r"output directory \S+taken is a file"),
    "output_dir is an adapter": (_output_dir_is_an_adapter, r"adapter is an adapter directory"),
    "resume, incomplete checkpoint": (_resume_incomplete_checkpoint, "is not a complete checkpoint"),
    "temperature 0": (_temperature_zero, "data.temperature=0 is invalid"),
    "validation -1": (_negative_validation, "data.validation=-1 is invalid"),
    "mixed 'yes'": (_mixed_as_string, "data.mixed='yes' is invalid"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_a_clear_error_and_nothing_changed(case, trained, tmp_path, capsys):
    setup, message = REFUSED[case]
    root = _copy(trained, tmp_path)
    argv = setup(root)
    before = _hashes(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loramix train: error: "), err
    assert __import__("re").search(message, err), err
    assert _hashes(root) == before


# ----------------------------------------------------------------------------- accepted, correctly
def test_overwrite_replaces_only_the_old_runs_files(trained, tmp_path):
    root = _copy(trained, tmp_path)
    (root / "run" / "notes.txt").write_text("mine")
    old_steps = [path.name for path in list_checkpoints(root / "run")]
    assert old_steps == ["checkpoint-00000001", "checkpoint-00000002"]
    recipe = _write_recipe(root, "new.yaml", **{"mixture.lora_alpha": 64, "training.max_steps": 1})
    assert main(["train", recipe, "--overwrite"]) == 0
    run_dir = root / "run"
    assert [path.name for path in list_checkpoints(run_dir)] == ["checkpoint-00000001"]
    assert [record["step"] for record in read_log(run_dir / "log.jsonl", "train")] == [1]
    assert json.loads(mixture_config_file(run_dir / "adapter").read_text())["lora_alpha"] == 64
    assert json.loads((run_dir / RUN_FILE).read_text())["fingerprint"]["mixture"]["lora_alpha"] == 64
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in run_dir.iterdir() if path.name.startswith(".")) == []


def test_resume_of_the_same_run_continues_it(trained, tmp_path):
    root = _copy(trained, tmp_path)
    run_file = (root / "run" / RUN_FILE).read_bytes()
    shutil.rmtree(root / "run" / "checkpoint-00000002")
    # logging and checkpoint settings may change on resume; a moved data file with the same bytes is the same data
    shutil.move(root / "data.jsonl", root / "moved.jsonl")
    tasks = [{"jsonl": str(root / "moved.jsonl"), "labels": ["no", "yes"]}]
    recipe = _write_recipe(root, **{"training.log_every": 2, "training.keep_last": 1, "data.tasks": tasks})
    assert main(["train", recipe, "--resume"]) == 0
    assert [path.name for path in list_checkpoints(root / "run")] == ["checkpoint-00000002"]
    assert (root / "run" / RUN_FILE).read_bytes() == run_file


def test_resume_of_a_run_without_run_file_checks_its_checkpoint(trained, tmp_path):
    root = _copy(trained, tmp_path)
    (root / "run" / RUN_FILE).unlink()
    with pytest.warns(UserWarning, match="only its mixture config was checked"):
        assert main(["train", _write_recipe(root), "--resume"]) == 0
    assert json.loads((root / "run" / RUN_FILE).read_text())["fingerprint"]["mixture"]["lora_alpha"] == 16


def test_eval_merge_export_use_the_saved_split(trained, tmp_path):
    """The data file grows, then disappears: the report and the split stay those of training."""
    root = _copy(trained, tmp_path)
    adapter = root / "run" / "adapter"
    saved = [json.loads(line) for line in (adapter / SPLIT_FILE).read_text().splitlines()]
    assert {split: sum(r["split"] == split for r in saved) for split in ("train", "validation", "test")} == {
        "train": 32,
        "validation": 8,
        "test": 8,
    }
    assert main(["eval", "--adapter", str(adapter), "--out", str(root / "e1"), "--no-plots"]) == 0
    first = json.loads((root / "e1" / "report.json").read_text())["results"]
    with open(root / "data.jsonl", "a") as handle:
        handle.writelines(_lines(40, seed=9))
    assert main(["eval", "--adapter", str(adapter), "--out", str(root / "e2"), "--no-plots"]) == 0
    assert json.loads((root / "e2" / "report.json").read_text())["results"] == first
    (root / "data.jsonl").unlink()
    run = load_run(adapter)
    assert [(e.task, e.text, e.label) for e in run.splits.test] == [
        (r["task"], r["text"], r["label"]) for r in saved if r["split"] == "test"
    ]
    assert main(["export", "--adapter", str(adapter), "--task", "colour", "--out", str(root / "peft")]) == 0
    assert main(["merge", "--adapter", str(adapter), "--task", "animal", "--out", str(root / "merged")]) == 0


def test_an_adapter_without_its_split_checks_the_data_hashes(trained, tmp_path):
    root = _copy(trained, tmp_path)
    adapter = root / "run" / "adapter"
    (adapter / SPLIT_FILE).unlink()
    assert load_run(adapter).task_set.names == ["animal", "colour"]  # unchanged data: re-split is the same split
    with open(root / "data.jsonl", "a") as handle:
        handle.writelines(_lines(4, seed=2))
    with pytest.raises(DataError, match=r"data file \S+data.jsonl changed"):
        load_run(adapter)
    (adapter / RUN_FILE).unlink()
    with pytest.warns(UserWarning, match="no saved split"):
        load_run(adapter)


def test_the_trainer_receives_the_fingerprint_when_it_takes_one(trained, tmp_path, monkeypatch):
    import loramix.train.pipeline as pipeline

    seen = []

    class Recording(pipeline.Trainer):
        def __init__(self, *args, fingerprint=None, **kwargs):
            seen.append(fingerprint)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pipeline, "Trainer", Recording)
    recipe = _write_recipe(tmp_path, **{"training.max_steps": 1})
    (tmp_path / "data.jsonl").write_text("".join(_lines(48)))
    assert main(["train", recipe]) == 0
    assert seen == [json.loads((tmp_path / "run" / RUN_FILE).read_text())["fingerprint"]]
    assert seen[0]["mixture"]["task_names"] == ["animal", "colour"] and seen[0]["data"]["tasks"][0]["sha256"]


def test_changes_are_named_field_by_field():
    old = {"mixture": {"lora_alpha": 16, "r": 2}, "data": {"tasks": [{"kind": "jsonl", "sha256": "1" * 64}]}}
    new = {"mixture": {"lora_alpha": 64, "r": 2}, "data": {"tasks": [{"kind": "jsonl", "sha256": "2" * 64}]}}
    assert describe_changes(old, new, ["/d/x.jsonl"]) == [
        "data file /d/x.jsonl changed (data.tasks[0] sha256 111111111111 -> 222222222222)",
        "mixture.lora_alpha: 16 -> 64",
    ]
    assert describe_changes(old, old) == []


def test_add_domain_keeps_the_saved_split_and_needs_no_old_data(tmp_path):
    from loramix.runs.build import read_data

    rng = random.Random(0)
    lines = []
    for index in range(32):
        words = rng.sample(WORDS, 3)
        task = "copy" if index % 2 else "first"
        lines.append({"task": task, "text": " ".join(words), "target": " ".join(words) if task == "copy" else words[0]})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "new.jsonl").write_text(
        "".join(json.dumps({"text": w, "target": w[::-1]}) + "\n" for w in [*WORDS, *[w + "s" for w in WORDS]])
    )
    moa = {"method": "moa", "r": 2, "num_experts": "tasks", "target_modules": ["q_proj"]}
    tasks = [{"jsonl": str(tmp_path / "data.jsonl")}]
    changes = {"model.name": "tiny-llama", "model.task_type": "generation", "data.tasks": tasks, "mixture": moa}
    assert main(["train", _write_recipe(tmp_path, **changes), "--max-steps", "1"]) == 0
    (tmp_path / "data.jsonl").rename(tmp_path / "away.jsonl")  # the earlier domains' data is gone
    grow = ["add-domain", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(tmp_path / "new.jsonl")]
    grow += ["--name", "reverse", "--out", str(tmp_path / "grown"), "--expert-steps", "1", "--router-steps", "1"]
    assert main([*grow, "--max-length", "24"]) == 0
    old = (tmp_path / "run" / "adapter" / SPLIT_FILE).read_text().splitlines()
    grown = (tmp_path / "grown" / "adapter" / SPLIT_FILE).read_text().splitlines()
    assert [line for line in grown if json.loads(line)["task"] != "reverse"] == old
    (tmp_path / "away.jsonl").rename(tmp_path / "data.jsonl")
    run = load_run(tmp_path / "grown" / "adapter")
    task_set, splits, _ = read_data(run.recipe.data)  # what the grown recipe would split
    assert run.task_set == task_set and run.splits == splits
