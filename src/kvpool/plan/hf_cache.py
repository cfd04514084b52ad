"""Find a repo's config.json in the local Hugging Face cache, as ``huggingface_hub`` lays it out.

Only the disk is read: nothing here touches the network. The cache folder is ``$HF_HUB_CACHE`` (or the
legacy ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``,
else ``~/.cache/huggingface/hub``; a repo ``ORG/NAME`` lives in ``models--ORG--NAME/`` with one folder per
downloaded revision under ``snapshots/`` and the commit of ``main`` in ``refs/main``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# a Hugging Face repo id: NAME or ORG/NAME, letters, digits, "-", "_", "." (no "..", no path separators)
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` is shaped like a Hugging Face repo id (``meta-llama/Llama-3.1-8B``, ``gpt2``)."""
    return bool(_REPO_ID.match(text)) and ".." not in text


def hub_cache_dir() -> Path:
    """The folder ``huggingface_hub`` downloads models into, from the environment as it reads it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _repo_folder(cache: Path, repo_id: str) -> Path | None:
    """``models--ORG--NAME`` for ``repo_id``; the Hub ignores case, so a folder differing in case matches."""
    name = "models--" + repo_id.replace("/", "--")
    exact = cache / name
    if exact.is_dir():
        return exact
    try:
        folders = [p for p in cache.iterdir() if p.name.lower() == name.lower() and p.is_dir()]
    except OSError:  # no cache, or not readable
        return None
    return sorted(folders)[0] if folders else None


def cached_config(repo_id: str) -> Path | None:
    """The cached ``config.json`` of ``repo_id``: the snapshot ``refs/main`` names, else the newest one
    holding a config.json; None when the repo (or its config.json) was never downloaded."""
    if not is_repo_id(repo_id):
        return None
    folder = _repo_folder(hub_cache_dir(), repo_id)
    if folder is None:
        return None
    snapshots = folder / "snapshots"
    try:
        main = (folder / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        main = ""
    if main and (snapshots / main / "config.json").is_file():
        return snapshots / main / "config.json"
    try:
        found = [p / "config.json" for p in snapshots.iterdir() if (p / "config.json").is_file()]
    except OSError:
        return None
    return max(found, key=lambda p: p.parent.stat().st_mtime, default=None)
