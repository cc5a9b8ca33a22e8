"""Checkpoints: exact resume (bit for bit on CPU), atomic writes, rotation."""

from __future__ import annotations

import json

import pytest
import torch

from loramix.train import (
    CheckpointManager,
    Recipe,
    RecipeError,
    StageSettings,
    Trainer,
    TrainingSettings,
    build_run,
    latest_checkpoint,
    list_checkpoints,
)
from train_fixtures import batch_factory, classification_examples, classifier

STAGES = [
    StageSettings(name="experts", max_steps=3, trainable=["lora_", "heads"]),
    StageSettings(name="all", max_steps=3, lr_multipliers={"lora_": 0.5}),
]


class Crash(RuntimeError):
    """The injected failure."""


def _trainer(directory, callbacks=(), stages=STAGES) -> Trainer:
    settings = TrainingSettings(
        batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        weight_decay=0.01,
        warmup_steps=1,
        schedule="cosine",
        save_every=2,
        keep_last=None,
        progress_bar=False,
        mixed_precision="no",
        use_cpu=True,
    )
    model = classifier(dropout=0.1)
    return Trainer(
        model, settings, batch_factory(classification_examples(20), 4), directory, stages=stages, callbacks=callbacks
    )


def _crash_at(step: int):
    def callback(state):
        if state.global_step == step:
            raise Crash(f"injected at step {step}")

    return callback


def _optimizer_state(directory) -> dict:
    return torch.load(directory / "optimizer.pt", weights_only=True)


@pytest.mark.parametrize(("crash_step", "last_saved"), [(2, 2), (4, 3)])
def test_resume_after_a_crash_is_bit_exact(tmp_path, crash_step, last_saved):
    """Checkpoints fall at global steps 2, 3 (end of stage 1), 5 and 6; the crash comes after a step's save.

    Crashing at 2 resumes in the middle of stage 1 and crosses into stage 2; crashing at 4 (not saved)
    resumes from the end of stage 1.
    """
    reference = _trainer(tmp_path / "reference")
    reference_state = reference.train()
    expected = reference.model.adapter_state_dict()

    with pytest.raises(Crash):
        _trainer(tmp_path / "resumed", callbacks=[_crash_at(crash_step)]).train()
    assert latest_checkpoint(tmp_path / "resumed").name == f"checkpoint-{last_saved:08d}"
    resumed = _trainer(tmp_path / "resumed")
    resumed_state = resumed.train(resume_from=True)

    got = resumed.model.adapter_state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    tail = len(resumed_state.history)
    assert [r["loss"] for r in resumed_state.history] == [r["loss"] for r in reference_state.history[-tail:]]
    final_reference = _optimizer_state(tmp_path / "reference" / "checkpoint-00000006")
    final_resumed = _optimizer_state(tmp_path / "resumed" / "checkpoint-00000006")
    assert final_reference["scheduler"] == final_resumed["scheduler"]
    for index, slot in final_reference["optimizer"]["state"].items():
        for name, value in slot.items():
            assert torch.equal(final_resumed["optimizer"]["state"][index][name], value)


def test_resume_refuses_other_stages(tmp_path):
    _trainer(tmp_path, stages=[StageSettings(name="one", max_steps=2)]).train()
    with pytest.raises(RecipeError, match="written for stages"):
        _trainer(tmp_path).train(resume_from=True)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, stages=[StageSettings(max_steps=2)])
    trainer.train()
    good = latest_checkpoint(tmp_path)
    files = sorted(path.name for path in good.iterdir())

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    manager = CheckpointManager(tmp_path, keep_last=1)
    optimizer = torch.optim.AdamW(p for p in trainer.model.parameters() if p.requires_grad)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in (2, 3):
        with pytest.raises(OSError, match="disk full"):
            manager.save(step, trainer.model, optimizer, scheduler, {}, {})
    assert latest_checkpoint(tmp_path) == good
    assert sorted(path.name for path in good.iterdir()) == files
    assert [path.name for path in list_checkpoints(tmp_path)] == [good.name]


def test_keep_last_rotates(tmp_path):
    trainer = _trainer(tmp_path, stages=[StageSettings(max_steps=6)])
    trainer.checkpoints.keep_last = 2
    trainer.train()
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-00000004", "checkpoint-00000006"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_resume_is_exact_with_the_data_modules_sampler(tmp_path):
    """The recipe path: JSONL tasks, templates, ``MultiTaskBatchSampler`` (MoRE's one-task batches), dropout."""
    rows = [{"task": f"t{i % 2}", "text": f"word{i % 7} item{i}", "label": i % 3} for i in range(40)]
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = Recipe.from_dict(
        {
            "model": {"name": "tiny-bert", "max_length": 16, "classifier_dropout": 0.1},
            "mixture": {"method": "more", "r": 4, "lora_dropout": 0.1, "target_modules": ["query", "value"]},
            "data": {"tasks": [{"jsonl": str(data_file)}], "validation": 2, "test": 2, "sampler": "more"},
            "training": {
                "max_steps": 5,
                "batch_size": 4,
                "save_every": 2,
                "keep_last": None,
                "use_cpu": True,
                "progress_bar": False,
                "learning_rate": 1e-2,
            },
        }
    )

    def train(directory, callbacks=(), resume=False):
        run = build_run(recipe)
        trainer = Trainer(run.model, recipe.training, run.batches, directory, callbacks=callbacks)
        trainer.train(resume_from=resume)
        return run.model.adapter_state_dict()

    expected = train(tmp_path / "reference")
    with pytest.raises(Crash):
        train(tmp_path / "resumed", callbacks=[_crash_at(3)])
    got = train(tmp_path / "resumed", resume=True)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
