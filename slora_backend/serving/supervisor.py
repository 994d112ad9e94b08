"""``EngineSupervisor``: the engine process, started again when it dies, a bounded number of times.

Rules:
- When the engine process dies, every request and call in flight ends with an error naming its
  exit code (``EngineProcess`` does that), and a new process is started from the same config.
  It reads the adapter registry (``<adapter_root>/registry.json``) at start as every engine
  does, so the same adapters are served afterwards.
- While the new process starts, calls raise ``EngineProcessError`` (UNAVAILABLE: retry) saying
  that the engine is restarting and why.
- After ``max_restarts`` restarts (0: none), the next death is final: every call raises
  ``EngineProcessError`` saying how often the engine died and that the server must be
  restarted. So a crash loop ends, and says so on every request.
- ``stop()`` stops the current process; a death during or after ``stop()`` is not restarted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..config import EngineConfig, SamplingParams
from ..output_stream import OutputCallback
from .engine_process import EngineProcess
from .errors import EngineProcessError

log = logging.getLogger(__name__)

EngineFactory = Callable[[EngineConfig, Callable[[str], None]], EngineProcess]


class EngineSupervisor:
    """The part of ``Engine``'s API that serving uses, over a restartable ``EngineProcess``."""

    def __init__(self, config: EngineConfig, max_restarts: int,
                 start: EngineFactory = EngineProcess,
                 on_event: Callable[[str], None] = log.warning) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self.config = config
        self.max_restarts = max_restarts
        self._start = start
        self._on_event = on_event
        self._lock = threading.Lock()  # _engine, restarts, _down, _stopping
        self.restarts = 0
        self._down: str | None = None  # why there is no engine now (restarting or failed)
        self._failed = False
        self._stopping = False
        self._engine: EngineProcess | None = start(config, self._on_exit)  # raises if it cannot
        self.max_model_len: int = self._engine.max_model_len
        self.tokenizer: Any = self._engine.tokenizer

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._engine.pid if self._engine is not None else None

    @property
    def failed(self) -> bool:
        """True once the engine died more often than it may be restarted."""
        with self._lock:
            return self._failed

    def _current(self) -> EngineProcess:
        with self._lock:
            if self._engine is None:
                raise EngineProcessError(self._down or "the engine has stopped")
            return self._engine

    # ---- the Engine API serving uses ---------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    lora_name: str | None = None, request_id: str | None = None,
                    on_output: OutputCallback | None = None) -> str:
        return self._current().add_request(prompt, params, lora_name, request_id, on_output)

    def abort(self, request_id: str) -> None:
        with self._lock:
            engine = self._engine
        if engine is not None:  # without an engine, nothing runs that could be aborted
            engine.abort(request_id)

    def load_adapter(self, name: str, path: str) -> Any:
        return self._current().load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self._current().unload_adapter(name)

    def list_adapters(self) -> Any:
        return self._current().list_adapters()

    def describe_adapter(self, name: str) -> Any:
        return self._current().describe_adapter(name)

    def resolve_adapter(self, name: str) -> Any:
        return self._current().resolve_adapter(name)

    def stats(self) -> Any:
        return self._current().stats()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
            engine, self._engine = self._engine, None
            self._down = "the engine has stopped"
        if engine is not None:
            engine.stop(timeout)

    # ---- restarts ---------------------------------------------------------------------------------

    def _on_exit(self, reason: str) -> None:
        """Called on the dead process's reader thread, after its requests were ended."""
        with self._lock:
            if self._stopping:
                return
            self._engine = None
            if self.restarts >= self.max_restarts:
                self._failed = True
                self._down = (f"{reason}; the engine process died {self.restarts + 1} times and "
                              f"is restarted at most {self.max_restarts} times (engine_restarts): "
                              "this model stays failed until the server restarts")
                message = self._down
            else:
                self.restarts += 1
                self._down = (f"{reason}; the engine is restarting (restart {self.restarts} of "
                              f"{self.max_restarts}): retry shortly")
                message = self._down
                threading.Thread(target=self._restart, args=(reason,), name="slora-engine-restart",
                                 daemon=True).start()
        self._on_event(f"slora_engine: {message}")

    def _restart(self, reason: str) -> None:
        try:
            engine = self._start(self.config, self._on_exit)
        except Exception as e:
            with self._lock:
                self._failed = True
                self._down = f"{reason}; restarting the engine failed: {e}"
                message = self._down
            self._on_event(f"slora_engine: {message}")
            return
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._engine, self._down = engine, None
        if stopping:
            engine.stop()
            return
        self._on_event(f"slora_engine: the engine process was restarted (pid {engine.pid})")
