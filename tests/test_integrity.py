"""Non-finite steps are skipped and stop a run; checkpoints are checksummed, damaged ones are named and skipped.

Also: rotation never removes the last checkpoint of a finite step, leaves nothing listable when a delete is
interrupted, and a resume under a different run fingerprint is refused naming what changed.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from loramix.train import RecipeError, Trainer, TrainingSettings, latest_checkpoint, list_checkpoints, read_log
from loramix.train.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint
from loramix.train.trainer import NonFiniteError
from train_fixtures import batch_factory, classification_examples, classifier


def _trainer(directory, steps=4, callbacks=(), fingerprint=None, model=None, **overrides) -> Trainer:
    values = {
        "max_steps": steps,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "save_every": 2,
        "keep_last": None,
        "log_every": 1,
        "progress_bar": False,
        "mixed_precision": "no",
        "use_cpu": True,
    }
    settings = TrainingSettings(**{**values, **overrides})
    return Trainer(
        model or classifier(),
        settings,
        batch_factory(classification_examples(24), 4),
        directory,
        callbacks=callbacks,
        fingerprint=fingerprint,
        max_nonfinite_steps=3,
    )


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.adapter_state_dict().items()}


def test_a_nan_step_is_skipped_logged_and_training_goes_on(tmp_path):
    model = classifier()
    poison = {"on": False}

    def nan_logits(module, inputs, output):
        return output * float("nan") if poison["on"] else output

    model.base_model.heads[0].classifier.register_forward_hook(nan_logits)
    model.base_model.heads[1].classifier.register_forward_hook(nan_logits)
    seen = {}

    def callback(state):
        seen[state.global_step] = _snapshot(model)
        poison["on"] = state.global_step == 1  # the second step sees NaN logits

    trainer = _trainer(tmp_path, steps=4, callbacks=[callback], model=model)
    with pytest.warns(UserWarning, match="step 2: non-finite loss"):
        state = trainer.train()
    assert [record["skipped"] for record in state.history] == [False, True, False, False]
    for key, value in seen[1].items():
        assert torch.equal(seen[2][key], value), key  # the skipped step changed nothing
    assert any(not torch.equal(seen[3][key], value) for key, value in seen[2].items())
    assert all(torch.isfinite(value).all() for value in model.adapter_state_dict().values())
    logged = read_log(tmp_path / "log.jsonl", "train")
    assert logged[1]["skipped"] is True and math.isnan(logged[1]["loss"])
    saved = json.loads((tmp_path / "checkpoint-00000002" / "trainer_state.json").read_text())
    assert saved["finite"] is False


def test_a_run_of_nonfinite_steps_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, steps=8, learning_rate=1e30, save_every=1, keep_last=1)
    with pytest.raises(NonFiniteError, match=r"stopped at step 4 .*steps 2\.\.4.*checkpoint-00000001"):
        with pytest.warns(UserWarning):
            trainer.train()
    names = [path.name for path in list_checkpoints(tmp_path)]
    assert names == ["checkpoint-00000001", "checkpoint-00000003"]  # 2 was rotated away, 1 kept
    finite = json.loads((tmp_path / "checkpoint-00000001" / "trainer_state.json").read_text())
    assert finite["finite"] is True
    assert not (tmp_path / "adapter").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter of an uninterrupted 4-step run."""
    trainer = _trainer(tmp_path_factory.mktemp("reference"))
    trainer.train()
    return _snapshot(trainer.model)


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) - 20]))
    else:  # flip one byte in the last tensor's data: size and header stay intact
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_latest_checkpoint_is_named_and_resume_falls_back(tmp_path, reference, how):
    expected = reference
    run = tmp_path / "run"
    _trainer(run).train()
    latest = run / "checkpoint-00000004"
    weights = latest / "adapter_model.safetensors"
    _damage(weights, how)
    assert verify_checkpoint(latest) == ["adapter_model.safetensors (checksum mismatch)"]

    # loading it directly names the file instead of a raw safetensors or NaN surprise
    with pytest.raises(CheckpointError, match="checkpoint-00000004 is damaged: adapter_model.safetensors"):
        _trainer(run).train(resume_from=latest)
    model = classifier()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        CheckpointManager(run).load(latest, model, optimizer, scheduler)
    assert all(torch.equal(before[key], value) for key, value in model.adapter_state_dict().items())

    resumed = _trainer(run)
    with pytest.warns(UserWarning, match=r"resuming from checkpoint-00000002: .*checkpoint-00000004: adapter_model"):
        resumed.train(resume_from=True)
    for key, value in expected.items():
        assert torch.equal(resumed.model.adapter_state_dict()[key], value), key


def test_no_intact_checkpoint_is_an_error_naming_them(tmp_path):
    _trainer(tmp_path, steps=2).train()
    (tmp_path / "checkpoint-00000002" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*checkpoint-00000002: optimizer.pt \(missing\)"):
        _trainer(tmp_path, steps=2).train(resume_from=True)


def test_rotation_renames_before_deleting_and_the_lister_ignores_leftovers(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, steps=4, keep_last=1)
    real_rmtree = shutil.rmtree
    calls = []

    def interrupted(path, *args, **kwargs):
        calls.append(path)
        if str(path).endswith(".trash"):
            raise KeyboardInterrupt("killed during rotation")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    # checkpoint-2 was renamed away before the (interrupted) delete: only the new one is listed
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-00000004"]
    assert (tmp_path / ".checkpoint-00000002.trash").is_dir()
    resumed = _trainer(tmp_path, steps=6, keep_last=1)
    resumed.train(resume_from=True)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-00000006"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_resume_refuses_another_run_naming_the_keys(tmp_path):
    fingerprint = {"mixture": {"method": "moelora", "lora_alpha": 16}, "tasks": ["a", "b"], "data": "abc"}
    _trainer(tmp_path, steps=2, fingerprint=fingerprint).train()
    changed = {**fingerprint, "mixture": {"method": "moelora", "lora_alpha": 64}, "data": "abd"}
    with pytest.raises(RecipeError, match=r"run changed since it was written \(data, mixture differ\)"):
        _trainer(tmp_path, steps=4, fingerprint=changed).train(resume_from=True)
    state = _trainer(tmp_path, steps=4, fingerprint=json.loads(json.dumps(fingerprint))).train(resume_from=True)
    assert [record["step"] for record in state.history] == [3, 4]
    saved = json.loads((tmp_path / "checkpoint-00000004" / "trainer_state.json").read_text())
    assert saved["fingerprint"] == fingerprint


def test_latest_checkpoint_can_skip_damaged_ones(tmp_path):
    _trainer(tmp_path).train()
    (tmp_path / "checkpoint-00000004" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000004"
    with pytest.warns(
        UserWarning, match=r"checkpoint-00000004 is damaged \(trainer_state.json \(checksum mismatch\)\)"
    ):
        assert latest_checkpoint(tmp_path, verify=True).name == "checkpoint-00000002"


def test_ddp_without_find_unused_parameters_refuses_a_freezing_stage_at_start(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from loramix.train import StageSettings

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    settings = TrainingSettings(
        max_steps=2, batch_size=4, find_unused_parameters=False, progress_bar=False, mixed_precision="no", use_cpu=True
    )
    stages = [StageSettings(name="all", max_steps=1), StageSettings(name="heads", max_steps=1, frozen=["lora_"])]
    model = classifier()
    before = {name: param.requires_grad for name, param in model.named_parameters()}
    trainer = Trainer(model, settings, batch_factory(classification_examples(24), 4), tmp_path, stages=stages)
    with pytest.raises(RecipeError, match=r"stages\[heads\] freezes .*find_unused_parameters: true"):
        trainer.train()
    assert {name: param.requires_grad for name, param in model.named_parameters()} == before
    assert not list_checkpoints(tmp_path)
