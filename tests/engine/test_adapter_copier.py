"""AdapterCopier: copies run off the caller's thread, in submission order; wait() returns only
when every submitted copy is done; a copy of an unreadable adapter reports it, one of an adapter
unloaded meanwhile is dropped quietly."""

from __future__ import annotations

import threading
import time

from slora_backend.adapter_cache import ResidentAdapter
from slora_backend.adapter_copier import AdapterCopier
from slora_backend.errors import AdapterLoadError, AdapterNotFoundError


def test_background_copies_keep_order_and_wait_for_all():
    caller = threading.get_ident()
    done: list[tuple[str, bool]] = []

    def copy(resident: ResidentAdapter) -> None:
        time.sleep(0.01)
        done.append((resident.name, threading.get_ident() != caller))

    copier = AdapterCopier(copy, lambda name, why: None, background=True)
    copier.submit([ResidentAdapter(f"a{i}", [i]) for i in range(5)])
    assert len(done) < 5  # submit() did not wait for the copies
    copier.wait()
    assert done == [(f"a{i}", True) for i in range(5)]


def test_failures_are_reported_and_unloaded_adapters_dropped():
    failures: list[tuple[str, str]] = []

    def copy(resident: ResidentAdapter) -> None:
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
