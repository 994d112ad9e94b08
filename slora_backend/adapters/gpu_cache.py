"""Which adapters are resident in the unified pool, who pins them, and whom to evict.

Plain Python over page ids: the scheduler asks it for room, and the model runner copies the
weights of newly resident adapters (``take_pending``) into their pages before the next forward.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..page_pool import ADAPTER, PagePool
from .host_store import AdapterStore


@dataclass
class ResidentAdapter:
    name: str
    pages: list[int]
    pins: int = 0  # running requests using it; pinned adapters are never evicted


class AdapterCache:
    def __init__(
        self, pool: PagePool, store: AdapterStore,
        copying: Callable[[str], bool] = lambda name: False,
    ) -> None:
        """``copying(name)``: whether ``name``'s weights may still be in flight to its pages;
        such an adapter is not evictable (its pages must not change hands under the copy)."""
        self.pool = pool
        self.store = store
        self.copying = copying
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU first
        self._pending: list[ResidentAdapter] = []
        self.loads = 0
        self.evictions = 0
        self.hits = 0
        self.misses = 0
        self.prefetches = 0

    def __contains__(self, name: str) -> bool:
        return name in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def get(self, name: str) -> ResidentAdapter:
        return self._resident[name]

    def pages_to_admit(self, name: str | None) -> int:
        """Pages a request for ``name`` needs for its adapter (0 if resident or base model)."""
        if name is None or name in self._resident:
            return 0
        return self.store.get(name).plan.num_pages

    def _evictable(self) -> list[ResidentAdapter]:
        """Unpinned adapters whose copy is done, least recently used first."""
        return [r for r in self._resident.values() if r.pins == 0 and not self.copying(r.name)]

    def evictable_pages(self) -> int:
        return sum(len(r.pages) for r in self._evictable())

    def make_room(self, num_pages: int) -> bool:
        """Evict unpinned adapters, least recently used first, until ``num_pages`` are free."""
        if self.pool.num_free + self.evictable_pages() < num_pages:
            return False
        for name in [r.name for r in self._evictable()]:
            if self.pool.num_free >= num_pages:
                break
            self.evict(name)
        return True

    def acquire(self, name: str) -> bool:
        """Pin ``name``, making it resident if needed. False (and nothing changed) if no room."""
        resident = self._resident.get(name)
        if resident is None:
            need = self.store.get(name).plan.num_pages
            if not self.make_room(need):
                return False
            resident = self._make_resident(name, need)
            self.misses += 1
        else:
            self.hits += 1
        resident.pins += 1
        self._resident.move_to_end(name)
        return True

    def prefetch(self, name: str, keep_free: int) -> bool:
        """Make ``name`` resident (unpinned) ahead of its request, using only free pages beyond
        ``keep_free``, so prefetching never evicts anything or starves running requests of KV."""
        if name in self._resident:
            return True
        need = self.store.get(name).plan.num_pages
        if self.pool.num_free - keep_free < need:
            return False
        self._make_resident(name, need)
        self.prefetches += 1
        return True

    def _make_resident(self, name: str, num_pages: int) -> ResidentAdapter:
        """Give ``name`` pages (free ones: the caller made room) and queue its weights' copy."""
        resident = ResidentAdapter(name, self.pool.allocate(num_pages, ADAPTER))
        self._resident[name] = resident
        self._pending.append(resident)
        self.loads += 1
        return resident

    def release(self, name: str) -> None:
        resident = self._resident[name]
        if resident.pins <= 0:
            raise RuntimeError(f"adapter {name!r} released more often than acquired")
        resident.pins -= 1

    def evict(self, name: str) -> None:
        resident = self._resident.pop(name)
        if resident.pins or self.copying(name):
            self._resident[name] = resident
            raise RuntimeError(f"adapter {name!r} is pinned by {resident.pins} requests"
                               if resident.pins else f"adapter {name!r} is still being copied in")
        if resident in self._pending:
            self._pending.remove(resident)
        self.pool.free(resident.pages)
        self.evictions += 1

    def take_pending(self) -> list[ResidentAdapter]:
        """Adapters made resident since the last call, whose weights must now be copied in."""
        pending, self._pending = self._pending, []
        return pending
