"""The files Triton's OpenAI frontend reads to learn a model's adapters.

The frontend (``--backend vllm``) passes an adapter on (``lora_name`` in ``sampling_parameters``)
only when ``<repository>/<model>/<version>/model.json`` has ``"enable_lora": true`` and
``multi_lora.json`` beside it lists the adapter's name (as a key; the value is its path);
any other adapter name is dropped without a word and the base model answers. The engine model
writes both into the public model's newest version directory: ``model.json`` once, at start,
and ```multi_lora.json`` whenever the registered adapters change: after a load or unload, and when
``registry.json`` under the adapter root changed (a first use of an adapter directory registers
it), which the periodic ``refresh`` notices without asking the engine. Each
file is replaced atomically (written beside it, then renamed), so a reader never sees half.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from ..adapters.names import REGISTRY_FILE

__all__ = ["LORA_FILE", "MODEL_FILE", "PUBLIC_MODEL", "REGISTRY_FILE", "LoraManifest"]

MODEL_FILE = "model.json"
LORA_FILE = "multi_lora.json"
PUBLIC_MODEL = "slora"  # the ensemble clients call


def write_atomically(path: Path, data: Mapping) -> None:
    """``data`` as JSON at ``path``, replacing the file in one rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def newest_version_dir(model_dir: Path) -> Path | None:
    """The model's highest numeric version directory (what Triton serves by default)."""
    try:
        versions = [int(p.name) for p in model_dir.iterdir()
                    if p.is_dir() and re.fullmatch(r"[0-9]+", p.name)]
    except OSError:
        return None
    return model_dir / str(max(versions)) if versions else None


class LoraManifest:
    """``model.json`` and ``multi_lora.json`` of one model version directory, kept in step with
    the adapter registry. ``sync`` rewrites ``multi_lora.json`` only when the names or paths
    changed."""

    def __init__(self, version_dir: Path) -> None:
        self.version_dir = version_dir
        self._written: dict[str, str] | None = None
        self._lock = threading.Lock()  # control threads and the metrics thread both sync
        self._registry_stamp: tuple[int, int] | None = None

    @classmethod
    def for_repository(cls, repository_root: Path, model: str = PUBLIC_MODEL) -> LoraManifest | None:
        version_dir = newest_version_dir(repository_root / model)
        return cls(version_dir) if version_dir is not None else None

    def enable(self) -> None:
        """Write ``model.json`` with ``enable_lora`` (then ``sync`` the adapter list)."""
        write_atomically(self.version_dir / MODEL_FILE, {"enable_lora": True})

    def sync(self, adapters: Mapping[str, str]) -> bool:
        """Make ``multi_lora.json`` list ``adapters`` (name -> path); True when it was written."""
        wanted = dict(sorted(adapters.items()))
        with self._lock:
            if wanted == self._written:
                return False
            write_atomically(self.version_dir / LORA_FILE, wanted)
            self._written = wanted
            return True

    def refresh(self, registry_file: Path | None, adapters: Callable[[], Mapping[str, str]]) -> bool:
        """``sync(adapters())`` when ``registry_file`` changed since the last refresh (mtime and
        size), else nothing: asking the engine for its whole adapter list every metrics tick
        would cost a round trip per tick with thousands of adapters."""
        try:
            st = os.stat(registry_file) if registry_file is not None else None
        except OSError:
            st = None
        stamp = (st.st_mtime_ns, st.st_size) if st is not None else None
        if stamp == self._registry_stamp:
            return False
        self._registry_stamp = stamp
        return self.sync(adapters())
