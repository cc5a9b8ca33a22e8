"""The training loop: loss falls, accumulation, stages and parameter selection, schedules, settings errors."""

from __future__ import annotations

import math

import pytest
import torch

from loramix.train import (
    RecipeError,
    StageSettings,
    Trainer,
    TrainingSettings,
    WarmupSchedule,
    list_checkpoints,
    read_log,
)
from train_fixtures import batch_factory, classification_examples, classifier


def _settings(**overrides) -> TrainingSettings:
    values = {
        "max_steps": 4,
        "batch_size": 8,
        "learning_rate": 1e-2,
        "log_every": 1,
        "progress_bar": False,
        "mixed_precision": "no",
        "use_cpu": True,
    }
    return TrainingSettings(**{**values, **overrides})


def _accuracy(model) -> dict[str, dict[str, float]]:
    examples = classification_examples(32, seed=1)
    device = next(model.parameters()).device
    inputs = {key: torch.stack([example[key] for example in examples]).to(device) for key in examples[0]}
    logits = model(**inputs).logits
    correct = logits.argmax(-1) == inputs["labels"]
    return {"all": {"accuracy": correct.float().mean().item()}}


def test_loss_falls_logs_and_adapter_is_saved(tmp_path):
    model = classifier()
    trainer = Trainer(
        model,
        _settings(max_steps=30, warmup_steps=3, schedule="cosine", eval_every=15),
        batch_factory(classification_examples(64), 16),
        tmp_path,
        evaluator=_accuracy,
    )
    state = trainer.train()
    losses = [record["loss"] for record in state.history]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.85 * sum(losses[:5])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    train_logs = read_log(tmp_path / "log.jsonl", "train")
    assert [record["step"] for record in train_logs] == list(range(1, 31))
    assert {"loss", "lr", "examples_per_s", "stage"} <= set(train_logs[0])
    evals = read_log(tmp_path / "log.jsonl", "eval")
    assert [record["step"] for record in evals] == [15, 30] and "all/accuracy" in evals[-1]
    assert state.metrics["all"]["accuracy"] > 0.5


def test_accumulation_matches_one_large_batch(tmp_path):
    examples = classification_examples(32)
    runs = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = classifier()
        settings = _settings(batch_size=batch_size, gradient_accumulation_steps=accumulation)
        state = Trainer(model, settings, batch_factory(examples, batch_size), tmp_path / str(batch_size)).train()
        runs.append(([record["loss"] for record in state.history], model.adapter_state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for key, value in runs[0][1].items():
        torch.testing.assert_close(value, runs[1][1][key], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    examples = classification_examples(16)
    losses = []
    for flag in (False, True):
        settings = _settings(max_steps=2, gradient_checkpointing=flag)
        state = Trainer(classifier(), settings, batch_factory(examples, 8), tmp_path / str(flag)).train()
        losses.append([record["loss"] for record in state.history])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_stages_train_only_their_parameters(tmp_path):
    model = classifier()
    before = {name: value.clone() for name, value in model.adapter_state_dict().items()}
    seen = []
    stages = [
        StageSettings(name="experts", max_steps=2, trainable=["lora_"]),
        StageSettings(name="routers", max_steps=2, frozen=["lora_"], lr_multipliers={"heads": 0.5}),
    ]

    def record(state):
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        seen.append((state.stage_name, trainable))

    state = Trainer(
        model, _settings(), batch_factory(classification_examples(16), 8), tmp_path, stages=stages, callbacks=[record]
    ).train()
    assert [r["stage"] for r in state.history] == ["experts"] * 2 + ["routers"] * 2
    assert [r["step"] for r in state.history] == [1, 2, 3, 4]
    assert all("lora_" in name for name in seen[0][1])
    assert seen[2][1] and not any("lora_" in name for name in seen[2][1])
    after = model.adapter_state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any("lora_A" in name for name in changed) and any("router" in name for name in changed)


def test_stage_errors_name_the_problem(tmp_path):
    factory = batch_factory(classification_examples(16), 8)
    with pytest.raises(RecipeError, match="leave no parameter"):
        Trainer(classifier(), _settings(), factory, tmp_path, stages=[StageSettings(trainable=["nothing"])]).train()
    with pytest.raises(RecipeError, match="takes no stage options"):
        Trainer(classifier(), _settings(), factory, tmp_path, stages=[StageSettings(options={"x": 1})]).train()
    with pytest.raises(RecipeError, match="distinct"):
        Trainer(classifier(), _settings(), factory, tmp_path, stages=[StageSettings(), StageSettings()])


def test_warmup_schedules():
    cosine = WarmupSchedule("cosine", warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [cosine(step) for step in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert cosine(4) == pytest.approx(1.0) and cosine(14) == pytest.approx(0.1)
    assert cosine(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    linear = WarmupSchedule("linear", warmup_steps=0, total_steps=10)
    assert linear(5) == pytest.approx(0.5) and linear(20) == 0.0
    assert WarmupSchedule("constant", 2, 10)(7) == 1.0


def test_settings_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['max_step'\] in training"):
        TrainingSettings.from_dict({"max_step": 3})
    with pytest.raises(RecipeError, match="training.schedule='cos'"):
        TrainingSettings.from_dict({"schedule": "cos"})
    with pytest.raises(RecipeError, match=r"stages\[0\]"):
        StageSettings.from_dict({"lr": 1.0}, 0)
    with pytest.raises(RecipeError, match="trainable"):
        StageSettings.from_dict({"trainable": ["("]}, 0)


def test_stage_fields_fall_back_to_training():
    training = TrainingSettings(max_steps=7, learning_rate=0.5, max_grad_norm=2.0, schedule="cosine")
    inherited = StageSettings(name="a").resolved(training)
    assert (inherited.max_steps, inherited.learning_rate, inherited.max_grad_norm, inherited.schedule) == (
        7,
        0.5,
        2.0,
        "cosine",
    )
    stage = StageSettings(name="b", max_steps=3, learning_rate=0.1, max_grad_norm=0, schedule="constant")
    own = stage.resolved(training)
    assert (own.max_steps, own.learning_rate, own.max_grad_norm, own.schedule) == (3, 0.1, 0, "constant")


def _tree_hashes(root) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (directories appear as their files)."""
    import hashlib

    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _parameter_hashes(model) -> dict[str, bytes]:
    return {name: param.detach().clone().numpy().tobytes() for name, param in model.state_dict().items()}


def test_a_fresh_trainer_refuses_another_runs_directory_and_changes_nothing(tmp_path):
    factory = batch_factory(classification_examples(16), 8)
    Trainer(classifier(), _settings(max_steps=2, save_every=1), factory, tmp_path / "run").train()
    (tmp_path / "run" / "notes.txt").write_text("mine\n")
    before = _tree_hashes(tmp_path)
    model = classifier(seed=1)
    parameters = _parameter_hashes(model)
    for resume in (None, False):
        with pytest.raises(RecipeError, match=r"holds another run \(adapter/, checkpoint-00000001/.*overwrite=True"):
            Trainer(model, _settings(max_steps=2), factory, tmp_path / "run").train(resume_from=resume)
    assert _tree_hashes(tmp_path) == before
    assert _parameter_hashes(model) == parameters
    with pytest.raises(RecipeError, match="exclude each other"):
        Trainer(model, _settings(max_steps=2), factory, tmp_path / "run", overwrite=True).train(resume_from=True)
    assert _tree_hashes(tmp_path) == before
    # a saved adapter is not an output directory
    with pytest.raises(RecipeError, match="is an adapter directory"):
        Trainer(model, _settings(max_steps=2), factory, tmp_path / "run" / "adapter").train()
    assert _tree_hashes(tmp_path) == before


def test_overwrite_replaces_only_the_other_runs_files_and_resume_continues(tmp_path):
    factory = batch_factory(classification_examples(16), 8)
    directory = tmp_path / "run"
    Trainer(classifier(), _settings(max_steps=3, save_every=1), factory, directory).train()
    (directory / "notes.txt").write_text("mine\n")
    old_adapter = (directory / "adapter" / "adapter_model.safetensors").read_bytes()
    old_second = _tree_hashes(directory / "checkpoint-00000002")
    state = Trainer(classifier(seed=1), _settings(max_steps=2), factory, directory, overwrite=True).train()
    assert state.global_step == 2
    assert (directory / "notes.txt").read_text() == "mine\n"
    # the other run's checkpoints (up to step 3) went with it; what is left is the new run's
    assert [path.name for path in list_checkpoints(directory)] == ["checkpoint-00000002"]
    assert _tree_hashes(directory / "checkpoint-00000002") != old_second
    assert [record["step"] for record in read_log(directory / "log.jsonl", "train")] == [1, 2]
    assert (directory / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter
    # resuming the run in the directory is still allowed without overwrite
    Trainer(classifier(), _settings(max_steps=3, save_every=1), factory, tmp_path / "again").train()
    resumed = Trainer(classifier(), _settings(max_steps=4, save_every=1), factory, tmp_path / "again")
    assert resumed.train(resume_from=True).global_step == 4
