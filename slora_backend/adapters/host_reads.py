"""Adapters read from disk into host memory on helper threads, ahead of their requests."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import AdapterLoadError, AdapterNotFoundError
from .host_store import AdapterStore


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
        self._preload_queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._preloader: threading.Thread | None = None
        self._preloads_left = 0  # queued or being read, under _preloads_done's lock
        self._preloads_done = threading.Condition(self._lock)
        self._read_done = threading.Condition(self._lock)  # notified as each read ends

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix="slora-adapter-read",
                                  initializer=_one_torch_thread)

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

    def wait_read(self, names: Iterable[str]) -> None:
        """Start reading every one of ``names`` not in host memory yet and wait until none is
        being read (read, failed - the engine's next step reports it - or unregistered)."""
        names = [n for n in names if not self.ready(n)]
        with self._read_done:
            self._read_done.wait_for(lambda: not any(n in self._reading for n in names))

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

    def preload(self, names: Iterable[str]) -> None:
        """Read ``names`` into host memory on one background thread, in order, each only if
        the host budget has room for it: preloads alone never make the store drop an adapter.

        S-LoRA keeps every adapter in host memory; reading them all at registration would make
        start-up (and each registration) cost the whole set's disk time, so they are read after
        it, while the engine serves. Requests' own reads (``ready``) run on the pool, not behind
        this queue; an adapter being preloaded counts as being read for them."""
        names = list(names)
        with self._lock:
            if self._preloader is None:
                self._preloader = threading.Thread(target=self._preload_loop, daemon=True,
                                                   name="slora-adapter-preload")
                self._preloader.start()
            self._preloads_left += len(names)
        for name in names:
            self._preload_queue.put(name)

    def wait_preloads(self, timeout: float | None = None) -> bool:
        """Wait until every preload asked for so far was read or skipped; whether they were."""
        with self._preloads_done:
            return self._preloads_done.wait_for(lambda: self._preloads_left == 0, timeout)

    def _preload_loop(self) -> None:
        _one_torch_thread()
        while (name := self._preload_queue.get()) is not None:
            try:
                self._preload_one(name)
            finally:
                with self._preloads_done:
                    self._preloads_left -= 1
                    self._preloads_done.notify_all()

    def _preload_one(self, name: str) -> None:
        try:
            entry = self.store.get(name)
        except AdapterNotFoundError:
            return  # unloaded since
        if (entry.weights is not None
                or self.store.host_bytes + entry.size_bytes > self.store.host_budget_bytes):
            return
        with self._lock:
            if name in self._reading or name in self._failed:
                return
            self._reading.add(name)
        self._read(name)

    def shutdown(self) -> None:
        """Drop queued reads and preloads and wait for running ones (a new pool starts threads
        on first use; preloads not done are not resumed)."""
        with self._lock:
            preloader, self._preloader = self._preloader, None
        if preloader is not None:
            while True:  # drop what is queued, then stop the thread after its current read
                try:
                    self._preload_queue.get_nowait()
                except queue.Empty:
                    break
            self._preload_queue.put(None)
            preloader.join()
            with self._preloads_done:
                self._preloads_left = 0
                self._preloads_done.notify_all()
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
                self._read_done.notify_all()


def _one_torch_thread() -> None:
    """A reader thread runs its torch ops (packing rows) on one thread. Left at the default, each
    reader gets an OpenMP team of its own the size of the machine, and those teams outlive the
    reads: on a 2-core CPU the engine thread's steps then ran at half speed (make bench-cpu 68
    vs 145 tokens/s)."""
    torch.set_num_threads(1)
