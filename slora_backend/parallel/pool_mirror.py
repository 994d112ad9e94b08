"""Page ownership, decided on rank 0 and replayed on every other rank.

Rank 0's allocator (``RecordingPagePool``) logs each allocation and free; the log rides along
with the next message to the workers, whose ``PoolMirror`` replays it: every rank can then say
how many of its pages are free and who holds the rest, and a rank whose replay does not fit
(a page allocated twice, a free of a free page) fails loudly instead of serving wrong pages.
"""

from __future__ import annotations

import threading

from ..page_pool import ADAPTER, KV, PagePool


class PoolLog:
    """Allocations and frees not yet sent, from any of rank 0's allocators (thread-safe)."""

    def __init__(self) -> None:
        self._entries: list[tuple] = []
        self._lock = threading.Lock()

    def add(self, entry: tuple) -> None:
        with self._lock:
            self._entries.append(entry)

    def take(self) -> list[tuple]:
        with self._lock:
            entries, self._entries = self._entries, []
        return entries


class RecordingPagePool(PagePool):
    """A ``PagePool`` that logs ("allocate", pages, kind) and ("free", pages) into ``log``."""

    def __init__(self, num_pages: int, log: PoolLog, first_page: int = 0) -> None:
        super().__init__(num_pages, first_page)
        self.log = log

    def allocate(self, n: int, kind: str) -> list[int]:
        pages = super().allocate(n, kind)
        self.log.add(("allocate", pages, kind))
        return pages

    def free(self, pages: list[int]) -> None:
        super().free(pages)
        self.log.add(("free", list(pages)))


class PoolMirror:
    """A worker's record of who holds which of its ``num_pages`` pages."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._owner: dict[int, str] = {}
        self.used_by = {KV: 0, ADAPTER: 0}

    @property
    def num_free(self) -> int:
        return self.num_pages - len(self._owner)

    def replay(self, log: list[tuple]) -> None:
        for entry in log:
            if entry[0] == "allocate":
                _, pages, kind = entry
                for page in pages:
                    if page in self._owner:
                        raise RuntimeError(f"page {page} allocated while held ({self._owner[page]})")
                    self._owner[page] = kind
                self.used_by[kind] += len(pages)
            else:
                for page in entry[1]:
                    kind = self._owner.pop(page, None)
                    if kind is None:
                        raise RuntimeError(f"page {page} freed while free")
                    self.used_by[kind] -= 1
