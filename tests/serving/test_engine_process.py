"""The engine in a child process (``serving.EngineProcess``) answers like the engine in-process:
the same greedy tokens and streamed text, the same errors by type, adapter management, aborts
that free their pages, and a clear end for everything in flight when the child dies."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from slora_backend import (
    AdapterBusyError,
    AdapterNotFoundError,
    Engine,
    EngineConfig,
    InvalidRequestError,
    SamplingParams,
)
from slora_backend.request import RequestOutput
from slora_backend.serving import EngineProcess, EngineProcessError
from tests.conftest import make_adapter

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


class Collector:
    """Every output of every request, and an event per finished request."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.done: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def expect(self, request_id: str) -> str:
        self.outputs[request_id] = []
        self.done[request_id] = threading.Event()
        return request_id

    def __call__(self, out: RequestOutput) -> None:
        with self._lock:
            self.outputs[out.request_id].append(out)
        if out.finished:
            self.done[out.request_id].set()

    def final(self, request_id: str, timeout: float = 60) -> RequestOutput:
        assert self.done[request_id].wait(timeout), f"{request_id} did not finish"
        return self.outputs[request_id][-1]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_models["gqa"], root / "a8", 8, ["q_proj", "v_proj"], 16)
    make_adapter(tiny_models["gqa"], root / "b4", 4, ["k_proj", "o_proj"], 4, seed=1)
    config = EngineConfig(base_model=str(tiny_models["gqa"]), adapter_root=str(root),
                          max_model_len=128)
    remote = EngineProcess(config)
    yield remote, config
    remote.stop()


def test_same_tokens_and_text_as_the_engine_in_process(setup):
    remote, config = setup
    remote.load_adapter("a8", "a8")
    remote.load_adapter("b4", "b4")
    prompts = ["The sea is", "Tell me a story about", "1, 2, 3,"]
    names = ["a8", None, "b4"]
    collect = Collector()
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        remote.add_request(prompt, GREEDY, name, request_id=collect.expect(f"r{i}"),
                           on_output=collect)
    local = Engine(config)  # restores the adapters the child registered (registry.json)
    assert sorted(a.name for a in local.list_adapters()) == ["a8", "b4"]
    expected = local.generate(prompts, GREEDY, names)
    for i, want in enumerate(expected):
        got = collect.final(f"r{i}")
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids, want.text, want.finish_reason)
        streamed = collect.outputs[f"r{i}"]
        assert "".join(o.delta_text for o in streamed) == want.text
        assert sum((o.delta_token_ids for o in streamed), []) == want.token_ids
        assert [len(o.token_ids) for o in streamed] == list(range(1, len(want.token_ids) + 1))
        assert all(not o.finished for o in streamed[:-1])


def test_errors_keep_their_type_and_the_engine_keeps_serving(setup):
    remote, _ = setup
    with pytest.raises(InvalidRequestError, match="above the limit"):
        remote.add_request("hello", SamplingParams(max_tokens=1000), None, on_output=None)
    with pytest.raises(AdapterNotFoundError, match="missing"):
        remote.add_request("hello", GREEDY, "missing", on_output=None)
    collect = Collector()
    remote.add_request("hello", GREEDY, None, request_id=collect.expect("dup"), on_output=collect)
    with pytest.raises(InvalidRequestError, match="already in use"):
        remote.add_request("hello", GREEDY, None, request_id="dup", on_output=collect)
    assert len(collect.final("dup").token_ids) == GREEDY.max_tokens


def test_adapter_management_through_the_process(setup):
    remote, _ = setup
    remote.resolve_adapter("a8")  # registered by the first test, or loaded now
    info = remote.describe_adapter("a8")
    assert (info.name, info.rank) == ("a8", 8)
    collect = Collector()
    slow = SamplingParams(max_tokens=100, ignore_eos=True)
    remote.add_request("busy", slow, "a8", request_id=collect.expect("busy"), on_output=collect)
    with pytest.raises(AdapterBusyError):
        remote.unload_adapter("a8")
    remote.abort("busy")
    assert collect.final("busy").finish_reason == "abort"
    remote.unload_adapter("a8")
    assert "a8" not in {a.name for a in remote.list_adapters()}
    stats = remote.stats()
    assert (stats.pool_pages_kv, stats.num_running, stats.num_waiting) == (0, 0, 0)


def test_a_dead_engine_process_ends_everything_in_flight(tiny_models):
    remote = EngineProcess(EngineConfig(base_model=str(tiny_models["gqa"]), max_model_len=512))
    collect = Collector()
    remote.add_request("long", SamplingParams(max_tokens=400, ignore_eos=True),
                       request_id=collect.expect("long"), on_output=collect)
    os.kill(remote.pid, signal.SIGKILL)
    final = collect.final("long")
    assert final.finish_reason == "error" and "exit code -9" in final.error
    with pytest.raises(EngineProcessError, match="exited"):
        remote.stats()
    with pytest.raises(EngineProcessError, match="exited"):
        remote.add_request("again", GREEDY, on_output=collect)
    remote.stop()


def test_stop_aborts_what_is_in_flight(tiny_models):
    remote = EngineProcess(EngineConfig(base_model=str(tiny_models["gqa"]), max_model_len=512))
    collect = Collector()
    remote.add_request("long", SamplingParams(max_tokens=400, ignore_eos=True),
                       request_id=collect.expect("long"), on_output=collect)
    remote.stop()
    assert collect.final("long", timeout=1).finish_reason == "abort"


def test_a_failed_start_says_why(tmp_path):
    with pytest.raises(EngineProcessError, match="failed to start.*does-not-exist"):
        EngineProcess(EngineConfig(base_model=str(tmp_path / "does-not-exist")))
