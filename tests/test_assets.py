"""Tests of loramix.assets: cache, package installation guard, BIG-bench extraction, real models."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from loramix import assets

REAL_ASSETS = os.environ.get("LORAMIX_TEST_ASSETS") == "1"
DEFAULT_CACHE = assets.cache_dir()


def _cached(name: str) -> bool:
    return REAL_ASSETS or (DEFAULT_CACHE / name / ".loramix-complete").is_file()


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    assert assets.cache_dir() == tmp_path / "cache"
    assert (tmp_path / "cache").is_dir()


def test_ensure_package_returns_installed_version_and_refuses_offline(monkeypatch):
    assert assets.ensure_package("pytest") == importlib.metadata.version("pytest")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert assets.is_offline()
    with pytest.raises(assets.AssetError, match="HF_HUB_OFFLINE is set"):
        assets.ensure_package("loramix-package-that-does-not-exist")
    with pytest.raises(assets.AssetError, match=r"pytest==0.0.1 is not installed"):
        assets.ensure_package("pytest", version="0.0.1")


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_bigbench_tasks_dir_extracts_only_task_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    archive = tmp_path / assets.BIGBENCH_SDIST
    task = json.dumps({"examples": [{"input": "a", "target": "b"}]}).encode()
    with tarfile.open(archive, "w:gz") as tar:
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/simple/task.json", task)
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/multi/sub_en/task.json", task)
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/simple/README.md", b"readme")
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/simple/task.py", b"code")
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/../../evil/task.json", task)
    with pytest.raises(assets.AssetError, match="HF_HUB_OFFLINE is set"):
        assets.bigbench_tasks_dir()
    root = assets.bigbench_tasks_dir(archive=archive)
    assert root == tmp_path / "cache" / "bigbench-1.0.0" / "benchmark_tasks"
    files = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    assert files == ["multi/sub_en/task.json", "simple/task.json"]
    assert archive.is_file()
    assert assets.bigbench_tasks_dir() == root
    assert not any(path.name.startswith(".bigbench") for path in (tmp_path / "cache").iterdir())


def test_task_json_destination():
    destination = assets._task_json_destination
    assert destination("bigbench-1.0.0/bigbench/benchmark_tasks/a/task.json") == Path("a/task.json")
    assert destination("bigbench-1.0.0/bigbench/benchmark_tasks/a/b/task.json") == Path("a/b/task.json")
    assert destination("bigbench-1.0.0/bigbench/benchmark_tasks/task.json") is None
    assert destination("bigbench-1.0.0/bigbench/benchmark_tasks/a/b/c/task.json") is None
    assert destination("bigbench-1.0.0/bigbench/benchmark_tasks/a/other.json") is None


@pytest.mark.skipif(
    not (REAL_ASSETS or _installed(assets.MINILM_PACKAGE)), reason="set LORAMIX_TEST_ASSETS=1 to install MiniLM"
)
def test_minilm_loads_offline(monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    path = assets.minilm_path()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["a great movie", "an awful film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert model.config.model_type == "bert" and hidden.shape[0] == 2 and hidden.shape[-1] == 384
    assert sum(parameter.numel() for parameter in model.parameters()) == pytest.approx(22.7e6, rel=0.01)


@pytest.mark.skipif(not _cached(assets.SMOLLM2_DIR_NAME), reason="SmolLM2 not cached; set LORAMIX_TEST_ASSETS=1")
def test_smollm2_checkpoint_loads_offline(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert assets.smollm2_path() == path
    assert (path / "model.safetensors").is_file() and not (path / "pytorch_model.bin").exists()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(parameter.numel() for parameter in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0]
    # Greedy decoding would write the answer: each answer token is the argmax after its prefix.
    predicted = logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()
    assert predicted == answer_ids


@pytest.mark.skipif(not _cached(assets.BIGBENCH_DIR_NAME), reason="BIG-bench not cached; set LORAMIX_TEST_ASSETS=1")
def test_real_bigbench_layout():
    root = assets.bigbench_tasks_dir()
    assert len(list(root.glob("*/task.json"))) == 167
    assert (root / "multiemo" / "all_text_en" / "task.json").is_file()
    assert len(list(root.glob("*/*/task.json"))) == 874
