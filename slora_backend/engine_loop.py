"""The engine's loop thread and the step lock it shares with the other threads.

Rules: only one thread steps the engine at a time - the loop thread once ``start()`` ran, else the
caller of ``run_until``; both hold the step lock for the whole step. Another thread that must not
run in the middle of a step (unloading an adapter) holds ``between_steps()``. The loop sleeps on
the inbox's condition while ``has_work()`` is false; whoever adds work notifies that condition.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class EngineLoop:
    """Steps the engine on a thread of its own, or on the caller's thread (``run_until``).

    ``step`` runs one engine step; ``idle`` pauses after a step that left nothing to run (it must
    not spin while adapter reads are under way); ``has_work`` is read with ``wakeup``'s lock held;
    ``on_exit`` runs once the loop thread stops, with the step lock held.
    """

    def __init__(self, step: Callable[[], object], idle: Callable[[], None],
                 has_work: Callable[[], bool], wakeup: threading.Condition,
                 on_exit: Callable[[], None]) -> None:
        self.step_lock = threading.RLock()
        self._step = step
        self._idle = idle
        self._has_work = has_work
        self._wakeup = wakeup
        self._on_exit = on_exit
        self._waiters = 0  # threads in between_steps(); the loop yields to them
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        """Whether the loop thread steps the engine."""
        return self._thread is not None

    def start(self) -> None:
        """Start the loop thread (once; starting a running loop does nothing)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="slora-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop thread and wait for it (``on_exit`` has run when this returns)."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def run_until(self, done: threading.Event) -> None:
        """Drive the engine until ``done`` is set: wait for the loop thread if it runs, else step
        on this thread."""
        if self._thread is not None:
            done.wait()
            return
        while not done.is_set():
            self._step()
            self._idle()

    @contextlib.contextmanager
    def between_steps(self) -> Iterator[None]:
        """Hold the step lock from another thread. Python's locks are not fair: the loop thread
        re-takes the lock right after each step and would win every race against a waiter, so
        it yields between steps while anyone is waiting here."""
        with self._wakeup:
            self._waiters += 1
        try:
            with self.step_lock:
                yield
        finally:
            with self._wakeup:
                self._waiters -= 1

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not (self._stopping or self._has_work()):
                    self._wakeup.wait()
                if self._stopping:
                    break
            self._step()
            self._idle()
            while self._waiters:
                time.sleep(1e-4)
        with self.step_lock:  # a stopped engine leaves nothing behind
            self._on_exit()
