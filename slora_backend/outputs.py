"""A step's outputs: each sampled token appended to its request, stop checks, finishing, emitting.

Sits beside the scheduler as nano-vllm's ``Scheduler.postprocess`` does: the engine hands it a
read step, it decides for each request whether it goes on or ends, and gives back the
``RequestOutput``s. It owns every live request's ``OutputStream`` (from ``add_request`` until the
request ends) and the counters of generated tokens and finished requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .output_stream import OutputCallback, OutputStream
from .request import Request, RequestOutput
from .sampler import NON_FINITE, Sampler
from .scheduler import Scheduler
from .step_in_flight import StepInFlight

NON_FINITE_ERROR = ("the model's logits for this request were not finite (NaN or inf): a "
                    "numerical overflow in its sequence; the other requests of its batch go on")


class OutputProcessor:
    """Thread rule: ``open`` and ``__contains__`` may be called from any thread while holding
    ``lock`` (the engine's inbox lock); everything else runs on the engine thread."""

    def __init__(self, scheduler: Scheduler, sampler: Sampler, tokenizer: object,
                 eos_ids: set[int], lock: threading.Lock,
                 abort: Callable[[str], None]) -> None:
        """``abort(request_id)``: queue an abort (a request whose consumer callback raised)."""
        self.scheduler = scheduler
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self._lock = lock
        self._abort = abort
        self.streams: dict[str, OutputStream] = {}
        self.generated_tokens = 0
        self.finished_requests = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.streams

    def open(self, request: Request, on_output: OutputCallback | None) -> None:
        """Start ``request``'s stream (the caller holds the lock). Raises ValueError on a
        request id already in use."""
        if request.request_id in self.streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.streams[request.request_id] = OutputStream(request, self.tokenizer, on_output)

    def request(self, request_id: str) -> Request | None:
        stream = self.streams.get(request_id)
        return stream.request if stream is not None else None

    def live_requests(self) -> list[Request]:
        return [s.request for s in list(self.streams.values())]

    def process(self, step: StepInFlight) -> list[RequestOutput | None]:
        """Append a launched step's tokens (waiting for the GPU to finish it); a request that
        ended meanwhile (stop, abort, error) drops its row: that row was speculative."""
        tokens = step.read()
        now = time.monotonic()
        return [self.append(r, slot, token, now)
                for r, slot, token in zip(step.requests, step.slots, tokens) if not r.finished]

    def append(self, request: Request, slot: int, token: int, now: float) -> RequestOutput | None:
        """``token`` read for the placeholder at ``output_token_ids[slot]``: the request goes on
        (an output, or None when nothing is emitted) or ends (its final output)."""
        if token == NON_FINITE:
            return self.finish(request, "error", error=NON_FINITE_ERROR)
        if request.first_token_time is None:
            request.first_token_time = now
        params = request.params
        if token in self.eos_ids and not params.ignore_eos:
            return self.finish(request, "stop")  # (drops the placeholder)
        request.output_token_ids[slot] = token
        request.num_pending_tokens -= 1
        self.generated_tokens += 1
        if self.streams[request.request_id].add_token(token):
            return self.finish(request, "stop", delta_tokens=[token])
        if slot + 1 >= params.max_tokens:
            return self.finish(request, "length", delta_tokens=[token])
        return self.emit(request, [token])

    def finish(self, request: Request, reason: str, delta_tokens: list[int] | None = None,
               error: str | None = None) -> RequestOutput:
        """End ``request``: its pages go back, its placeholders go, its final output is emitted."""
        self.scheduler.finish(request, reason)
        self.sampler.forget(request.request_id)
        self.finished_requests += 1
        # tokens still being sampled for it will not be read: their placeholders go
        del request.output_token_ids[len(request.output_token_ids) - request.num_pending_tokens:]
        request.num_pending_tokens = 0
        out = self.emit(request, delta_tokens or [], error)
        with self._lock:
            del self.streams[request.request_id]
        return out

    def emit(self, request: Request, delta_tokens: list[int], error: str | None = None) -> RequestOutput:
        stream = self.streams[request.request_id]
        out = stream.emit(delta_tokens, error)
        if stream.broken and not out.finished:
            self._abort(request.request_id)
        return out


def eos_token_ids(tokenizer: Any | None, hf_config: Any) -> set[int]:
    """Token ids that end a request: the tokenizer's EOS and the model config's (one or a list)."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(eos)
    return ids
