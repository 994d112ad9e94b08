"""The engine in a process of its own, behind the part of ``Engine``'s API that serving uses.

Why: inside the Triton stub the engine loop would share one GIL with the threads that parse
requests and send responses (each response a ~230 us round trip to the server, a third of it
holding the GIL). In a process of its own (vLLM's engine-core split) the loop has a GIL to itself;
the stub only moves requests in and outputs out.

Wire: one duplex pipe carrying pickled tuples.

    parent -> child   ("call", call_id, method, args)   answered by a "reply"
                      ("abort", request_id)             no answer
                      ("stop",)
    child -> parent   ("ready", info) or ("failed", message)   once, first
                      ("reply", call_id, ok, value or exception)
                      ("outputs", [_WireOutput, ...])   what the engine emitted, in order
                      ("stopped",)

Outputs cross as deltas; the parent rebuilds each ``RequestOutput`` with the request's tokens so
far, so a consumer sees exactly what the in-process engine hands its callbacks. If the child
dies, every call in flight raises and every request in flight ends with an error output, then
``on_exit`` (if given) is called with the reason; ``supervisor.EngineSupervisor`` restarts it.
"""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
import queue
import signal
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..adapters.registry import AdapterInfo
from ..config import EngineConfig, SamplingParams
from ..engine import Engine, EngineStats
from ..errors import InvalidRequestError, SLoRAError
from ..output_stream import OutputCallback
from ..request import RequestOutput
from .errors import EngineProcessError

# What the parent may ask of the engine; anything else is refused by the child.
_METHODS = frozenset({"add_request", "load_adapter", "unload_adapter", "list_adapters",
                      "describe_adapter", "resolve_adapter", "stats"})


class _WireOutput(NamedTuple):
    request_id: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    error: str | None
    final_text: str | None  # the whole text, on the final output only


class _Channel:
    """One end of the pipe. Several threads send on it (one at a time); one thread reads."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self._lock:
            self.conn.send(message)

    def recv(self) -> tuple:
        return self.conn.recv()


@dataclass
class _RemoteStream:
    callback: OutputCallback | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    num_prompt_tokens: int = 0


class EngineProcess:
    """An ``Engine`` running in a spawned child process; the same calls, answered over a pipe.

    ``add_request`` and the adapter calls block until the child answers (raising its error, if
    any); ``abort`` does not wait. Output callbacks run on this object's reader thread, and so
    does ``on_exit(reason)``, once, when the child dies without being asked to stop.
    """

    def __init__(self, config: EngineConfig,
                 on_exit: Callable[[str], None] | None = None) -> None:
        self._on_exit = on_exit
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
        conn, child_conn = ctx.Pipe()
        self._channel = _Channel(conn)
        self._process = ctx.Process(target=run_engine_process, args=(config, child_conn),
                                    name="slora-engine", daemon=True)
        self._process.start()
        child_conn.close()
        try:
            kind, info = self._channel.recv()
        except EOFError:
            self._process.join(5)
            raise EngineProcessError(f"the engine process exited while starting "
                                     f"(exit code {self._process.exitcode})") from None
        if kind != "ready":
            self._process.join(5)
            raise EngineProcessError(f"the engine failed to start: {info}")
        self.max_model_len: int = info["max_model_len"]
        self.tokenizer: Any = info["tokenizer"]  # for chat templates, applied on this side
        self._lock = threading.Lock()  # _calls, _streams, _gone
        self._calls: dict[int, Future] = {}
        self._streams: dict[str, _RemoteStream] = {}
        self._gone: str | None = None  # why the child is no longer serving
        self._call_ids = itertools.count()
        self._reader = threading.Thread(target=self._read_loop, name="slora-engine-reader",
                                        daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # ---- the Engine API serving uses ---------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    lora_name: str | None = None, request_id: str | None = None,
                    on_output: OutputCallback | None = None) -> str:
        request_id = request_id or f"req-{uuid.uuid4().hex[:12]}"
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            # registered before the call: outputs may arrive before the call's answer
            self._streams[request_id] = _RemoteStream(on_output)
        try:
            return self._call("add_request", prompt, params, lora_name, request_id)
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        try:
            self._channel.send(("abort", request_id))
        except OSError:
            pass  # the child is gone; the reader ends every stream

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        return self._call("load_adapter", name, path)

    def unload_adapter(self, name: str) -> None:
        self._call("unload_adapter", name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self._call("list_adapters")

    def describe_adapter(self, name: str) -> AdapterInfo:
        return self._call("describe_adapter", name)

    def resolve_adapter(self, name: str) -> AdapterInfo:
        return self._call("resolve_adapter", name)

    def stats(self) -> EngineStats:
        return self._call("stats")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine (requests in flight end as aborted) and wait for the process."""
        try:
            self._channel.send(("stop",))
        except OSError:
            pass
        self._reader.join(timeout)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    # ---- plumbing -------------------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        future: Future = Future()
        call_id = next(self._call_ids)
        with self._lock:
            if self._gone is not None:
                raise EngineProcessError(self._gone)
            self._calls[call_id] = future
        try:
            self._channel.send(("call", call_id, method, args))
        except OSError as e:
            with self._lock:
                self._calls.pop(call_id, None)
            raise EngineProcessError(f"the engine process is gone: {e}") from None
        return future.result()

    def _read_loop(self) -> None:
        reason = "the engine process has stopped"
        died = False
        try:
            while True:
                message = self._channel.recv()
                if message[0] == "outputs":
                    for wire in message[1]:
                        self._deliver(wire)
                elif message[0] == "reply":
                    _, call_id, ok, value = message
                    with self._lock:
                        future = self._calls.pop(call_id)
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                elif message[0] == "stopped":
                    break
        except (EOFError, OSError):
            self._process.join(2)
            reason = f"the engine process exited (exit code {self._process.exitcode})"
            died = True
        self._end_everything(reason)
        if died and self._on_exit is not None:
            self._on_exit(reason)

    def _deliver(self, wire: _WireOutput) -> None:
        with self._lock:
            stream = self._streams.get(wire.request_id)
            if stream is not None and wire.finished:
                del self._streams[wire.request_id]
        if stream is None:
            return
        stream.token_ids.extend(wire.delta_token_ids)
        stream.text += wire.delta_text
        stream.num_prompt_tokens = wire.num_prompt_tokens
        out = RequestOutput(
            request_id=wire.request_id,
            token_ids=list(stream.token_ids),
            text=wire.final_text if wire.finished else stream.text,
            delta_token_ids=wire.delta_token_ids,
            delta_text=wire.delta_text,
            finished=wire.finished,
            finish_reason=wire.finish_reason,
            num_prompt_tokens=wire.num_prompt_tokens,
            error=wire.error,
        )
        self._notify(stream, out)

    def _notify(self, stream: _RemoteStream, out: RequestOutput) -> None:
        if stream.callback is None:
            return
        try:
            stream.callback(out)
        except Exception:  # as in the engine: a broken consumer loses its request, nothing more
            if not out.finished:
                self.abort(out.request_id)

    def _end_everything(self, reason: str) -> None:
        with self._lock:
            self._gone = reason
            calls, self._calls = self._calls, {}
            streams, self._streams = self._streams, {}
        for future in calls.values():
            future.set_exception(EngineProcessError(reason))
        for request_id, stream in streams.items():
            self._notify(stream, RequestOutput(
                request_id=request_id, token_ids=list(stream.token_ids), text=stream.text,
                delta_token_ids=[], delta_text="", finished=True, finish_reason="error",
                num_prompt_tokens=stream.num_prompt_tokens, error=reason))


# ---- the child ----------------------------------------------------------------------------------


def run_engine_process(config: EngineConfig, conn: Any) -> None:
    """The engine process: build the engine, then serve calls until "stop" or the parent leaves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process ends
    try:
        engine = Engine(config)
    except BaseException as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        conn.close()
        return
    engine.start()
    conn.send(("ready", {"max_model_len": engine.max_model_len,
                         "tokenizer": _picklable_or_none(engine.tokenizer)}))
    channel = _Channel(conn)
    outbox: queue.SimpleQueue[RequestOutput | None] = queue.SimpleQueue()
    writer = threading.Thread(target=_write_outputs, args=(outbox, channel), name="slora-outputs",
                              daemon=True)
    writer.start()

    def answer(call_id: int, method: str, args: tuple) -> None:
        try:
            if method not in _METHODS:
                raise SLoRAError(f"the engine process does not serve {method!r}")
            kwargs = {"on_output": outbox.put} if method == "add_request" else {}
            reply = ("reply", call_id, True, getattr(engine, method)(*args, **kwargs))
        except Exception as e:
            reply = ("reply", call_id, False, _picklable_error(e))
        try:
            channel.send(reply)
        except OSError:
            pass  # the parent is gone; the main loop sees it too

    # Calls run on a few threads so that an adapter load from disk never holds up requests.
    calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="slora-engine-call")
    try:
        while True:
            message = channel.recv()
            if message[0] == "call":
                calls.submit(answer, *message[1:])
            elif message[0] == "abort":
                engine.abort(message[1])
            elif message[0] == "stop":
                break
    except (EOFError, OSError):
        pass  # the stub is gone: stop serving
    calls.shutdown(wait=True)
    engine.close()  # ends what is in flight as aborted (those outputs go out first), frees memory
    outbox.put(None)
    writer.join()
    try:
        channel.send(("stopped",))
    except OSError:
        pass
    conn.close()


def _write_outputs(outbox: queue.SimpleQueue, channel: _Channel) -> None:
    """Send everything the engine emitted since the last send as one message (one per step)."""
    while True:
        batch = [outbox.get()]
        while True:
            try:
                batch.append(outbox.get_nowait())
            except queue.Empty:
                break
        wires = [_to_wire(out) for out in batch if out is not None]
        if wires:
            try:
                channel.send(("outputs", wires))
            except OSError:
                return
        if None in batch:
            return


def _to_wire(out: RequestOutput) -> _WireOutput:
    return _WireOutput(out.request_id, out.delta_token_ids, out.delta_text, out.finished,
                       out.finish_reason, out.num_prompt_tokens, out.error,
                       out.text if out.finished else None)


def _picklable_error(e: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return SLoRAError(f"{type(e).__name__}: {e}")


def _picklable_or_none(obj: Any) -> Any:
    try:
        pickle.dumps(obj)
        return obj
    except Exception:
        return None
