"""Where the engine's stepping time goes, by kind of step: the workload's time account.

A step costs the engine thread time twice: when it is launched (inputs built, kernels enqueued or
graphs replayed) and, one step later, while the host waits for its tokens (``step_in_flight``).
Both are charged to the step's kind: ``graph`` (a decode step replayed from a CUDA graph),
``piecewise`` (a step that prefills, replayed from piecewise graphs) or ``eager`` (every other
step: large prefills, and every step where there are no graphs). The rest of ``Engine.step``
(scheduling, adapter copies and prefetches, detokenizing and emitting outputs) is ``other``. Time
outside ``Engine.step`` (no work, or the loop yielding) is the wall time less all of these.

``DeviceClock`` is the device's side (CUDA): each step's span on the compute stream, from an
event recorded as its launch begins to its ``done`` event, by kind, and the device's idle time
between consecutive steps - a step not launched yet when the one before it ended: a host gap.
A step launched after the engine ran out of work (nothing in flight) opens no gap.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

STEP_KINDS = ("graph", "piecewise", "eager")


def graph_replays(runner: Any) -> tuple[int, int]:
    """(decode graph replays, piecewise replays) so far: compared before and after a launch,
    they tell its kind (``step_kind``)."""
    graphs, pieces = runner.graphs, runner.piecewise
    return (graphs.replays if graphs else 0, pieces.replays if pieces else 0)


def step_kind(before: tuple[int, int], after: tuple[int, int]) -> str:
    if after[0] > before[0]:
        return "graph"
    return "piecewise" if after[1] > before[1] else "eager"


class StepClock:
    def __init__(self) -> None:
        self.seconds = dict.fromkeys((*STEP_KINDS, "other"), 0.0)

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] += seconds

    @contextlib.contextmanager
    def charging(self, kind: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[kind] += time.perf_counter() - start

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One ``Engine.step``: what it spends beyond the charges made inside is ``other``."""
        start = time.perf_counter()
        charged = sum(self.seconds[k] for k in STEP_KINDS)
        try:
            yield
        finally:
            inside = sum(self.seconds[k] for k in STEP_KINDS) - charged
            self.seconds["other"] += time.perf_counter() - start - inside


class DeviceClock:
    """Device seconds by kind of step, and idle seconds between steps (see the module doc).
    ``finished`` is given each step once the host has waited for it, so its events are done."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STEP_KINDS, 0.0)
        self.idle_between_steps = 0.0
        self._last_done: Any = None

    def finished(self, step: Any) -> None:
        """``step``: a ``StepInFlight`` (its ``kind``, and ``started`` / ``done`` timing events
        on one stream, None off CUDA)."""
        if step.started is None or step.done is None:
            return
        self.seconds[step.kind] += step.started.elapsed_time(step.done) / 1e3
        if self._last_done is not None:  # (0 when it was launched before the last one ended)
            self.idle_between_steps += max(0.0, self._last_done.elapsed_time(step.started) / 1e3)
        self._last_done = step.done

    def drained(self) -> None:
        """Nothing is in flight (no work): the next step's wait for work is not a gap."""
        self._last_done = None


class CopyClock:
    """The device's seconds in adapter copies (CUDA): each copy's span on the runner's side
    stream, from an event recorded as it begins (after any wait for the step it follows) to its
    end event. A span is counted once its end has passed on the device; each new copy first
    counts those (the copies run in order on one stream), so only the copies still in flight
    are held, whether or not anyone reads ``seconds``. The copies are recorded on the copy
    thread and read on the engine thread, hence the lock."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._open: list[tuple[Any, Any]] = []
        self._lock = threading.Lock()

    @staticmethod
    def begin(stream: Any) -> Any:
        """A timing event recorded on ``stream`` now; None without a stream (CPU)."""
        if stream is None:
            return None
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def end(self, begin: Any, end: Any) -> None:
        if begin is not None and end is not None:
            with self._lock:
                self._count_finished()
                self._open.append((begin, end))

    @property
    def seconds(self) -> float:
        with self._lock:
            self._count_finished()
            return self._seconds

    def _count_finished(self) -> None:
        done = 0
        for begin, end in self._open:  # (in stream order: the first unfinished ends the run)
            if not end.query():
                break
            self._seconds += begin.elapsed_time(end) / 1e3
            done += 1
        del self._open[:done]
