"""Local directories or Hugging Face Hub ids, where PEFT accepts either."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def resolve_pretrained_dir(name_or_path: str | Path, **hub_kwargs: Any) -> Path:
    """A local directory as it is, else a hub repository id downloaded to the local cache.

    Args:
        name_or_path: a directory, or a hub id such as ``"user/my-mixture"``.
        hub_kwargs: passed to ``huggingface_hub.snapshot_download`` (``revision``, ``token``, ``cache_dir``,
            ``local_files_only``, ...).

    Returns:
        The directory holding the files.

    Raises:
        FileNotFoundError: not a directory, and not a hub id (or the download failed: the hub's message).
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{text} is not a directory (nor a hub id such as 'user/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, **hub_kwargs))
    except Exception as error:  # offline, unknown repository, no access: one message naming the id
        raise FileNotFoundError(
            f"{text} is not a local directory and could not be fetched from the hub: {error}"
        ) from error
