"""``AdapterManager``: the adapter lifecycle, disk -> host -> GPU pool, behind one object.

A ``lora_name`` travels one way through it:

1. ``entry_for(name)``: the name (``names.py``) -> its registry entry (``registry.py``, which
   registers ``<adapter_root>/<name>`` on first use, validated by ``validation.py``);
2. ``ready(name)``: before admission, its weights in host memory (``host_reads.py`` reads them
   on helper threads with ``reader.py`` into ``host_store.py``);
3. the scheduler pins it in the pool (``gpu_cache.py``), and ``before_launch`` copies newly
   resident adapters into their pages (``copier.py``) and waits for the step's own copies;
4. the model runner writes its table rows (``tables.py``) and the kernels read its pages.

Locks: management calls (load, unload, list, describe, resolve) take the manager's registry
lock; unload also holds the engine's step lock (``between_steps``), since it frees pool pages.
Everything else runs on the engine thread, inside a step.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, TypeVar

import torch

from ..errors import SLoRAError
from ..layout import PoolLayout
from ..page_pool import ADAPTER, PagePool
from .copier import AdapterCopier, CopyFn
from .gpu_cache import AdapterCache
from .hf_cache import HfAdapterCache
from .host_reads import HostReads
from .host_store import AdapterStore
from .registry import AdapterInfo, AdapterRegistry
from .validation import AdapterEntry

if TYPE_CHECKING:
    from ..request import Request

T = TypeVar("T")


class AdapterManager:
    """Owns the adapter tiers (``registry``, ``store``, ``reads``, ``cache``, ``copier``) and
    their locks. ``active_counts()`` (requests per adapter name, queued or running) and
    ``between_steps()`` (a context holding the engine's step lock) come from the engine;
    ``store_type`` reads weights into host memory (a tensor-parallel rank reads its shard)."""

    def __init__(
        self, layout: PoolLayout, pool: PagePool, dtype: torch.dtype, *,
        adapter_root: str | None, host_budget_bytes: int, hf_hub_cache: str | None = None, pin_memory: bool,
        preload: bool, prefetch: bool, max_prefetch: int,
        active_counts: Callable[[], dict[str, int]],
        between_steps: Callable[[], contextlib.AbstractContextManager[None]],
        store_type: type[AdapterStore] = AdapterStore,
    ) -> None:
        self.store = store_type(layout, dtype, host_budget_bytes, pin_memory)
        self.cache = AdapterCache(pool, self.store, copying=lambda name: self.copier.in_flight(name))
        self.registry = AdapterRegistry(adapter_root, self.store, self.cache,
                                        HfAdapterCache(hf_hub_cache) if hf_hub_cache else None)
        self.reads = HostReads(self.store)
        self.copier: AdapterCopier = AdapterCopier(_not_attached, self.reads.record_failure, False)
        self.preload = preload
        self.prefetch = prefetch
        self.max_prefetch = max_prefetch
        self._active_counts = active_counts
        self._between_steps = between_steps
        self._forget: Callable[[str], None] = _nothing_to_forget
        self._lock = threading.Lock()  # the registry lock
        self.registry.restore()

    def attach_runner(self, copy: CopyFn, forget: Callable[[str], None], background: bool) -> None:
        """Connect the model runner, which is built after the manager (it reads the store):
        ``copy`` writes an adapter's weights into its pages (on a helper thread when
        ``background``), ``forget(name)`` drops what the runner keeps of an unloaded adapter
        (its host table rows; under tensor parallelism, every rank's copy)."""
        self.copier = AdapterCopier(copy, self.reads.record_failure, background)
        self._forget = forget

    def detach_runner(self) -> None:
        """Drop the references to the model runner (``Engine.close``: its memory goes back);
        later copies fail with a clear error."""
        self.copier = AdapterCopier(_not_attached, self.reads.record_failure, False)
        self._forget = _nothing_to_forget

    @property
    def pool(self) -> PagePool:
        """The pages adapters live in: the KV pool (unified paging) or their own partition."""
        return self.cache.pool

    def start_preloads(self) -> None:
        if self.preload:
            self.reads.preload(self.store.names())

    # ---- management (any thread) --------------------------------------------------------------

    # Registering, listing and describing only add to or read the store's dict of entries, which
    # the engine thread reads but never iterates: they take the registry lock, not the step lock,
    # so a busy engine never delays them (the ensemble resolves an adapter for every request).

    def load(self, name: str, path: str) -> AdapterInfo:
        with self._lock:
            info = self.registry.load(name, path, self._active_counts())
        if self.preload:
            self.reads.preload([name])
        return info

    def unload(self, name: str) -> None:
        """Unregister ``name`` (refused while requests use it); frees its pool pages."""
        with self._lock, self._between_steps():
            self.copier.wait([name])  # its pages go back to the pool: no copy may still write them
            self.registry.unload(name, self._active_counts())
            self._forget(name)

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return self.registry.list(self._active_counts())

    def describe(self, name: str) -> AdapterInfo:
        with self._lock:
            return self.registry.describe(name, self._active_counts())

    def resolve(self, name: str) -> AdapterInfo:
        """The adapter called ``name``: registered, or loaded from ``<adapter_root>/<name>``."""
        with self._lock:
            return self.registry.resolve(name, self._active_counts())

    def entry_for(self, name: str) -> AdapterEntry:
        """``name``'s entry for a new request. A registered name needs no lock (the common case
        under load); only a first use, which registers the adapter, takes the registry lock."""
        if name not in self.store:
            self.resolve(name)
        return self.store.get(name)

    def read_ahead(self, names: Iterable[str]) -> None:
        """Bring ``names`` into host memory now (their reads run in parallel on the read
        threads), for a batch of requests that should start together. A name that cannot be
        resolved is left for the request that uses it to report."""
        known = []
        for name in names:
            try:
                self.entry_for(name)
                known.append(name)
            except (SLoRAError, ValueError):
                pass
        self.reads.wait_read(known)

    # ---- the engine's step (engine thread) ----------------------------------------------------

    def admit(self, name: str) -> bool:
        """Count a request entering the queue for ``name`` and start reading its weights; False
        if ``name`` was unloaded since the request was validated."""
        if name not in self.store:
            return False
        self.store.get(name).total_requests += 1
        self.ready(name)
        return True

    def ready(self, name: str) -> bool:
        """Admit a request for ``name`` only once its adapter is on the GPU or in host memory."""
        return name in self.cache or self.reads.ready(name)

    @property
    def reading(self) -> bool:
        """Whether adapter reads from disk are under way."""
        return self.reads.busy

    def before_launch(self, names: Collection[str | None], fence: torch.cuda.Event | None) -> bool:
        """Copy adapters made resident by the schedule into their pages and wait for the copies
        of ``names`` (the step's adapters); prefetches keep running. ``fence``: the step in
        flight, which may still write pages freed while it runs. True when a read or copy
        failed since: the caller then ends those requests with ``end_unreadable``."""
        self.copier.submit(self.cache.take_pending(), after=fence)
        # The step is also ordered after every copy done so far, whose pages may have changed hands.
        self.copier.wait(names)
        return self.reads.has_failures

    def end_unreadable(self, requests: Iterable[Request], end: Callable[[Request, str], T]) -> list[T]:
        """``end(request, reason)`` for ``requests`` whose adapter file could not be read, then
        drop those adapters from the pool (their pages hold nothing valid)."""
        failed = self.reads.take_failures()
        if not failed:
            return []
        outputs = [end(r, failed[r.adapter]) for r in list(requests) if r.adapter in failed]
        self.copier.wait(failed)  # a failed copy reports before its future ends
        for name in failed:
            if name in self.cache and not self.cache.get(name).pins:
                self.cache.evict(name)
        return outputs

    def prefetch_for(self, waiting: Iterable[Request], num_running: int,
                     fence: torch.cuda.Event | None) -> None:
        """Copy adapters of the next queued requests into free pages on the side stream."""
        if not self.prefetch:
            return
        keep_free = num_running + 1  # one more KV page per running request
        for request in itertools.islice(waiting, self.max_prefetch):
            name = request.adapter
            if name is None or name in self.cache or not self.store.has_weights(name):
                continue
            if not self.cache.prefetch(name, keep_free):
                break
        self.copier.submit(self.cache.take_pending(), after=fence)  # a failure: next step's work

    def stop(self) -> None:
        """No read outlives the engine loop, and every copy submitted has been queued."""
        self.reads.shutdown()
        self.copier.wait()

    # ---- introspection ------------------------------------------------------------------------

    def one_per_rank(self) -> dict[int, str]:
        """One registered adapter name per rank (warm-up compiles each rank's kernels)."""
        by_rank: dict[int, str] = {}
        for name in self.store.names():
            by_rank.setdefault(self.store.get(name).rank, name)
        return by_rank

    def graph_variants(self) -> list[tuple[int, frozenset[int] | None]]:
        """(rank, target modules) of the base model and every registered adapter."""
        entries = [self.store.get(n) for n in self.store.names()]
        return [(0, None)] + [(e.rank, e.targets) for e in entries]

    def stats(self) -> dict[str, int]:
        cache = self.cache
        return dict(
            pool_pages_adapter=cache.pool.used_by[ADAPTER],
            adapters_registered=len(self.store),
            adapters_gpu=len(cache),
            adapters_host=self.store.num_in_host,
            adapter_loads=cache.loads,
            adapter_evictions=cache.evictions,
            adapter_hits=cache.hits,
            adapter_misses=cache.misses,
            adapter_prefetches=cache.prefetches,
        )


def _nothing_to_forget(name: str) -> None:
    """No runner attached: nothing holds table rows."""


def _not_attached(resident: object, after: object) -> None:
    raise RuntimeError("AdapterManager.attach_runner was not called: no copy into pool pages")
