"""Adapters by Hugging Face id (``org/name``) from the local Hugging Face hub cache.

Off unless the operator sets ``EngineConfig.hf_hub_cache`` (a directory laid out by
``huggingface_hub``: ``models--<org>--<name>/refs/main`` holds the revision,
``snapshots/<revision>/`` the files, usually symlinks into ``blobs/``). Nothing is downloaded.

Rules:
- an id is ``org/name``: two parts of letters, digits, ``-``, ``_`` and ``.``, each starting
  with a letter or digit, at most 96 characters each (the Hub's own limits); nothing else with a
  ``/`` is an adapter name;
- the revision is ``refs/main``, or the only snapshot when there is no ``refs/main``;
- confined like the adapter root: the snapshot directory and the real path of every file the
  engine reads (``adapter_config.json``, ``adapter_model.safetensors``) must lie inside the cache;
- safetensors only: a snapshot without ``adapter_model.safetensors`` is refused (a pickled
  ``adapter_model.bin`` is never read).

Adapters found here are registered like first-use adapters but are not written to
``registry.json`` (its paths are relative to the adapter root); they resolve again by id after
a restart.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import AdapterNotFoundError
from .names import CONFIG_FILE, WEIGHTS_FILE, fs_path, real_path

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HF_ID = re.compile(rf"({_PART})/({_PART})")


def is_hf_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face repository id (``org/name``)."""
    return isinstance(name, str) and _HF_ID.fullmatch(name) is not None and ".." not in name


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class HfAdapterCache:
    """Finds ``org/name`` adapters in one Hugging Face hub cache directory."""

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.root = real_path(cache_dir)

    def snapshot(self, name: str) -> Path:
        """The snapshot directory of adapter ``name``; AdapterNotFoundError saying why not."""
        if not is_hf_id(name):
            raise AdapterNotFoundError(f"adapter {name!r} is not a Hugging Face id (org/name)")
        org, repo = _HF_ID.fullmatch(name).groups()  # type: ignore[union-attr]
        repo_dir = self.root / f"models--{org}--{repo}"
        if not os.path.isdir(fs_path(repo_dir)):
            raise AdapterNotFoundError(f"adapter {name!r} is not in the Hugging Face cache {self.root}")
        snapshot = repo_dir / "snapshots" / self._revision(name, repo_dir)
        real = real_path(snapshot)
        if not _inside(real, self.root) or not os.path.isdir(fs_path(real)):
            raise AdapterNotFoundError(f"adapter {name!r}: snapshot {str(snapshot)!r} is missing or "
                                       f"outside the Hugging Face cache {str(self.root)!r}")
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            target = real_path(real / file)
            if not os.path.isfile(fs_path(target)):
                raise AdapterNotFoundError(f"adapter {name!r}: {file} is missing in {str(real)!r} "
                                           "(only safetensors adapters are read)")
            if not _inside(target, self.root):
                raise AdapterNotFoundError(f"adapter {name!r}: {file} leads outside the Hugging Face "
                                           f"cache {str(self.root)!r}")
        return real

    @staticmethod
    def _revision(name: str, repo_dir: Path) -> str:
        ref = repo_dir / "refs" / "main"
        try:
            revision = open(fs_path(ref), encoding="utf-8").read().strip()
        except OSError:
            snapshots = sorted(os.listdir(fs_path(repo_dir / "snapshots"))) \
                if os.path.isdir(fs_path(repo_dir / "snapshots")) else []
            if len(snapshots) != 1:
                raise AdapterNotFoundError(
                    f"adapter {name!r}: no refs/main and {len(snapshots)} snapshots in {str(repo_dir)!r}"
                ) from None
            return snapshots[0].decode() if isinstance(snapshots[0], bytes) else snapshots[0]
        if not re.fullmatch(r"[0-9a-fA-F]{7,64}|[A-Za-z0-9._-]{1,128}", revision) or ".." in revision:
            raise AdapterNotFoundError(f"adapter {name!r}: refs/main holds no revision ({revision!r})")
        return revision
