"""Adapters read from disk into host memory on helper threads, ahead of their requests."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from .adapter_store import AdapterStore
from .errors import AdapterLoadError, AdapterNotFoundError


class HostReads:
    """Which adapters are being read, and which could not be read (with the reason).

    The engine asks ``ready`` before it admits a request; the first time an adapter is asked
    for and is not in host memory, a helper thread starts reading it, and the request waits in
    the queue rather than inside a step (where a disk read would stall every running request).
    ``take_failures`` hands over, and forgets, the adapters whose files could not be read, so
    their requests can end with the reason and a repaired file is read again next time.
    """

    def __init__(self, store: AdapterStore, workers: int = 4) -> None:
        self.store = store
        self.workers = workers
        self._pool = self._new_pool()
        self._lock = threading.Lock()
        self._reading: set[str] = set()
        self._failed: dict[str, str] = {}

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix="slora-adapter-read")

    @property
    def busy(self) -> bool:
        return bool(self._reading)

    def ready(self, name: str) -> bool:
        """Whether ``name``'s weights are in host memory; if not, make sure a read is under way.
        An unregistered name counts as ready: admitting it lets its step report the error."""
        if name not in self.store or self.store.has_weights(name):
            return True
        with self._lock:
            if name in self._reading or name in self._failed:
                return False  # (failed: the engine's next step ends its requests)
            self._reading.add(name)
        self._pool.submit(self._read, name)
        return False

    @property
    def has_failures(self) -> bool:
        return bool(self._failed)

    def record_failure(self, name: str, why: str) -> None:
        with self._lock:
            self._failed[name] = why

    def take_failures(self) -> dict[str, str]:
        if not self._failed:
            return {}
        with self._lock:
            failed, self._failed = self._failed, {}
        return failed

    def shutdown(self) -> None:
        """Drop queued reads and wait for running ones (a new pool starts threads on first use)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._new_pool()
        with self._lock:
            self._reading.clear()

    def _read(self, name: str) -> None:
        try:
            self.store.weights(name)
        except AdapterNotFoundError:
            pass  # unloaded meanwhile: its requests were refused at intake or are gone
        except AdapterLoadError as e:
            self.record_failure(name, str(e))
        finally:
            with self._lock:
                self._reading.discard(name)
