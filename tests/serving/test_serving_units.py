"""The serving layer without a server: input parsing, the stream router's response and
cancellation rules, control actions, metrics, the server's process group, the stub's
environment, and the client's error parsing."""

from __future__ import annotations

import json
import math
import os
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from slora_client.errors import CancelledError, NotFoundError, from_message

from slora_backend.config import SamplingParams
from slora_backend.errors import AdapterBusyError, AdapterNotFoundError, InvalidRequestError
from slora_backend.launcher import group_alive, wait_group_exit
from slora_backend.launcher.triton_install import (
    build_backend_dir,
    find_tritonserver,
    stub_environment,
    stub_python_version,
)
from slora_backend.request import RequestOutput
from slora_backend.serving import (
    ControlHandler,
    ControlRequest,
    MetricsPublisher,
    ServingError,
    StreamRouter,
    error_from_exception,
    parse_adapter_action,
    parse_generate,
)
from slora_backend.serving.control import AdapterNames
from slora_backend.serving.metrics import HIT_RATIO, METRICS
from slora_backend.serving.router import _coalesce

# ---- inputs -----------------------------------------------------------------------------------


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


def test_parse_generate_full():
    req = parse_generate(getter(text_input="hi", max_tokens=7, temperature=0.5, top_p=0.9,
                                top_k=5, seed=np.array([2**63 + 1], dtype=np.uint64),
                                stop_words=["a", "", "bc"], ignore_eos=True, stream=True,
                                lora_name="pirate", exclude_input_in_output=True,
                                apply_chat_template=True), max_tokens_limit=100)
    assert req.prompt == "hi" and req.lora_name == "pirate" and req.stream
    assert req.exclude_input_in_output and req.apply_chat_template
    assert req.params == SamplingParams(max_tokens=7, temperature=0.5,
                                        top_p=float(np.float32(0.9)), top_k=5, seed=2**63 + 1,
                                        stop=("a", "bc"), ignore_eos=True)


def test_parse_generate_defaults():
    req = parse_generate(getter(text_input="hi", max_tokens=3, lora_name=""), 100)
    assert req.lora_name is None and not req.stream and not req.exclude_input_in_output
    assert req.params == SamplingParams(max_tokens=3)


@pytest.mark.parametrize("tensors, words", [
    (dict(max_tokens=3), ["missing required input 'text_input'"]),
    (dict(text_input="hi"), ["missing required input 'max_tokens'"]),
    (dict(text_input="", max_tokens=3), ["'text_input' is empty"]),
    (dict(text_input=b"\xffx", max_tokens=3), ["UTF-8", "0xff", "position 0"]),
    (dict(text_input="hi", max_tokens=0), ["max_tokens", ">= 1", "0"]),
    (dict(text_input="hi", max_tokens=101), ["101", "limit of 100"]),
    (dict(text_input="hi", max_tokens=3, temperature=math.nan), ["temperature", "NaN"]),
    (dict(text_input="hi", max_tokens=3, temperature=-1.0), ["temperature", ">= 0"]),
    (dict(text_input="hi", max_tokens=3, top_p=0.0), ["top_p", "(0, 1]"]),
    (dict(text_input="hi", max_tokens=3, top_p=math.nan), ["top_p", "NaN"]),
    (dict(text_input="hi", max_tokens=3, top_k=-2), ["top_k"]),
    (dict(text_input=["a", "b"], max_tokens=3), ["'text_input'", "exactly one value", "[2]"]),
    (dict(text_input="hi", max_tokens=3, lora_name=b"\xc3("), ["lora_name", "UTF-8"]),
    (dict(text_input="hi", max_tokens=3, min_length=2), ["min_length 2", "max_tokens 3"]),
])
def test_parse_generate_errors(tensors, words):
    with pytest.raises(ServingError) as info:
        parse_generate(getter(**tensors), max_tokens_limit=100)
    assert info.value.code == "INVALID_ARG"
    for word in words:
        assert word in info.value.message


def test_min_length_at_max_tokens_means_ignore_eos():
    req = parse_generate(getter(text_input="hi", max_tokens=3, min_length=3), 100)
    assert req.params.ignore_eos


def test_adapter_actions():
    assert parse_adapter_action(getter()).action == "resolve"
    req = parse_adapter_action(getter(action="load", lora_name="x", lora_path="sub/x"))
    assert (req.action, req.lora_name, req.lora_path) == ("load", "x", "sub/x")
    assert ControlRequest.from_json(req.to_json()) == req
    for tensors, word in [(dict(action="nope"), "unknown action 'nope'"),
                          (dict(action="unload"), "needs the input 'lora_name'"),
                          (dict(action="abort"), "needs the input 'request_id'")]:
        with pytest.raises(ServingError, match=word):
            parse_adapter_action(getter(**tensors))
    with pytest.raises(ServingError, match="unknown keys"):
        ControlRequest.from_json('{"action": "list", "evil": 1}')


def test_error_codes():
    assert error_from_exception(AdapterNotFoundError("x")).code == "NOT_FOUND"
    assert error_from_exception(AdapterBusyError("x")).code == "UNAVAILABLE"
    assert error_from_exception(InvalidRequestError("x")).code == "INVALID_ARG"
    assert error_from_exception(RuntimeError("boom")).code == "INTERNAL"
    assert ServingError("NOT_FOUND", "adapter 'x'").wire_message() == "NOT_FOUND: adapter 'x'"


# ---- the stream router ----------------------------------------------------------------------------


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


def _request(stream=True, exclude=False):
    return parse_generate(getter(text_input="Q: ", max_tokens=4, stream=stream,
                                 exclude_input_in_output=exclude), 100)


def _wait_added(engine, n=1):
    deadline = time.monotonic() + 5
    while len(engine.added) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return list(engine.added)[-1]


def test_router_streams_deltas_then_one_final():
    engine, sink, ttft = FakeEngine(), FakeSink(), []
    router = StreamRouter(engine, on_first_token=lambda s, lora: ttft.append(s))
    try:
        router.submit(_request(), "client-1", sink, time.monotonic())
        rid = _wait_added(engine)
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


def test_router_stream_interval_sends_every_n_tokens_first_at_once():
    engine, sink = FakeEngine(), FakeSink()
    router = StreamRouter(engine, stream_interval=3)
    try:
        router.submit(_request(), "c", sink, time.monotonic())
        rid = _wait_added(engine)
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
            rid = _wait_added(engine)
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
        rid = _wait_added(engine)
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
        _wait_added(engine, len(sinks))
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
        _wait_added(engine, 3)
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
        rid = _wait_added(engine)
        on_output = engine.added[rid][3]
        on_output(RequestOutput(rid, [], "", [], "", True, "error", 3, error="engine step failed"))
        assert sink.done.wait(5)
    finally:
        router.stop()
    assert sink.sent[-1][1].code == "INTERNAL" and "engine step failed" in sink.sent[-1][1].message


# ---- control and metrics ----------------------------------------------------------------------------


def test_control_handler_maps_engine_errors():
    class Engine:
        def unload_adapter(self, name):
            raise AdapterBusyError(f"adapter {name!r} is used by 2 requests")

        def resolve_adapter(self, name):
            raise AdapterNotFoundError(f"adapter {name!r} is not registered")

    handler = ControlHandler(Engine())
    with pytest.raises(ServingError) as info:
        handler.handle(ControlRequest("unload", "x"))
    assert info.value.code == "UNAVAILABLE" and "2 requests" in info.value.message
    with pytest.raises(ServingError) as info:
        handler.handle(ControlRequest("resolve", "y"))
    assert info.value.code == "NOT_FOUND"
    assert handler.handle(ControlRequest("resolve")) == {"name": None, "base_model": True}


def test_metrics_publisher_counts_growth_and_sets_gauges():
    class Metric:
        def __init__(self):
            self.value, self.increments = None, []

        def set(self, v):
            self.value = v

        def increment(self, v):
            self.increments.append(v)

    metrics = {spec: Metric() for spec in METRICS}
    hit_ratio = Metric()
    publisher = MetricsPublisher(metrics, hit_ratio)
    by_stat = {(s.stat, s.labels): m for s, m in metrics.items()}
    publisher.update({"num_running": 3, "generated_tokens": 10, "adapter_hits": 3,
                      "adapter_misses": 1, "pool_pages_kv": 7})
    publisher.update({"num_running": 1, "generated_tokens": 25, "adapter_hits": 3,
                      "adapter_misses": 1, "pool_pages_kv": 2})
    assert by_stat[("num_running", ())].value == 1
    assert by_stat[("generated_tokens", ())].increments == [10, 15]
    assert by_stat[("pool_pages_kv", (("use", "kv"),))].value == 2
    assert hit_ratio.value == 0.75
    assert HIT_RATIO not in metrics


# ---- launcher: the server's process group --------------------------------------------------------------


def test_wait_group_exit_waits_for_children_that_outlive_the_leader():
    """TritonServer.stop waits for the whole process group: after tritonserver exits, its stubs
    (and the engine process) may run on for a moment holding the GPU's memory."""
    import signal
    import subprocess

    leader = subprocess.Popen(["sh", "-c", "sleep 30 & echo forked; wait"],
                              start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert leader.stdout.readline() == "forked\n"  # the child exists
        leader.kill()
        leader.wait(5)  # the leader is gone, its child is not
        assert group_alive(leader.pid)
        assert not wait_group_exit(leader.pid, 0.2)
        os.killpg(leader.pid, signal.SIGKILL)
        assert wait_group_exit(leader.pid, 10.0)  # an unreaped zombie child counts as gone
        assert not group_alive(leader.pid)
    finally:
        try:
            os.killpg(leader.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        leader.stdout.close()


# ---- the stub's environment --------------------------------------------------------------------------


def test_triton_install_and_stub_environment(tmp_path):
    install = find_tritonserver(ngc_root=tmp_path / "no-such-root")
    assert install.source == "nvidia-pytriton"
    import sys

    assert stub_python_version(install.stub) == f"{sys.version_info.major}.{sys.version_info.minor}"
    backends = build_backend_dir(install, tmp_path / "backends")
    names = sorted(p.name for p in (backends / "python").iterdir())
    assert names == ["libtriton_python.so", "triton_python_backend_stub",
                     "triton_python_backend_utils.py"]
    env = stub_environment(install, base={"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/old"})
    ld = env["LD_LIBRARY_PATH"].split(":")
    assert ld[0] == sysconfig.get_config_var("LIBDIR")  # this Python's libpython first
    assert ld[-1] == "/old"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_ngc_layout_with_another_pythons_stub_is_skipped(tmp_path):
    install = find_tritonserver(ngc_root=tmp_path / "none")
    root = tmp_path / "ngc"
    (root / "bin").mkdir(parents=True)
    (root / "backends" / "python").mkdir(parents=True)
    (root / "bin" / "tritonserver").write_bytes(b"")
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (root / "backends" / "python" / f).write_bytes(b"")
    (root / "backends" / "python" / "triton_python_backend_stub").write_bytes(
        b"\x7fELF...libpython3.2.so.1.0...")
    assert find_tritonserver(ngc_root=root).source == "nvidia-pytriton"  # 3.2 is not us
    import sys

    tag = f"{sys.version_info.major}.{sys.version_info.minor}".encode()
    (root / "backends" / "python" / "triton_python_backend_stub").write_bytes(
        b"\x7fELF...libpython" + tag + b".so.1.0...")
    assert find_tritonserver(ngc_root=root).source == "ngc"
    assert install.server.is_file()


# ---- client errors -----------------------------------------------------------------------------------


def test_client_error_parsing():
    e = from_message("in ensemble 'slora', NOT_FOUND: adapter 'x' is not registered")
    assert isinstance(e, NotFoundError) and e.code == "NOT_FOUND"
    assert e.message == "adapter 'x' is not registered"
    assert isinstance(from_message("CANCELLED: request 'r' was cancelled"), CancelledError)
    raw = "[request id: 1] inference input 'x' data-type is 'FP32', but model expects 'INT32'"
    e = from_message(raw)
    assert e.code == "UNKNOWN" and e.message == raw


def test_adapter_names_checks_the_root_without_the_engine(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "mine", root / "bare", outside / "theirs"):
        d.mkdir(parents=True)
    (root / "mine" / "adapter_config.json").write_text("{}")
    (outside / "theirs" / "adapter_config.json").write_text("{}")
    (root / "escape").symlink_to(outside / "theirs")
    names = AdapterNames(root)
    assert names.check("mine") == {"name": "mine", "registered": False}
    for bad in ("nobody", "bare", "escape", "../outside/theirs", "mine/..", ""):
        with pytest.raises(ServingError) as e:
            names.check(bad)
        assert e.value.code == "NOT_FOUND" and repr(bad) in str(e.value)
    # A name the engine registered from elsewhere (registry.json) passes; the file is re-read
    # when the engine rewrites it.
    (root / "registry.json").write_text(json.dumps({"adapters": {"alias": "mine"}}))
    assert names.check("alias") == {"name": "alias", "registered": True}
    (root / "registry.json").write_text(json.dumps({"adapters": {}}))
    os.utime(root / "registry.json", (1, 1))
    with pytest.raises(ServingError):
        names.check("alias")


def test_control_channel_round_trip_errors_and_permissions(tmp_path):
    from slora_backend.serving import control_channel

    def handle(req):
        if req.action == "describe":
            raise AdapterNotFoundError(f"adapter {req.lora_name!r} is not registered")
        return {"action": req.action, "name": req.lora_name}

    path = str(tmp_path / "private" / "c.sock")
    server = control_channel.ControlServer(path, handle)
    try:
        assert os.stat(tmp_path / "private").st_mode & 0o777 == 0o700  # owner only
        assert control_channel.ask(path, ControlRequest("list")) == {"action": "list", "name": None}
        with pytest.raises(ServingError) as e:
            control_channel.ask(path, ControlRequest("describe", "ghost"))
        assert e.value.code == "NOT_FOUND" and "ghost" in e.value.message
    finally:
        server.close()
    assert not os.path.exists(path)
    with pytest.raises(ServingError) as e:
        control_channel.ask(path, ControlRequest("list"))
    assert e.value.code == "UNAVAILABLE"
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    with pytest.raises(PermissionError, match="0700"):
        control_channel.ControlServer(str(shared / "c.sock"), handle)
    # One socket per repository path, in the temp directory.
    a, b = control_channel.channel_path(tmp_path / "r1"), control_channel.channel_path(tmp_path / "r2")
    assert a != b and a == control_channel.channel_path(tmp_path / "r1")
