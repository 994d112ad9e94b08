"""The stream router without a server: its response rules (deltas, stream interval, one final,
coalescing, the prompt prepended) and cancellation, against a stand-in engine."""

from __future__ import annotations

import threading
import time

import pytest

from slora_backend.errors import AdapterNotFoundError
from slora_backend.request import RequestOutput
from slora_backend.serving import (
    StreamRouter,
    parse_generate,
)
from slora_backend.serving.router import _coalesce
from tests.serving.serving_fakes import FakeEngine, FakeSink, getter, wait_added


def _request(stream=True, exclude=False):
    return parse_generate(getter(text_input="Q: ", max_tokens=4, stream=stream,
                                 exclude_input_in_output=exclude), 100)




def test_router_streams_deltas_then_one_final():
    engine, sink, ttft, delays = FakeEngine(), FakeSink(), [], []
    router = StreamRouter(engine, on_first_token=lambda s, lora: ttft.append(s),
                          on_first_response=lambda s, lora: delays.append(s))
    try:
        router.submit(_request(), "client-1", sink, time.monotonic())
        rid = wait_added(engine)
        assert rid.startswith("client-1/")
        engine.emit(rid, [5], "a")
        engine.emit(rid, [5, 6], "")  # a held-back delta: nothing to send
        engine.emit(rid, [5, 6, 7], "bc", finished=True, reason="length", text="abc")
        assert sink.done.wait(5)
    finally:
        router.stop()
    # Deltas the response thread finds queued together go out as one response (_coalesce).
    assert "".join(p.text for p, e, final in sink.sent) == "abc"
    assert [final for p, e, final in sink.sent][-1] and sum(f for _, _, f in sink.sent) == 1
    last = sink.sent[-1][0]
    assert (last.finish_reason, last.num_output_tokens) == ("length", 3)
    assert len(ttft) == 1 and router.num_in_flight() == 0
    # (a first response before the final one, if the thread did not merge them all)
    assert len(delays) == (len(sink.sent) > 1) and all(0 <= d < 5 for d in delays)


@pytest.mark.parametrize("stream", [True, False])
def test_router_reports_the_first_response_of_a_stream_once(stream):
    """``on_first_response``: once per streaming request, when its first response has been
    sent, with the seconds since its first token arrived; never for a request answered whole."""
    engine, sink, delays = FakeEngine(), FakeSink(), []
    router = StreamRouter(engine, on_first_response=lambda s, lora: delays.append((s, lora)))
    try:
        router.submit(_request(stream=stream), "c", sink, time.monotonic())
        rid = wait_added(engine)
        engine.emit(rid, [5], "a")
        deadline = time.monotonic() + 5
        while stream and not sink.sent:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        engine.emit(rid, [5, 6], "b")
        engine.emit(rid, [5, 6, 7], "c", finished=True, reason="length", text="abc")
        assert sink.done.wait(5)
    finally:
        router.stop()
    if stream:
        assert len(delays) == 1 and 0 <= delays[0][0] < 5
    else:
        assert delays == [] and len(sink.sent) == 1


def test_router_stream_interval_sends_every_n_tokens_first_at_once():
    engine, sink = FakeEngine(), FakeSink()
    router = StreamRouter(engine, stream_interval=3)
    try:
        router.submit(_request(), "c", sink, time.monotonic())
        rid = wait_added(engine)
        texts = ["a", "b", "", "c", "d", "e", "f", "g"]  # "" : a token whose text is held back
        for i, text in enumerate(texts):
            engine.emit(rid, list(range(i + 1)), text)
            deadline = time.monotonic() + 5
            while i == 0 and not sink.sent:  # the first token goes out on its own
                assert time.monotonic() < deadline
                time.sleep(0.005)
            time.sleep(0.02)  # one engine step at a time (the queue may still merge some)
        engine.emit(rid, list(range(9)), "h", finished=True, reason="length")
        assert sink.done.wait(5)
    finally:
        router.stop()
    assert "".join(p.text for p, e, final in sink.sent) == "abcdefgh"
    finals = [f for _, _, f in sink.sent]
    assert sink.sent[0][0].text == "a" and finals == [False] * (len(finals) - 1) + [True]
    counts = [p.num_output_tokens for p, e, final in sink.sent[:-1]]
    assert all(b - a >= 3 for a, b in zip(counts, counts[1:])), counts  # >= 3 new tokens each
    if len(sink.sent) == 4:  # nothing merged: exactly every third token
        assert [p.text for p, e, final in sink.sent] == ["a", "bc", "def", "gh"]
    with pytest.raises(ValueError, match="stream_interval must be >= 1"):
        StreamRouter(engine, stream_interval=0)


def test_queued_outputs_of_a_request_merge_into_one_response():
    def out(rid, tokens, delta, finished=False):
        return RequestOutput(rid, tokens, "", tokens[-1:], delta, finished,
                             "length" if finished else None, 3)

    items = [(1.0, out("a", [5], "x")), (1.5, out("b", [7], "p")), (2.0, out("a", [5, 6], "y")),
             (3.0, out("a", [5, 6, 8], "z", finished=True))]
    merged = _coalesce(items)
    assert [(at, o.request_id, o.delta_text, o.delta_token_ids, o.finished) for at, o in merged] == [
        (1.0, "a", "xyz", [5, 6, 8], True), (1.5, "b", "p", [7], False)]
    assert merged[0][1].token_ids == [5, 6, 8] and merged[0][1].finish_reason == "length"


def test_coalesced_outputs_send_first_tokens_then_finals_then_the_rest():
    def out(rid, tokens, new, finished=False):
        return RequestOutput(rid, tokens, "", tokens[-new:] if new else [], "t" * new, finished,
                             "length" if finished else None, 3)

    items = [(1.0, out("running", [1, 2, 3], 1)),        # a later token of a running request
             (2.0, out("ending", [4, 5], 1, finished=True)),
             (3.0, out("new", [6], 1)),                   # a first token
             (4.0, out("other", [7, 8], 1)),
             (5.0, out("new2", [9, 10], 2)),              # first tokens, two steps merged
             (6.0, out("running", [1, 2, 3, 11], 1))]
    order = [(o.request_id, o.delta_token_ids) for _, o in _coalesce(items)]
    assert order == [("new", [6]), ("new2", [9, 10]), ("ending", [5]),
                     ("running", [3, 11]), ("other", [8])]


def test_router_non_streaming_prepends_prompt_unless_excluded():
    for exclude, want in ((False, "Q: abc"), (True, "abc")):
        engine, sink = FakeEngine(), FakeSink()
        router = StreamRouter(engine)
        try:
            router.submit(_request(stream=False, exclude=exclude), "", sink, time.monotonic())
            rid = wait_added(engine)
            engine.emit(rid, [1], "a")
            engine.emit(rid, [1, 2], "bc", finished=True, reason="stop", text="abc")
            assert sink.done.wait(5)
        finally:
            router.stop()
        assert [(p.text, final) for p, e, final in sink.sent] == [(want, True)]


def test_router_cancellation_aborts_in_engine_and_answers_once():
    engine, sink = FakeEngine(), FakeSink()
    router = StreamRouter(engine)
    try:
        router.submit(_request(), "c", sink, time.monotonic())
        rid = wait_added(engine)
        engine.emit(rid, [1], "a")
        sink.cancelled = True  # the client went away: found by the router's poll
        assert sink.done.wait(5)
    finally:
        router.stop()
    assert engine.aborted == [rid]
    finals = [(e.code if e else None) for p, e, final in sink.sent if final]
    assert finals == ["CANCELLED"]
    assert router.counters.cancelled == 1


def test_router_polls_a_bounded_share_of_streams_and_finds_every_cancellation():
    class CountingSink(FakeSink):
        asked = 0

        def is_cancelled(self):
            CountingSink.asked += 1
            return self.cancelled

    engine, sinks = FakeEngine(), [CountingSink() for _ in range(10)]
    router = StreamRouter(engine)
    router.CANCEL_POLL_BATCH = 3
    try:
        for i, sink in enumerate(sinks):
            router.submit(_request(stream=False), f"c{i}", sink, time.monotonic())
        wait_added(engine, len(sinks))
        CountingSink.asked = 0
        router._poll_cancelled()  # (the router thread polls too: at most two polls' worth)
        assert 3 <= CountingSink.asked <= 6
        for sink in sinks[::3]:  # non-streaming: only the poll can notice
            sink.cancelled = True
        assert all(sink.done.wait(5) for sink in sinks[::3])
    finally:
        router.stop()
    ids = list(engine.added)  # in submission order (one intake thread)
    assert set(engine.aborted[:4]) == set(ids[::3])
    assert router.counters.cancelled == 10  # 4 cancelled by their clients, 6 by stop()


def test_router_abort_by_client_id():
    engine, sinks = FakeEngine(), [FakeSink(), FakeSink(), FakeSink()]
    router = StreamRouter(engine)
    try:
        for i, sink in enumerate(sinks):
            router.submit(_request(), "same" if i < 2 else "other", sink, time.monotonic())
        wait_added(engine, 3)
        assert router.abort_client_id("same") == 2
        assert sinks[0].done.wait(5) and sinks[1].done.wait(5)
        assert not sinks[2].done.is_set()
    finally:
        router.stop()  # aborts and answers the last one
    assert sinks[2].sent[-1][1].code == "CANCELLED"


def test_router_engine_refusal_is_a_final_error():
    engine, sink = FakeEngine(refuse=AdapterNotFoundError("adapter 'x' is not registered")), FakeSink()
    router = StreamRouter(engine)
    try:
        router.submit(_request(), "c", sink, time.monotonic())
        assert sink.done.wait(5)
    finally:
        router.stop()
    (payload, error, final), = sink.sent
    assert payload is None and final and error.code == "NOT_FOUND"
    assert router.num_in_flight() == 0


def test_router_engine_error_output():
    engine, sink = FakeEngine(), FakeSink()
    router = StreamRouter(engine)
    try:
        router.submit(_request(), "c", sink, time.monotonic())
        rid = wait_added(engine)
        on_output = engine.added[rid][3]
        on_output(RequestOutput(rid, [], "", [], "", True, "error", 3, error="engine step failed"))
        assert sink.done.wait(5)
    finally:
        router.stop()
    assert sink.sent[-1][1].code == "INTERNAL" and "engine step failed" in sink.sent[-1][1].message



def test_a_first_token_emitted_mid_round_goes_out_before_the_rest_of_the_round():
    """Sends are slow (a round trip each): a first token the engine emits while a round of
    other streams' tokens is being sent waits for at most RECHECK_EVERY of them."""
    engine = FakeEngine()
    router = StreamRouter(engine)
    order: list[str] = []
    stalls = {"blocker": threading.Event(), "r0": threading.Event()}  # set: let the send go
    stalled = {name: threading.Event() for name in stalls}

    class Sink(FakeSink):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def send(self, payload, error, final):
            if self.name in stalls and not stalled[self.name].is_set():
                stalled[self.name].set()  # (its first send only)
                assert stalls[self.name].wait(5)
            order.append(self.name)
            super().send(payload, error, final)

    def add(name):
        router.submit(_request(), name, Sink(name), time.monotonic())
        return wait_added(engine, len(engine.added) + 1)

    try:
        streams = [add(f"r{i}") for i in range(3 * StreamRouter.RECHECK_EVERY)]
        stalled["r0"].set()  # r0's first token goes out freely; its second one will stall
        for rid in streams:
            engine.emit(rid, [1], "a")
        _wait(lambda: len(order) == len(streams))
        stalled["r0"].clear()
        engine.emit(add("blocker"), [1], "a")  # holds the response thread ...
        assert stalled["blocker"].wait(5)
        for rid in streams:  # ... while every stream's second token queues: one round
            engine.emit(rid, [1, 2], "b")
        stalls["blocker"].set()
        assert stalled["r0"].wait(5)  # that round's first send
        engine.emit(add("late"), [7], "z")  # a first token, emitted mid-round
        stalls["r0"].set()
        _wait(lambda: len(order) == 2 * len(streams) + 2)
        sent = list(order)  # (stopping the router below sends every stream a final response)
    finally:
        for event in stalls.values():
            event.set()
        router.stop()
    second_round = sent[len(streams) + 1:]
    assert second_round[0] == "r0" and second_round.count("late") == 1
    assert second_round.index("late") <= StreamRouter.RECHECK_EVERY  # not after all 48


def _wait(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)
