"""DeepSpeed ZeRO-2 and ZeRO-3 as ``accelerate launch`` starts them, on the CPU with gloo (2 processes).

The launch's environment (``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_DEEPSPEED_ZERO_STAGE``, as
``accelerate launch --config_file recipes/accelerate/deepspeed_zero{2,3}.yaml`` sets it) reaches the same
objective as one process: 2 processes x 2 rows x accumulation 2 == 1 process x 8 (losses, gradient norms and
weights to 1e-5, MoRE's gradient norm above the recipe's ``max_grad_norm`` so DeepSpeed's clipping is what
makes them equal), the adapter written once loads in a fresh process, and kill + resume under the engine ends
where the uninterrupted run ends; two stages with a NaN step (skipped by the engine) match one process too.
What loramix cannot honour under DeepSpeed fails at start.

Needs the ``deepspeed`` package (``pip install 'loramix[deepspeed]'``); without it these tests skip, except
the one checking the message a user without it gets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from generation_fixtures import causal_lm, generation_examples, generation_factory
from loramix import MixtureModel
from loramix.train import RecipeError, StageSettings, Trainer, TrainingSettings
from loramix.train.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
from test_objective import EXAMPLES, METHODS, _assert_same, _torchrun, _train
from tiny_models import build

TESTS = Path(__file__).resolve().parent

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED,
    reason="deepspeed is not installed (pip install 'loramix[deepspeed]'; not part of the test extra because "
    "DeepSpeed compiles a shared-memory op with the C++ compiler the first time it starts on the CPU)",
)


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory) -> dict[str, dict]:
    """Each method trained in one process with one batch of 8 per step (DeepSpeed's reference)."""
    root = tmp_path_factory.mktemp("one")
    return {method: _train(method, 8, 1, root / method) for method in METHODS}


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_run(request, tmp_path_factory) -> tuple[int, dict, object]:
    """Each method under ZeRO-``stage`` on 2 gloo processes with accumulation 2, and a crash + resume run."""
    stage = request.param
    tmp_path = tmp_path_factory.mktemp(f"zero{stage}")
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}
    if stage == 3:
        # ZeRO-3 keeps a parameter below stage3_param_persistence_threshold (10^5 elements by default: every
        # parameter of the tiny model) whole on every rank; at 0 each one is partitioned, as a large model's are,
        # so the routers' parameters, read outside their own modules' forward, come from shards
        recipe_keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
        config = {
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            **dict.fromkeys((*recipe_keys, "gradient_clipping"), "auto"),  # the recipe decides them
        }
        (tmp_path / "zero3.json").write_text(json.dumps(config))
        env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "zero3.json")}
    results = _torchrun(tmp_path, 29530 + stage, env, "--resume-check", "--accumulation=2")
    return stage, results, tmp_path


@needs_deepspeed
def test_zero_processes_equal_one_process_with_deepspeed_clipping(zero_run, one_batch):
    stage, results, _ = zero_run
    for method in METHODS:
        got = results[method]
        assert got["world"] == 2 and got["engine"] == "DEEPSPEED"
        # ZeRO-3 partitions the parameters themselves, every one of them here (the adapter is gathered);
        # ZeRO-2 keeps them whole
        assert got["sharded"] is (stage == 3)
        assert got["partitioned"] == (got["parameters"] if stage == 3 else 0)
        _assert_same(got, one_batch[method])
        # the logged norm is the one before clipping, as in one process
        assert got["grad_norms"] == pytest.approx(one_batch[method]["grad_norms"], rel=1e-5)
    # MoRE's gradients exceed max_grad_norm (1.0): its weights agree only because DeepSpeed clipped them
    assert min(one_batch["more"]["grad_norms"]) > TrainingSettings().max_grad_norm


@needs_deepspeed
def test_zero_adapter_loads_in_a_fresh_process(zero_run, one_batch):
    _, _, tmp_path = zero_run
    for method in METHODS:
        loaded = MixtureModel.from_pretrained(build("llama"), tmp_path / "run" / method / "adapter")
        for key, value in one_batch[method]["weights"].items():
            torch.testing.assert_close(loaded.adapter_state_dict()[key], value, rtol=1e-5, atol=1e-5)


@needs_deepspeed
def test_zero_crash_and_resume_ends_where_the_uninterrupted_run_ends(zero_run):
    _, results, tmp_path = zero_run
    resumed, uninterrupted = results["resumed"], results[METHODS[0]]
    assert resumed["losses"] == uninterrupted["losses"][2:]
    assert resumed["weights"] == uninterrupted["weights"]
    # each rank's optimizer partition is in the checkpoint, and under the checksums
    checkpoint = list_checkpoints(tmp_path / "run" / "crashed")[0]
    digests = json.loads((checkpoint / "checksums.json").read_text())
    partitions = sorted(name for name in digests if name.startswith("deepspeed/") and "optim_states" in name)
    assert len(partitions) == 2 and verify_checkpoint(checkpoint) == []


@needs_deepspeed
def test_a_deepspeed_checkpoint_is_refused_without_deepspeed(zero_run, tmp_path):
    """Resuming a ZeRO checkpoint in a run without DeepSpeed names the engine and leaves the files as they were."""
    _, _, run_path = zero_run
    output = tmp_path / "run"
    shutil.copytree(run_path / "run" / "crashed", output)
    checkpoint = list_checkpoints(output)[0]

    def digest() -> dict[str, str]:
        files = sorted(path for path in checkpoint.rglob("*") if path.is_file())
        return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}

    before = digest()
    settings = TrainingSettings(
        max_steps=3, batch_size=4, learning_rate=1e-2, progress_bar=False, mixed_precision="no", use_cpu=True
    )
    trainer = Trainer(causal_lm("moelora"), settings, generation_factory(EXAMPLES, 4), output)
    with pytest.raises(CheckpointError, match="written under DeepSpeed"):
        trainer.train(resume_from=checkpoint)
    assert digest() == before


STAGES_WORKER = textwrap.dedent(
    """
    import json, sys
    from generation_fixtures import causal_lm, generation_examples, generation_factory
    from loramix.train import StageSettings, Trainer, TrainingSettings
    from loramix.train.checkpoint import gather_adapter_state

    output, result, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    poison = {"on": False}

    def nan_logits(module, inputs, out):
        return out * float("nan") if poison["on"] else out

    def callback(state):
        poison["on"] = state.global_step == 1  # the second step sees NaN logits

    stages = [
        StageSettings(name="one", max_steps=2),
        StageSettings(name="two", max_steps=2, learning_rate=5e-3, lr_multipliers={"router": 3.0}),
    ]
    settings = TrainingSettings(
        batch_size=batch, learning_rate=1e-2, progress_bar=False, mixed_precision="no", use_cpu=True
    )
    model = causal_lm("moelora")
    model.base_model.lm_head.register_forward_hook(nan_logits)
    factory = generation_factory(generation_examples(32), batch)
    trainer = Trainer(model, settings, factory, output, stages=stages, callbacks=[callback])
    state = trainer.train()
    weights = {key: value.tolist() for key, value in gather_adapter_state(model).items()}
    if trainer.accelerator.is_main_process:
        history = state.history
        data = {
            "engine": trainer.accelerator.distributed_type.name,
            "losses": [record["loss"] for record in history],
            "lrs": [record["lr"] for record in history],
            "skipped": [record["skipped"] for record in history],
            "weights": weights,
        }
        with open(result, "w") as handle:
            json.dump(data, handle)
    """
)


def _run_stages_worker(tmp_path, name: str, launcher: list[str], batch: int, env: dict[str, str]) -> dict:
    script = tmp_path / "stages_worker.py"
    script.write_text(STAGES_WORKER)
    result = tmp_path / f"{name}.json"
    environment = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [sys.executable, *launcher, str(script), str(tmp_path / name), str(result), str(batch)]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300, check=False)
    if completed.returncode != 0:
        pytest.fail(f"{name} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")
    return json.loads(result.read_text())


@needs_deepspeed
def test_zero2_stages_and_a_nonfinite_step_match_one_process(tmp_path):
    """Two stages (new learning rates and multipliers, AdamW restarted) and a NaN step the engine skips."""
    one = _run_stages_worker(tmp_path, "one", [], 8, {})
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29539"]
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    zero = _run_stages_worker(tmp_path, "zero2", launcher, 4, env)
    assert zero["engine"] == "DEEPSPEED" and one["engine"] == "NO"
    assert one["skipped"] == zero["skipped"] == [False, True, False, False]
    assert math.isnan(zero["losses"][1])
    finite = [0, 2, 3]
    assert [zero["losses"][i] for i in finite] == pytest.approx([one["losses"][i] for i in finite], rel=1e-5)
    assert zero["lrs"] == pytest.approx(one["lrs"], rel=1e-6)
    for key, value in one["weights"].items():
        torch.testing.assert_close(torch.tensor(zero["weights"][key]), torch.tensor(value), rtol=1e-5, atol=1e-5)
        assert all(math.isfinite(x) for x in torch.tensor(zero["weights"][key]).flatten().tolist())


# ---------------------------------------------------------------------- refused at start
def _deepspeed_env(monkeypatch, stage: int = 2, **variables: str) -> None:
    for name in ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def _trainer(tmp_path, stages=None, **overrides) -> Trainer:
    values = {"max_steps": 2, "batch_size": 4, "progress_bar": False, "mixed_precision": "no", "use_cpu": True}
    settings = TrainingSettings(**{**values, **overrides})
    examples = generation_examples(8)
    return Trainer(causal_lm("moelora"), settings, generation_factory(examples, 4), tmp_path / "run", stages=stages)


REFUSALS = [
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, {}, None, "gradient_accumulation_steps: 4 but the recipe"),
    ({"ACCELERATE_GRADIENT_CLIPPING": "0.5"}, {}, None, "gradient_clipping: 0.5 but the recipe asks for 1.0"),
    ({"ACCELERATE_GRADIENT_CLIPPING": "1.0"}, {"max_grad_norm": None}, None, "gradient_clipping: 1.0 but"),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, {}, None, "ZeRO stage 1"),
    ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "train_batch_size=64"}, {}, None, "train_batch_size: 64 but the recipe"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, {}, None, "offload_optimizer.device='cpu'"),
    ({}, {"mixed_precision": "bf16"}, None, "mixed_precision='bf16' under DeepSpeed on the CPU"),
    (
        {},
        {},
        [StageSettings(name="a", max_steps=1), StageSettings(name="b", max_steps=1, frozen=["lora_A"])],
        "freezes",
    ),
    ({}, {}, [StageSettings(name="a", max_steps=1), StageSettings(name="b", max_steps=1, max_grad_norm=0)], "same max"),
]


@needs_deepspeed
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusals (mixed precision, use_cpu)")
@pytest.mark.parametrize(("variables", "settings", "stages", "message"), REFUSALS)
def test_what_deepspeed_cannot_honour_is_refused_at_start(monkeypatch, tmp_path, variables, settings, stages, message):
    if "ACCELERATE_DEEPSPEED_CONFIG_FILE" in variables:  # a DeepSpeed JSON config with this one setting
        key, value = variables["ACCELERATE_DEEPSPEED_CONFIG_FILE"].split("=")
        config = tmp_path / "ds_config.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": 2}, key: int(value)}))
        variables = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)}
    _deepspeed_env(monkeypatch, **variables)
    with pytest.raises(RecipeError, match=message):
        _trainer(tmp_path, stages=stages, **settings)
    assert not (tmp_path / "run").exists()


@needs_deepspeed
def test_a_deepspeed_config_with_its_own_optimizer_is_refused(monkeypatch, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(
        json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    )
    _deepspeed_env(monkeypatch, ACCELERATE_DEEPSPEED_CONFIG_FILE=str(config))
    with pytest.raises(RecipeError, match="defines 'optimizer'"):
        _trainer(tmp_path)


def test_deepspeed_missing_is_named_at_start(monkeypatch, tmp_path):
    _deepspeed_env(monkeypatch)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    with pytest.raises(RecipeError, match=r"pip install 'loramix\[deepspeed\]'"):
        _trainer(tmp_path)
    assert not (tmp_path / "run").exists()
