"""Adapter weights copied into their pool pages off the engine thread.

A host-to-device copy from pageable memory holds the calling thread for the whole copy (about
1.5 ms for a Llama-2-7B rank-8 adapter, 17 MB, on the H200). On CUDA the copies therefore run
on one helper thread, on the runner's side stream, in submission order, while the engine thread
samples, schedules and builds the next batch (torch releases the GIL during a copy).

A step waits only for the copies of the adapters it reads (``wait(names)``); prefetches for
queued requests keep running behind it. Page reuse stays ordered: every copy that has finished
on the host side has its event waited on by the compute stream at the next ``wait``, and an
adapter whose copy is still in flight is not evictable (``in_flight``), so its pages cannot
change hands under a copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import AdapterLoadError, AdapterNotFoundError
from .gpu_cache import ResidentAdapter

CopyFn = Callable[[ResidentAdapter, "torch.cuda.Event | None"], "torch.cuda.Event | None"]


class AdapterCopier:
    """Runs ``copy(resident, after)`` for submitted adapters, on a helper thread when
    ``background``.

    ``copy`` returns the event the compute stream must wait for (or None); ``after`` is the
    event of the last step launched before the copy was submitted: pages freed while that step
    ran may still be written by it (the engine builds a step while the one before runs), so a
    copy into them waits for it on the GPU. A copy that fails
    because the adapter's file cannot be read reports ``on_failure(name, reason)``; one whose
    adapter was unloaded meanwhile is dropped (its pages went back to the pool).
    """

    def __init__(self, copy: CopyFn, on_failure: Callable[[str, str], None], background: bool) -> None:
        self._copy = copy
        self._on_failure = on_failure
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="slora-adapter-copy") if background else None
        self._in_flight: dict[str, Future] = {}  # adapter name -> its copy, submission order
        self._events: list[torch.cuda.Event] = []
        # Seconds spent on copies by the thread that runs them (reading weights not yet in host
        # memory, pinning, queueing the copy) and by the engine thread blocked in ``wait`` for
        # copies not yet queued: where a step's adapters hold it up on the host.
        self.host_seconds = 0.0
        self.wait_seconds = 0.0

    def submit(self, residents: list[ResidentAdapter],
               after: torch.cuda.Event | None = None) -> None:
        for resident in residents:
            if self._worker is None:
                self._run(resident, after)
            else:
                self._in_flight[resident.name] = self._worker.submit(self._run, resident, after)

    def in_flight(self, name: str) -> bool:
        """Whether ``name``'s copy may still be writing its pages (they must not be reused)."""
        return name in self._in_flight

    def wait(self, names: Collection[str] | None = None) -> None:
        """Block until the copies of ``names`` (None: of every adapter submitted) are queued on
        the GPU (or failed, and reported); make the current CUDA stream wait for them and for
        every other copy that is done by now."""
        for name, future in list(self._in_flight.items()):
            if names is None or name in names:
                t = time.perf_counter()
                future.result()
                self.wait_seconds += time.perf_counter() - t
            if future.done():
                del self._in_flight[name]
        events, self._events = self._events, []
        for event in events:
            torch.cuda.current_stream().wait_event(event)

    def _run(self, resident: ResidentAdapter, after: torch.cuda.Event | None) -> None:
        t = time.perf_counter()
        try:
            event = self._copy(resident, after)
        except AdapterNotFoundError:
            return
        except AdapterLoadError as e:
            self._on_failure(resident.name, str(e))
            return
        finally:
            self.host_seconds += time.perf_counter() - t  # (one thread runs copies: no race)
        if event is not None:
            self._events.append(event)  # list.append is atomic; read after the futures end
