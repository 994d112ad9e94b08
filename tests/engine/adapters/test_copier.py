"""AdapterCopier: copies run off the caller's thread, in submission order; wait() returns only
when every submitted copy is done, wait(names) when those are; each copy gets the event it was
submitted after (the step that may still write its pages); a copy still in flight keeps its
adapter from being evicted; a copy of an unreadable adapter reports it, one of an adapter
unloaded meanwhile is dropped quietly."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from slora_backend.adapters.copier import AdapterCopier
from slora_backend.adapters.gpu_cache import AdapterCache, ResidentAdapter
from slora_backend.errors import AdapterLoadError, AdapterNotFoundError
from slora_backend.page_pool import ADAPTER, PagePool


def test_background_copies_keep_order_and_wait_for_all():
    caller = threading.get_ident()
    done: list[tuple[str, bool]] = []

    def copy(resident: ResidentAdapter, after) -> None:
        time.sleep(0.01)
        done.append((resident.name, threading.get_ident() != caller, after))

    copier = AdapterCopier(copy, lambda name, why: None, background=True)
    copier.submit([ResidentAdapter(f"a{i}", [i]) for i in range(3)])
    copier.submit([ResidentAdapter(f"a{i}", [i]) for i in range(3, 5)], after="step 7")
    assert len(done) < 5  # submit() did not wait for the copies
    copier.wait()
    assert done == [(f"a{i}", True, None if i < 3 else "step 7") for i in range(5)]


def test_failures_are_reported_and_unloaded_adapters_dropped():
    failures: list[tuple[str, str]] = []

    def copy(resident: ResidentAdapter, after) -> None:
        if resident.name == "broken":
            raise AdapterLoadError("adapter 'broken': cannot read weights: truncated")
        if resident.name == "gone":
            raise AdapterNotFoundError("adapter 'gone' is not registered")

    for background in (True, False):
        failures.clear()
        copier = AdapterCopier(copy, lambda name, why: failures.append((name, why)), background)
        copier.submit([ResidentAdapter(n, [0]) for n in ("ok", "broken", "gone", "ok2")])
        copier.wait()
        assert failures == [("broken", "adapter 'broken': cannot read weights: truncated")]


def test_wait_for_some_names_leaves_later_copies_running_and_unevictable():
    release = threading.Event()
    done: list[str] = []

    def copy(resident: ResidentAdapter, after) -> None:
        if resident.name == "slow":
            release.wait(5)
        done.append(resident.name)

    copier = AdapterCopier(copy, lambda name, why: None, background=True)
    copier.submit([ResidentAdapter("first", [0]), ResidentAdapter("slow", [1])])
    copier.wait({"first"})
    assert done == ["first"]
    assert not copier.in_flight("first") and copier.in_flight("slow")

    pool = PagePool(4)
    cache = AdapterCache(pool, SimpleNamespace(get=lambda name: None), copying=copier.in_flight)
    for name in ("first", "slow"):  # resident, unpinned: both idle
        cache._resident[name] = ResidentAdapter(name, pool.allocate(1, ADAPTER))
    assert cache.evictable_pages() == 1  # only "first": "slow" is still being written
    assert cache.make_room(pool.num_free + 1) and "slow" in cache and "first" not in cache
    with pytest.raises(RuntimeError, match="still being copied"):
        cache.evict("slow")
    release.set()
    copier.wait()
    assert done == ["first", "slow"] and not copier.in_flight("slow")
    cache.evict("slow")
    assert pool.num_free == 4
