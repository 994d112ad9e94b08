"""In-flight generation requests of one engine model: intake, responses, cancellation."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..request import RequestOutput
from .errors import CANCELLED, INTERNAL, ServingError, error_from_exception
from .gateway_metrics import AdapterActivity
from .inputs import GenerateRequest, chat_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResponsePayload:
    """One response of a generation request (every response carries every output)."""

    text: str
    finish_reason: str  # "" while running
    num_input_tokens: int
    num_output_tokens: int


class ResponseSink(Protocol):
    """Where one request's responses go (in model.py: a Triton response sender)."""

    def send(self, payload: ResponsePayload | None, error: ServingError | None, final: bool) -> None: ...

    def is_cancelled(self) -> bool: ...


@dataclass
class _Stream:
    request_id: str  # engine id (unique)
    client_id: str  # the id the client gave Triton (may repeat, may be empty)
    sink: ResponseSink
    request: GenerateRequest
    prompt: str
    lora_name: str | None
    arrival: float
    first_token: float | None = None
    held_text: str = ""  # streamed text not sent yet (stream_interval)
    held_tokens: int = 0
    cancelled: bool = False
    sent_final: bool = False
    responses: int = 0
    tokens_sent: int = 0  # output tokens counted in the responses sent so far


@dataclass
class RouterCounters:
    cancelled: int = 0
    errors: int = 0
    send_failures: int = 0


class StreamRouter:
    """In-flight requests of one engine model and the thread that answers them.

    ``on_first_token(seconds since arrival, lora)``: when a request's first token reaches this
    process; ``on_first_response(seconds since then, lora)``: when a streaming request's first
    response has been handed to its sink (the time it spent queued behind other responses and
    in the send); ``on_finished(reason, lora)``.

    Invariant: every request submitted successfully gets exactly one final response (data,
    error or cancellation), and every cancelled request is aborted in the engine, so its pages
    return to the pool.

    ``stream_interval``: a streaming request's text goes out once it has that many new tokens
    (the first token at once, the rest with the final response). Each response is a round trip
    to the server process that holds the GIL for part of it (~75 of ~230 us on the H200's
    host); raise the interval when many streams run at once and not every token needs a
    response of its own. Like vLLM's ``--stream-interval``.
    """

    CANCEL_POLL_S = 0.1
    # ``is_cancelled`` is a round trip to the server process: asking all ~250 streams of the S1
    # workload 10 times a second took a third of this thread's time on the H200 (py-spy), so a
    # poll asks at most this many, round-robin (each stream about every 0.8 s at that load; a
    # streaming request whose client left is also caught by its next failing send).
    CANCEL_POLL_BATCH = 32
    # Sends between looks at the queue inside a round: a round at ~250 streams takes ~60 ms
    # (~230 us a send on the H200's host), and a first token or a final output the engine emits
    # meanwhile then waits for at most this many sends instead of the rest of the round.
    RECHECK_EVERY = 16

    def __init__(
        self,
        engine: Any,
        on_first_token: Callable[[float, str | None], None] | None = None,
        on_finished: Callable[[str, str | None], None] | None = None,
        stream_interval: int = 1,
        on_first_response: Callable[[float, str | None], None] | None = None,
    ) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.stream_interval = stream_interval
        self.engine = engine
        self.on_first_token = on_first_token
        self.on_finished = on_finished
        self.on_first_response = on_first_response
        self.counters = RouterCounters()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._outputs: queue.Queue[tuple[float, RequestOutput] | None] = queue.Queue()
        self._intake: queue.Queue[_Stream | None] = queue.Queue()
        self._running = True
        self._poll_cursor = 0
        self._thread = threading.Thread(target=self._run, name="slora-responses", daemon=True)
        self._intake_thread = threading.Thread(target=self._intake_loop, name="slora-intake",
                                               daemon=True)
        self._thread.start()
        self._intake_thread.start()

    # called on the model's execute() thread: never blocks on the engine
    def submit(self, request: GenerateRequest, client_id: str, sink: ResponseSink,
               arrival: float) -> str:
        """Queue one request for the engine; the intake thread adds it (``add_request`` may wait
        for the engine's step lock) and answers any refusal with a final error response."""
        request_id = f"{client_id or 'req'}/{uuid.uuid4().hex[:12]}"
        stream = _Stream(request_id, client_id, sink, request, request.prompt, request.lora_name,
                         arrival)
        with self._lock:
            self._streams[request_id] = stream
        self._intake.put(stream)
        return request_id

    def _intake_loop(self) -> None:
        while True:
            s = self._intake.get()
            if s is None:
                return
            try:
                self._add(s)
            except Exception:
                log.exception("intake of %s failed", s.request_id)

    def _add(self, s: _Stream) -> None:
        if s.cancelled:
            self._drop(s, ServingError(CANCELLED, f"request {s.client_id!r} was cancelled"))
            return
        try:
            if s.request.apply_chat_template:
                s.prompt = chat_prompt(self.engine.tokenizer, s.request.prompt)
            # on_output may run on the engine thread before add_request returns: the stream is
            # registered already.
            self.engine.add_request(s.prompt, s.request.params, s.lora_name,
                                    request_id=s.request_id, on_output=self._on_output)
        except Exception as e:
            self._drop(s, error_from_exception(e))
            return
        if s.cancelled:  # cancelled while being added: the first abort may have missed it
            self.engine.abort(s.request_id)

    def _drop(self, s: _Stream, error: ServingError) -> None:
        with self._lock:
            self._streams.pop(s.request_id, None)
        self.counters.errors += error.code != CANCELLED
        self._send(s, None, error, final=True)

    def abort_client_id(self, client_id: str) -> int:
        """Abort every in-flight request submitted under ``client_id``; returns how many."""
        with self._lock:
            targets = [s for s in self._streams.values() if s.client_id == client_id]
        for s in targets:
            self._cancel(s)
        return len(targets)

    def adapter_activity(self) -> AdapterActivity:
        """Adapters of the requests in flight: running once a request has had output, else
        waiting (what the gateway's LoRA info gauge reports)."""
        with self._lock:
            streams = list(self._streams.values())
        return AdapterActivity.of((s.lora_name for s in streams if s.first_token is not None),
                                  (s.lora_name for s in streams if s.first_token is None))

    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def stop(self, timeout: float = 5.0) -> None:
        """Abort everything in flight, answer it, and stop the thread."""
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            self._cancel(s)
        deadline = time.monotonic() + timeout
        while self.num_in_flight() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._running = False
        self._intake.put(None)
        self._outputs.put(None)
        self._intake_thread.join(timeout)
        self._thread.join(timeout)

    # called on the engine thread: must stay cheap
    def _on_output(self, output: RequestOutput) -> None:
        self._outputs.put((time.monotonic(), output))

    # the response thread
    def _run(self) -> None:
        last_poll = time.monotonic()
        while self._running:
            try:
                item = self._outputs.get(timeout=self.CANCEL_POLL_S)
            except queue.Empty:
                item = None
            if item is not None:
                self._deliver_round([item, *self._pending()])
            now = time.monotonic()
            if now - last_poll >= self.CANCEL_POLL_S:
                last_poll = now
                self._poll_cancelled()

    def _deliver_round(self, items: list[tuple[float, RequestOutput]]) -> None:
        """Send ``items`` merged per request, first tokens first (``_coalesce``); every
        ``RECHECK_EVERY`` sends, merge in what the engine emitted since, so new first tokens and
        finals go ahead of the rest of the round."""
        round_ = _coalesce(items)
        while round_:
            head, round_ = round_[:self.RECHECK_EVERY], round_[self.RECHECK_EVERY:]
            for at, out in head:
                try:
                    self._deliver(at, out)
                except Exception:  # one bad response must not stop the others
                    log.exception("failed to deliver a response")
            if round_:
                more = self._pending()
                if more:
                    round_ = _coalesce(round_ + more)

    def _pending(self) -> list[tuple[float, RequestOutput]]:
        """Whatever else is queued now (a ``None`` from stop() is put back for the loop)."""
        items = []
        while True:
            try:
                item = self._outputs.get_nowait()
            except queue.Empty:
                return items
            if item is None:
                self._outputs.put(None)
                return items
            items.append(item)

    def _poll_cancelled(self) -> None:
        with self._lock:
            streams = [s for s in self._streams.values() if not s.cancelled]
        if len(streams) > self.CANCEL_POLL_BATCH:
            first = self._poll_cursor % len(streams)
            self._poll_cursor = first + self.CANCEL_POLL_BATCH
            streams = (streams[first:] + streams[:first])[:self.CANCEL_POLL_BATCH]
        for s in streams:
            try:
                cancelled = s.sink.is_cancelled()
            except Exception:
                cancelled = True  # a sender that cannot answer has lost its client
            if cancelled:
                self._cancel(s)

    def _cancel(self, s: _Stream) -> None:
        with self._lock:  # the poll, abort_client_id (control thread) and stop() may race
            if s.cancelled:
                return
            s.cancelled = True
            self.counters.cancelled += 1
        self.engine.abort(s.request_id)  # unknown to the engine yet: the intake drops it

    def _deliver(self, at: float, out: RequestOutput) -> None:
        with self._lock:
            s = self._streams.get(out.request_id)
        if s is None:
            return
        if s.first_token is None and (out.delta_token_ids or out.token_ids):
            s.first_token = at
            if self.on_first_token is not None:
                self.on_first_token(at - s.arrival, s.lora_name)
        if not out.finished:
            if s.request.stream and not s.cancelled:
                s.held_text += out.delta_text
                s.held_tokens += len(out.delta_token_ids)
                if s.held_text and (s.responses == 0 or s.held_tokens >= self.stream_interval):
                    first = s.responses == 0
                    self._send(s, self._payload(s, out, s.held_text), None, final=False)
                    s.held_text, s.held_tokens = "", 0
                    if first and s.responses and self.on_first_response is not None:
                        self.on_first_response(time.monotonic() - s.first_token, s.lora_name)
            return
        with self._lock:
            self._streams.pop(out.request_id, None)
        if self.on_finished is not None:
            self.on_finished(out.finish_reason or "", s.lora_name)
        if out.finish_reason == "abort" or s.cancelled:
            self._send(s, None, ServingError(CANCELLED, f"request {s.client_id!r} was cancelled"),
                       final=True)
        elif out.finish_reason == "error" or out.error:
            self.counters.errors += 1
            self._send(s, None, ServingError(INTERNAL, out.error or "generation failed"), final=True)
        elif s.request.stream:
            self._send(s, self._payload(s, out, s.held_text + out.delta_text), None, final=True)
        else:
            text = out.text if s.request.exclude_input_in_output else s.request.prompt + out.text
            self._send(s, self._payload(s, out, text), None, final=True)

    @staticmethod
    def _payload(s: _Stream, out: RequestOutput, text: str) -> ResponsePayload:
        """Counts: the running total, or (``per_response_counts``) this response's own tokens."""
        total = len(out.token_ids)
        count = total - s.tokens_sent if s.request.per_response_counts else total
        s.tokens_sent = total
        return ResponsePayload(
            text=text,
            finish_reason=(out.finish_reason or "") if out.finished else "",
            num_input_tokens=out.num_prompt_tokens,
            num_output_tokens=count,
        )

    def _send(self, s: _Stream, payload: ResponsePayload | None, error: ServingError | None,
              final: bool) -> None:
        try:
            s.sink.send(payload, error, final)
            s.responses += 1
            s.sent_final = s.sent_final or final
        except Exception as e:
            # The client is gone (or the sender closed on cancellation): stop generating for it.
            self.counters.send_failures += 1
            log.debug("send for %s failed: %s", s.request_id, e)
            if not final:
                self._cancel(s)


def _coalesce(items: list[tuple[float, RequestOutput]]) -> list[tuple[float, RequestOutput]]:
    """Merge each request's queued outputs into one: first tokens first, then final outputs,
    then the rest, each group in order of first arrival.

    Every response is a round trip to the server process; when this thread falls behind the
    engine, one response per request carrying all its new text keeps up where one per token
    would not. The first output's time is kept (it dates the first token). The order: at one
    response per token and ~250 streams, a round of sends takes ~60 ms (230 us each on the
    H200's host), and a request's first token (the SLO's clock) or its end should not wait
    behind other streams' next tokens.
    """
    merged: dict[str, tuple[float, RequestOutput]] = {}
    for at, out in items:
        prev = merged.get(out.request_id)
        if prev is None:
            merged[out.request_id] = (at, out)
        else:
            first_at, before = prev
            merged[out.request_id] = (first_at, dataclasses.replace(
                out, delta_token_ids=before.delta_token_ids + out.delta_token_ids,
                delta_text=before.delta_text + out.delta_text))
    return sorted(merged.values(), key=_send_rank)


def _send_rank(item: tuple[float, RequestOutput]) -> int:
    out = item[1]
    if out.delta_token_ids and len(out.delta_token_ids) == len(out.token_ids):
        return 0  # carries the request's first tokens: nothing of it was delivered before
    return 1 if out.finished else 2
