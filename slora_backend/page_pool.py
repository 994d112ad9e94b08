"""The unified page pool's allocator: integer page ids, one free list, one budget.

The pool tensor itself lives in the model runner; this class only hands out page indices and
counts who holds them, so scheduling and accounting stay plain Python.
"""

from __future__ import annotations

from collections import deque

KV = "kv"
ADAPTER = "adapter"


class PoolExhaustedError(RuntimeError):
    """Raised when more pages are asked for than are free (a scheduler bug, not user error)."""


class PagePool:
    def __init__(self, num_pages: int, first_page: int = 0) -> None:
        """Pages ``first_page .. first_page + num_pages - 1`` of the pool tensor."""
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(first_page, first_page + num_pages))
        self._owner: dict[int, str] = {}
        self.used_by = {KV: 0, ADAPTER: 0}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int, kind: str) -> list[int]:
        if n > len(self._free):
            raise PoolExhaustedError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._owner[p] = kind
        self.used_by[kind] += n
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            kind = self._owner.pop(p)  # KeyError here means a double free
            self.used_by[kind] -= 1
            self._free.append(p)

    def check_empty(self) -> bool:
        """True when every page is back on the free list."""
        return len(self._free) == self.num_pages and not self._owner
