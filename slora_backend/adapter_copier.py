"""Adapter weights copied into their pool pages off the engine thread.

A host-to-device copy from pageable memory holds the calling thread for the whole copy (about
1.5 ms for a Llama-2-7B rank-8 adapter, 17 MB, on the H200); in the S1 workload the engine
thread spent 11% of its time so. On CUDA the copies therefore run on one helper thread, on the
runner's side stream, in submission order, while the engine thread samples, schedules and builds
the next batch (torch releases the GIL during a copy). Before a step launches, ``wait`` makes
sure every copy submitted so far is queued on the GPU and orders the step after them, so pages
that changed hands (an adapter evicted, its pages reused) are always written in the right order.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .adapter_cache import ResidentAdapter
from .errors import AdapterLoadError, AdapterNotFoundError

CopyFn = Callable[[ResidentAdapter], "torch.cuda.Event | None"]


class AdapterCopier:
    """Runs ``copy(resident)`` for submitted adapters, on a helper thread when ``background``.

    ``copy`` returns the event the compute stream must wait for (or None). A copy that fails
    because the adapter's file cannot be read reports ``on_failure(name, reason)``; one whose
    adapter was unloaded meanwhile is dropped (its pages went back to the pool).
    """

    def __init__(self, copy: CopyFn, on_failure: Callable[[str, str], None], background: bool) -> None:
        self._copy = copy
        self._on_failure = on_failure
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="slora-adapter-copy") if background else None
        self._submitted: list[Future] = []
        self._events: list[torch.cuda.Event] = []

    def submit(self, residents: list[ResidentAdapter]) -> None:
        for resident in residents:
            if self._worker is None:
                self._run(resident)
            else:
                self._submitted.append(self._worker.submit(self._run, resident))

    def wait(self) -> None:
        """Block until every submitted copy is queued (or failed, and reported); make the
        current CUDA stream wait for them."""
        for future in self._submitted:
            future.result()
        self._submitted.clear()
        events, self._events = self._events, []
        for event in events:
            torch.cuda.current_stream().wait_event(event)

    def _run(self, resident: ResidentAdapter) -> None:
        try:
            event = self._copy(resident)
        except AdapterNotFoundError:
            return
        except AdapterLoadError as e:
            self._on_failure(resident.name, str(e))
            return
        if event is not None:
            self._events.append(event)  # list.append is atomic; read after the futures end
