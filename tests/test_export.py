"""Exports that load where users load them: PEFT and transformers in a process that never imports loramix.

Causal LMs (MOELoRA, MoRE with per-layer ranks) export at one rank with ``task_type`` and short target
names; a per-task-head classifier exports as a PEFT adapter onto ``AutoModelForSequenceClassification``
and as a merged one; the CLI works from a saved mixture alone; exports never overwrite without being told.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loramix import MixtureConfig, MixtureModel, get_mixture_model
from loramix.cli import main
from loramix.export import short_target_names, vllm_max_lora_rank
from loramix.heads import MultiTaskSequenceClassifier
from tiny_models import TARGETS, VOCAB, build, randomize_adapters

torch.set_num_threads(1)
NUM_TASKS = 3
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Runs in a fresh interpreter: loads each job with PEFT / transformers only and saves its logits.
PLAIN_LOADER = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from peft import AutoPeftModelForCausalLM, PeftModel

jobs = json.loads(open(sys.argv[1]).read())
inputs = load_file(jobs["inputs"])
out, info = {}, {}
for name, job in jobs["jobs"].items():
    if job["kind"] == "auto_peft_causal":
        model = AutoPeftModelForCausalLM.from_pretrained(job["adapter"])
    elif job["kind"] == "peft_causal":
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(job["base"]), job["adapter"])
    elif job["kind"] == "peft_seq_cls":
        base = AutoModelForSequenceClassification.from_pretrained(job["base"], num_labels=job["num_labels"])
        model = PeftModel.from_pretrained(base, job["adapter"])
    elif job["kind"] == "merged_seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(job["model"])
        info[name] = {"num_labels": model.config.num_labels, "id2label": model.config.id2label,
                      "class": type(model).__name__}
    elif job["kind"] == "merged_causal":
        model = AutoModelForCausalLM.from_pretrained(job["model"])
    with torch.no_grad():
        out[name] = model.eval()(**inputs).logits.contiguous()
save_file(out, jobs["output"])
info["loramix_imported"] = any(m == "loramix" or m.startswith("loramix.") for m in sys.modules)
print(json.dumps(info))
"""


def load_without_loramix(tmp_path: Path, inputs: dict[str, torch.Tensor], jobs: dict) -> tuple[dict, dict]:
    """Run ``jobs`` in a subprocess that imports only torch/transformers/peft; its logits and info."""
    save_file({key: value.contiguous() for key, value in inputs.items()}, str(tmp_path / "inputs.safetensors"))
    spec = {"inputs": str(tmp_path / "inputs.safetensors"), "output": str(tmp_path / "out.safetensors"), "jobs": jobs}
    (tmp_path / "jobs.json").write_text(json.dumps(spec))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_LOADER, str(tmp_path / "jobs.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info.pop("loramix_imported") is False
    return load_file(str(tmp_path / "out.safetensors")), info


def smollm2_like(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama shaped like SmolLM2 (tied embeddings, grouped-query attention), in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tokens(batch_size: int = 2, seq_len: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


def causal_mixture(tmp_path: Path, method: str, **settings) -> MixtureModel:
    """A mixture on all linear layers of a SmolLM2-like model whose base is saved in ``tmp_path/base``."""
    base = smollm2_like()
    base.save_pretrained(tmp_path / "base")
    config = MixtureConfig(
        method=method,
        num_tasks=NUM_TASKS,
        task_names=["qa", "sum", "code"],
        base_model_name_or_path=str(tmp_path / "base"),
        **settings,
    )
    mixture = get_mixture_model(base, config)
    randomize_adapters(mixture)
    return mixture.eval()


def hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


# ------------------------------------------------------------------------------------------------ causal LMs
@pytest.mark.parametrize(
    ("method", "settings"),
    [("moelora", {"r": 4, "num_experts": 3}), ("more", {"r": 8})],
)
def test_causal_lm_task_loads_in_peft_without_loramix(method: str, settings: dict, tmp_path: Path) -> None:
    mixture = causal_mixture(tmp_path, method, **settings)
    inputs = tokens()
    task = 1
    with torch.no_grad():
        expected = mixture(**inputs, task_ids=torch.full((2,), task)).logits
    record = mixture.export(tmp_path / "sum", task="sum")
    mixture.export(tmp_path / "minimal", task="sum", minimal_rank=True)

    peft_config = json.loads((tmp_path / "sum" / "adapter_config.json").read_text())
    assert peft_config["task_type"] == "CAUSAL_LM"
    assert sorted(peft_config["target_modules"]) == sorted(LLAMA_TARGETS)
    assert not peft_config["rank_pattern"] and not peft_config["alpha_pattern"]
    assert peft_config["modules_to_save"] is None
    rank = peft_config["r"]
    assert peft_config["lora_alpha"] == rank == record["rank"] == max(record["layer_ranks"].values())
    tensors = load_file(str(tmp_path / "sum" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(mixture.mixture_layers())
    assert all(value.shape[0 if ".lora_A." in key else 1] == rank for key, value in tensors.items())
    info = json.loads((tmp_path / "sum" / "loramix_export.json").read_text())
    assert info["vllm"] == {"max_lora_rank": vllm_max_lora_rank(rank), "loadable": True} and info["task"] == "sum"
    assert rank == (12 if method == "moelora" else max(record["layer_ranks"].values()))
    if method == "more":  # MoRE picks a rank per layer: the uniform export pads, the minimal one does not
        assert len(set(record["layer_ranks"].values())) > 1
        minimal = json.loads((tmp_path / "minimal" / "adapter_config.json").read_text())
        assert len(set(minimal["rank_pattern"].values())) > 1

    jobs = {
        "auto": {"kind": "auto_peft_causal", "adapter": str(tmp_path / "sum")},
        "peft": {"kind": "peft_causal", "base": str(tmp_path / "base"), "adapter": str(tmp_path / "sum")},
        "minimal": {"kind": "peft_causal", "base": str(tmp_path / "base"), "adapter": str(tmp_path / "minimal")},
    }
    logits, _ = load_without_loramix(tmp_path, inputs, jobs)
    for name in jobs:
        torch.testing.assert_close(logits[name], expected, rtol=1e-4, atol=1e-5)
    base_logits = smollm2_like()(**inputs).logits
    assert (logits["auto"] - base_logits).abs().max() > 1e-3  # the adapter really changes the model


def test_short_target_names_match_exactly_the_adapted_layers() -> None:
    model = build("bert")
    names = [name for name, _ in model.named_modules() if name]
    adapted = [name for name in names if any(name.endswith("." + target) for target in TARGETS["bert"])]
    chosen = short_target_names(names, adapted)
    assert chosen == ["intermediate.dense", "key", "output.dense", "query", "value"]
    picked = {name for name in names if any(name == s or name.endswith("." + s) for s in chosen)}
    assert picked == set(adapted)  # "dense" alone would also take the pooler
    some = [name for name in adapted if ".layer.0." in name and name.endswith("query")]
    assert short_target_names(names, some) == ["0.attention.self.query"]


def test_vllm_rank_is_the_smallest_allowed() -> None:
    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 64, 65, 300, 512, 513)] == [8, 8, 16, 64, 128, 320, 512, None]


# ------------------------------------------------------------------------------------------------ classifiers
def classifier_mixture(tmp_path: Path) -> MixtureModel:
    """Two tasks of 2 and 3 labels on a tiny BERT whose encoder is saved in ``tmp_path/base``."""
    encoder = build("bert").bert
    encoder.save_pretrained(tmp_path / "base")
    model = MultiTaskSequenceClassifier(encoder, [2, 3], dropout=0.1, pooling="pooler")
    config = MixtureConfig(
        method="moelora",
        r=2,
        num_experts=2,
        num_tasks=2,
        task_names=["sentiment", "topic"],
        target_modules=["query", "value"],
        modules_to_save=["heads"],
        base_model_name_or_path=str(tmp_path / "base"),
    )
    mixture = get_mixture_model(model, config)
    randomize_adapters(mixture)
    with torch.no_grad():
        for head in model.heads:  # trained poolers differ from the base's
            head.pooler.dense.weight.add_(0.1 * torch.randn_like(head.pooler.dense.weight))
    return mixture.eval()


def test_classifier_task_loads_as_sequence_classifier_without_loramix(tmp_path: Path) -> None:
    mixture = classifier_mixture(tmp_path)
    inputs = tokens()
    with torch.no_grad():
        expected = mixture(**inputs, task_ids=torch.ones(2, dtype=torch.long)).logits[:, :3]
        other = mixture(**inputs, task_ids=torch.zeros(2, dtype=torch.long)).logits[:, :2]
    record = mixture.export(tmp_path / "adapter", task="topic")
    assert record["task_type"] == "SEQ_CLS" and sorted(record["modules_to_save"]) == ["classifier", "pooler"]
    from loramix.export import save_merged_task

    save_merged_task(mixture, tmp_path / "merged", "topic", id2label={0: "news", 1: "sport", 2: "tech"})
    save_merged_task(mixture, tmp_path / "merged0", 0)
    jobs = {
        "peft": {"kind": "peft_seq_cls", "base": str(tmp_path / "base"), "adapter": str(tmp_path / "adapter"),
                 "num_labels": 3},
        "merged": {"kind": "merged_seq_cls", "model": str(tmp_path / "merged")},
        "merged0": {"kind": "merged_seq_cls", "model": str(tmp_path / "merged0")},
    }  # fmt: skip
    logits, info = load_without_loramix(tmp_path, inputs, jobs)
    torch.testing.assert_close(logits["peft"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits["merged"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits["merged0"], other, rtol=1e-4, atol=1e-5)
    assert info["merged"] == {
        "num_labels": 3,
        "id2label": {"0": "news", "1": "sport", "2": "tech"},
        "class": "BertForSequenceClassification",
    }
    assert info["merged0"]["num_labels"] == 2


def test_mean_pooled_classifier_refuses_to_export_and_writes_nothing(tmp_path: Path) -> None:
    model = MultiTaskSequenceClassifier(build("bert").bert, [2, 2])  # mean pooling, the default
    config = MixtureConfig(
        method="moelora", r=2, num_experts=2, num_tasks=2, target_modules=["query"], modules_to_save=["heads"]
    )
    mixture = get_mixture_model(model, config)
    with pytest.raises(ValueError, match="mean-pools"):
        mixture.export(tmp_path / "out", task=0)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_exports_every_task_from_a_saved_mixture_alone(tmp_path: Path, capsys) -> None:
    mixture = causal_mixture(tmp_path, "moelora", r=2, num_experts=2, target_modules=["q_proj", "v_proj"])
    mixture.save_pretrained(tmp_path / "mix")
    inputs = tokens()
    argv = ["export", "--adapter", str(tmp_path / "mix"), "--all-tasks", "--out", str(tmp_path / "all")]
    assert main([*argv, "--base-model", str(tmp_path / "base")]) == 0
    assert "--max-lora-rank 8" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "all" / "loramix_exports.json").read_text())
    assert manifest["tasks"] == {"qa": "qa", "sum": "sum", "code": "code"} and manifest["vllm_max_lora_rank"] == 8
    from peft import PeftModel

    for task, folder in manifest["tasks"].items():
        with torch.no_grad():
            expected = mixture(**inputs, task_ids=[task, task]).logits
            loaded = PeftModel.from_pretrained(smollm2_like(), tmp_path / "all" / folder).eval()
            torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
    # the config's base_model_name_or_path is enough; merge writes a plain model
    assert main(["merge", "--adapter", str(tmp_path / "mix"), "--task", "code", "--out", str(tmp_path / "m")]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        expected = mixture(**inputs, task_ids=["code", "code"]).logits
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-5)


def test_cli_merges_a_classifier_task_from_a_saved_mixture(tmp_path: Path) -> None:
    mixture = classifier_mixture(tmp_path)
    mixture.save_pretrained(tmp_path / "mix")
    argv = ["merge", "--adapter", str(tmp_path / "mix"), "--task", "topic", "--out", str(tmp_path / "merged")]
    assert main(argv) == 0
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    inputs = tokens()
    with torch.no_grad():
        expected = mixture(**inputs, task_ids=["topic", "topic"]).logits[:, :3]
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
    assert merged.config.num_labels == 3


def test_cli_version(capsys) -> None:
    from loramix import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"loramix {__version__}"


# ------------------------------------------------------------------------------------------------ overwriting
def test_exports_refuse_non_empty_directories_and_change_nothing(tmp_path: Path, capsys) -> None:
    mixture = causal_mixture(tmp_path, "moelora", r=2, num_experts=2, target_modules=["q_proj"])
    mixture.save_pretrained(tmp_path / "mix")
    mixture.save_pretrained(tmp_path / "other")
    before = {name: hashes(tmp_path / name) for name in ("mix", "other")}
    capsys.readouterr()
    for out, extra in (("mix", []), ("mix", ["--overwrite"]), ("other", []), (".", ["--overwrite"])):
        for command in ("export", "merge"):
            argv = [command, "--adapter", str(tmp_path / "mix"), "--task", "qa", "--out", str(tmp_path / out)]
            assert main([*argv, *extra]) == 2
            error = capsys.readouterr().err
            assert error.count("\n") == 1 and ("not empty" in error or "would replace the adapter" in error)
    assert main(["export", "--adapter", str(tmp_path / "mix"), "--all-tasks", "--out", str(tmp_path / "other")]) == 2
    assert {name: hashes(tmp_path / name) for name in ("mix", "other")} == before
    # told to overwrite, another directory is replaced as a whole
    argv = ["export", "--adapter", str(tmp_path / "mix"), "--task", "qa", "--out", str(tmp_path / "other")]
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(hashes(tmp_path / "other")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loramix_export.json",
    ]
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
    # a method routed on the input has no task to export: one line, exit 2, nothing written
    routed = get_mixture_model(smollm2_like(), MixtureConfig(method="mixlora", r=2, num_experts=2, num_tasks=3))
    routed.save_pretrained(tmp_path / "routed")
    capsys.readouterr()
    argv = ["export", "--adapter", str(tmp_path / "routed"), "--task", "0", "--out", str(tmp_path / "r")]
    assert main([*argv, "--base-model", str(tmp_path / "base")]) == 2
    assert "routes on the input" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_failed_export_leaves_no_directory_and_the_old_one_intact(tmp_path: Path, monkeypatch) -> None:
    import loramix.export

    mixture = causal_mixture(tmp_path, "moelora", r=2, num_experts=2, target_modules=["q_proj"])
    mixture.export(tmp_path / "old", task=0)
    before = hashes(tmp_path / "old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loramix.export, "save_file", broken)
    for out, overwrite in (("new", False), ("old", True)):
        with pytest.raises(OSError, match="disk full"):
            mixture.export(tmp_path / out, task=1, overwrite=overwrite)
    assert not (tmp_path / "new").exists() and hashes(tmp_path / "old") == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base", "old"]


# ------------------------------------------------------------------------------------------------ disable_adapter
def test_disable_adapter_gives_the_base_model_exactly(tmp_path: Path) -> None:
    reference = smollm2_like()
    mixture = causal_mixture(tmp_path, "moelora", r=2, num_experts=2)
    inputs = tokens()
    with torch.no_grad():
        adapted = mixture(**inputs, task_ids=[0, 1]).logits
        with mixture.disable_adapter():
            plain = mixture(**inputs, task_ids=[0, 1]).logits
            generated = mixture.generate(**inputs, task_ids=[0, 1], max_new_tokens=3, do_sample=False)
        again = mixture(**inputs, task_ids=[0, 1]).logits
        base_generated = reference.generate(**inputs, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(plain, reference(**inputs).logits, rtol=0, atol=0)
    assert torch.equal(generated, base_generated)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)
    assert (adapted - plain).abs().max() > 1e-3
    assert len(mixture.mixture_layers()) == 7 * 2


def test_from_pretrained_takes_a_directory_as_a_string(tmp_path: Path) -> None:
    mixture = causal_mixture(tmp_path, "moelora", r=2, num_experts=2, target_modules=["q_proj"])
    mixture.save_pretrained(tmp_path / "mix")
    restored = MixtureModel.from_pretrained(copy.deepcopy(smollm2_like()), str(tmp_path / "mix"))
    inputs = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            restored(**inputs, task_ids=[2, 0]).logits, mixture(**inputs, task_ids=[2, 0]).logits, rtol=0, atol=0
        )
    with pytest.raises(FileNotFoundError, match="not a directory"):
        MixtureModel.from_pretrained(smollm2_like(), str(tmp_path / "missing" / "dir"))


# ------------------------------------------------------------------------------------------------ hub round trip
def test_push_to_hub_then_from_pretrained_by_hub_id(tmp_path: Path, monkeypatch) -> None:
    """Offline: a stand-in for the hub client keeps uploads in a folder; the hub id loads the same mixture."""
    import shutil

    import huggingface_hub

    hub = tmp_path / "hub"
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok, self.token))

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            calls.append(("upload", repo_id, sorted(path.name for path in Path(folder_path).iterdir()), revision))
            shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)
            return "commit"

    def fake_download(repo_id, **kwargs):
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    mixture = causal_mixture(tmp_path, "moelora", r=2, num_experts=2, target_modules=["q_proj"])
    assert mixture.push_to_hub("me/mix", private=True, token="t") == "commit"
    assert calls == [
        ("create", "me/mix", True, True, "t"),
        ("upload", "me/mix", ["adapter_model.safetensors", "loramix_config.json"], None),
    ]
    restored = MixtureModel.from_pretrained(copy.deepcopy(smollm2_like()), "me/mix")
    inputs = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            restored(**inputs, task_ids=[1, 2]).logits, mixture(**inputs, task_ids=[1, 2]).logits, rtol=0, atol=0
        )
