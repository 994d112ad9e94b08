"""The disk tier: adapter names -> directories under the adapter root, persisted across restarts.

``<adapter_root>/registry.json`` maps each registered name to its path relative to the root;
the engine reads it at start so a restarted server serves the same set. Paths are resolved
(symlinks included) and refused unless they stay under the root; names follow ``names.py``.
Loading a name again with the path it is registered with is a no-op that describes it (a
script that loads its adapters can run twice against one root).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import AdapterBusyError, AdapterExistsError, AdapterLoadError, AdapterNotFoundError
from .gpu_cache import AdapterCache
from .hf_cache import HfAdapterCache, is_hf_id
from .host_store import AdapterStore
from .names import REGISTRY_FILE, check_adapter_name, resolve_under_root

log = logging.getLogger(__name__)


@dataclass
class AdapterInfo:
    name: str
    path: str
    rank: int
    ranks: dict[str, int]
    target_modules: list[str]
    lora_alpha: float
    use_rslora: bool
    size_bytes: int
    pages: int
    residency: str  # "gpu" (in the pool), "host" (in memory), "disk" (registered only)
    active_requests: int
    total_requests: int

    def to_dict(self) -> dict:
        return asdict(self)


class AdapterRegistry:
    def __init__(self, root: str | None, store: AdapterStore, cache: AdapterCache,
                 hf_cache: HfAdapterCache | None = None) -> None:
        self.root = Path(root).resolve() if root else None
        self.store = store
        self.cache = cache
        self.hf_cache = hf_cache  # "org/name" ids resolve here when set (hf_cache.py)

    @property
    def _file(self) -> Path | None:
        return self.root / REGISTRY_FILE if self.root else None

    def restore(self) -> None:
        """Register what ``registry.json`` lists; entries that no longer validate are skipped."""
        if self._file is None or not self._file.is_file():
            return
        try:
            saved = json.loads(self._file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable %s: %s", self._file, e)
            return
        for name, rel in saved.get("adapters", {}).items():
            try:
                self.store.register(name, resolve_under_root(self.root, rel))
            except AdapterLoadError as e:
                log.warning("registry entry %r skipped: %s", name, e)

    def _save(self) -> None:
        if self._file is None:
            return
        adapters = {  # (Hugging Face ids are not kept: they resolve again by id)
            name: os.path.relpath(self.store.get(name).path, self.root) for name in self.store.names()
            if not is_hf_id(name)
        }
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"adapters": adapters}, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(self._file)

    def load(self, name: str, path: str, active: dict[str, int]) -> AdapterInfo:
        """Register ``name`` for the adapter at ``path``; if ``name`` is registered already,
        describe it when the paths agree and refuse otherwise."""
        check_adapter_name(name)
        real = resolve_under_root(self.root, path)
        if name in self.store:
            registered = self.store.get(name).path
            if registered != real:
                raise AdapterExistsError(
                    f"adapter {name!r} is registered with path {str(registered)!r}, not "
                    f"{str(real)!r}; unload it first to register another adapter under that name")
            return self.describe(name, active)
        self.store.register(name, real)
        self._save()
        return self.describe(name, active)

    def unload(self, name: str, active: dict[str, int]) -> None:
        self.store.get(name)  # raises AdapterNotFoundError
        if active.get(name):
            raise AdapterBusyError(
                f"adapter {name!r} is used by {active[name]} requests; unload it when they finish"
            )
        if name in self.cache:
            self.cache.evict(name)
        self.store.unregister(name)
        self._save()

    def resolve(self, name: str, active: dict[str, int]) -> AdapterInfo:
        if name not in self.store and self.hf_cache is not None and is_hf_id(name):
            self.store.register(name, self.hf_cache.snapshot(name), hf_id=True)
            return self.describe(name, active)
        if name not in self.store:
            check_adapter_name(name, AdapterNotFoundError)
            if self.root is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered")
            try:
                path = resolve_under_root(self.root, name)
            except AdapterLoadError:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered") from None
            if not path.is_dir():
                raise AdapterNotFoundError(
                    f"adapter {name!r} is not registered and {self.root} has no directory of that name"
                )
            return self.load(name, name, active)
        return self.describe(name, active)

    def list(self, active: dict[str, int]) -> list[AdapterInfo]:
        return [self.describe(name, active) for name in self.store.names()]

    def describe(self, name: str, active: dict[str, int]) -> AdapterInfo:
        entry = self.store.get(name)
        if name in self.cache:
            residency = "gpu"
        elif entry.weights is not None:
            residency = "host"
        else:
            residency = "disk"
        return AdapterInfo(
            name=name,
            path=str(entry.path),
            rank=entry.rank,
            ranks=dict(entry.ranks),
            target_modules=list(entry.ranks),
            lora_alpha=entry.lora_alpha,
            use_rslora=entry.use_rslora,
            size_bytes=entry.size_bytes,
            pages=entry.plan.num_pages,
            residency=residency,
            active_requests=active.get(name, 0),
            total_requests=entry.total_requests,
        )
