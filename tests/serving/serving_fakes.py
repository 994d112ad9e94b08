"""Stand-ins for the serving layer's unit tests: request tensors as Triton hands them to a model
(``getter``), an engine that records its calls and plays the engine thread (``FakeEngine``), and
a response sender (``FakeSink``)."""

from __future__ import annotations

import threading
import time

import numpy as np

from slora_backend.request import RequestOutput


def getter(**tensors):
    arrays = {}
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            arrays[name] = value
        elif isinstance(value, (bytes, str)):
            arrays[name] = np.array([value.encode() if isinstance(value, str) else value],
                                    dtype=np.object_)
        elif isinstance(value, list):
            arrays[name] = np.array([v.encode() for v in value], dtype=np.object_)
        elif isinstance(value, bool):
            arrays[name] = np.array([value])
        elif isinstance(value, float):
            arrays[name] = np.array([value], dtype=np.float32)
        else:
            arrays[name] = np.array([value], dtype=np.int32)
    return arrays.get


class FakeEngine:
    """Records calls; ``emit`` plays the engine thread."""

    tokenizer = None

    def __init__(self, refuse: Exception | None = None):
        self.added, self.aborted = {}, []
        self.refuse = refuse

    def add_request(self, prompt, params, lora_name, request_id, on_output):
        if self.refuse:
            raise self.refuse
        self.added[request_id] = (prompt, params, lora_name, on_output)

    def abort(self, request_id):
        self.aborted.append(request_id)
        if request_id in self.added:
            self.emit(request_id, [], "", finished=True, reason="abort")

    def emit(self, request_id, tokens, delta, finished=False, reason=None, text=None):
        on_output = self.added[request_id][3]
        on_output(RequestOutput(request_id, tokens, text if text is not None else delta,
                                tokens[-1:], delta, finished, reason, 3))


class FakeSink:
    def __init__(self):
        self.sent, self.cancelled = [], False
        self.done = threading.Event()

    def send(self, payload, error, final):
        self.sent.append((payload, error, final))
        if final:
            self.done.set()

    def is_cancelled(self):
        return self.cancelled


def wait_added(engine, n=1):
    deadline = time.monotonic() + 5
    while len(engine.added) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return list(engine.added)[-1]
