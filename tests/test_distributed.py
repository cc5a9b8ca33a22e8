"""Two processes (gloo, CPU, launched by torchrun) reach the losses of one process with the same global batch.

The run has two stages: the model is prepared for DDP once, and the second stage freezes ``lora_A`` under the
wrapper. The shipped accelerate configs name their engine, and engines loramix cannot run fail at start.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from loramix.train import RecipeError, StageSettings, Trainer, TrainingSettings
from train_fixtures import batch_factory, classification_examples, classifier, torchrun

TESTS = Path(__file__).resolve().parent
STEPS = 4
GLOBAL_BATCH = 8

WORKER = textwrap.dedent(
    f"""
    import json, sys
    import torch
    from train_fixtures import batch_factory, classification_examples, classifier
    from loramix.train import StageSettings, Trainer, TrainingSettings

    stages = [StageSettings(name="one", max_steps=2), StageSettings(name="two", max_steps=2, frozen=["lora_A"])]
    settings = TrainingSettings(
        batch_size={GLOBAL_BATCH // 4}, gradient_accumulation_steps=2, learning_rate=1e-2,
        save_every=2, log_every=1, progress_bar=False, mixed_precision="no", use_cpu=True,
    )
    model = classifier()
    factory = batch_factory(classification_examples(32), {GLOBAL_BATCH // 4})
    trainer = Trainer(model, settings, factory, sys.argv[1], stages=stages)
    state = trainer.train()
    if trainer.accelerator.is_main_process:
        weights = {{key: value.tolist() for key, value in model.adapter_state_dict().items()}}
        losses = [record["loss"] for record in state.history]
        with open(sys.argv[2], "w") as handle:
            json.dump({{"losses": losses, "weights": weights, "world": trainer.accelerator.num_processes}}, handle)
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    """
)


def _single_process(directory) -> tuple[list[float], dict[str, torch.Tensor]]:
    settings = TrainingSettings(
        batch_size=GLOBAL_BATCH,
        learning_rate=1e-2,
        progress_bar=False,
        mixed_precision="no",
        use_cpu=True,
    )
    model = classifier()
    stages = [StageSettings(name="one", max_steps=2), StageSettings(name="two", max_steps=2, frozen=["lora_A"])]
    factory = batch_factory(classification_examples(32), GLOBAL_BATCH)
    state = Trainer(model, settings, factory, directory, stages=stages).train()
    return [record["loss"] for record in state.history], model.adapter_state_dict()


def test_two_processes_match_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result_file = tmp_path / "result.json"
    torchrun(script, [str(tmp_path / "run"), str(result_file)], 29517)
    result = json.loads(result_file.read_text())
    assert result["world"] == 2

    losses, weights = _single_process(tmp_path / "single")
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    for key, value in weights.items():
        torch.testing.assert_close(torch.tensor(result["weights"][key]), value, rtol=1e-4, atol=1e-6)
    checkpoint = tmp_path / "run" / f"checkpoint-{STEPS:08d}"
    assert (checkpoint / "rank_state_0.json").is_file() and (checkpoint / "rank_state_1.json").is_file()


CONFIGS = TESTS.parent / "recipes" / "accelerate"


def test_shipped_accelerate_configs_name_their_engine():
    import yaml

    configs = {path.stem: yaml.safe_load(path.read_text()) for path in CONFIGS.glob("*.yaml")}
    assert set(configs) == {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    assert configs["ddp"]["distributed_type"] == "MULTI_GPU" and configs["ddp"]["num_processes"] == 2
    assert configs["fsdp"]["distributed_type"] == "FSDP" and configs["fsdp"]["fsdp_config"]["fsdp_version"] == 2
    assert [configs[f"deepspeed_zero{stage}"]["deepspeed_config"]["zero_stage"] for stage in (2, 3)] == [2, 3]


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        # refused whether deepspeed is installed or not (tests/test_deepspeed.py covers what DeepSpeed runs)
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"},
            "DeepSpeed ZeRO stage 1|DeepSpeed, which cannot be imported",
        ),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1, which needs a GPU"),
    ],
)
def test_an_engine_loramix_cannot_honour_fails_at_start(tmp_path, monkeypatch, environment, message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = TrainingSettings(batch_size=4, progress_bar=False, mixed_precision="no", use_cpu=True)
    with pytest.raises(RecipeError, match=message):
        Trainer(classifier(), settings, batch_factory(classification_examples(8), 4), tmp_path)
    assert not any(tmp_path.iterdir())
