"""Serving every task with vLLM's multi-LoRA server (scripts/serve_vllm.py): the command here, the server on a GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from loramix import MixtureConfig, get_mixture_model
from loramix.cli import main
from tiny_models import randomize_adapters

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "serve_vllm.py"


def _script():
    spec = importlib.util.spec_from_file_location("serve_vllm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_server_command_serves_every_task_at_the_exports_rank(tmp_path: Path) -> None:
    from test_export import causal_mixture

    mixture = causal_mixture(tmp_path, "more", r=16, target_modules=["q_proj", "v_proj"])
    mixture.save_pretrained(tmp_path / "mix")
    assert main(["export", "--adapter", str(tmp_path / "mix"), "--all-tasks", "--out", str(tmp_path / "all")]) == 0
    manifest = json.loads((tmp_path / "all" / "loramix_exports.json").read_text())
    ranks = {
        json.loads((tmp_path / "all" / d / "adapter_config.json").read_text())["r"] for d in manifest["tasks"].values()
    }
    command = _script().server_command(str(tmp_path / "base"), tmp_path / "all", port=8100)
    rank = int(command[command.index("--max-lora-rank") + 1])
    assert rank == manifest["vllm_max_lora_rank"] and rank >= max(ranks) and rank in (8, 16, 32)
    modules = command[command.index("--lora-modules") + 1 :]
    assert sorted(module.split("=")[0] for module in modules) == ["code", "qa", "sum"]
    assert all(Path(module.split("=")[1], "adapter_model.safetensors").is_file() for module in modules)


def _unavailable() -> str | None:
    return _script().vllm_unavailable_reason()


@pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))
def test_vllm_serves_every_task_as_loramix_generates_it(tmp_path: Path) -> None:  # pragma: no cover (GPU)
    from transformers import AutoModelForCausalLM

    from loramix import assets

    base = AutoModelForCausalLM.from_pretrained(assets.smollm2_path())
    config = MixtureConfig(
        method="moelora",
        r=8,
        num_experts=2,
        num_tasks=3,
        task_names=["a", "b", "c"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        base_model_name_or_path=str(assets.smollm2_path()),
    )
    mixture = get_mixture_model(base, config)
    randomize_adapters(mixture, std=0.02)
    mixture.save_pretrained(tmp_path / "mix")
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    report = _script().serve_and_check(str(tmp_path / "mix"), tmp_path / "exports", log=results, dtype="float32")
    assert all(row["match"] for row in report["tasks"].values()), report["tasks"]
