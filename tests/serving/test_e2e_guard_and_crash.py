"""Through a real tritonserver: an admin token guards adapter load / unload / abort while
generation stays open, and a killed engine process ends its streams with an error naming the
death, is restarted (``engine_restarts`` times), and then stays failed, saying so on every call."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest
from slora_client import SLoRAClient
from slora_client.errors import SLoRAClientError, UnavailableError

from tests.serving.conftest import make_adapter_root, running_server, server_options, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]

TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gqa, adapter_pool):
    tmp = tmp_path_factory.mktemp("e2e-guard")
    root = make_adapter_root(adapter_pool, tmp / "adapters")
    options = server_options(tiny_gqa, root, admin_token=TOKEN,
                             engine_params={"engine_restarts": 1})
    with running_server(options, tmp / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def anyone(server):
    with SLoRAClient(server.grpc_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def admin(server):
    with SLoRAClient(server.grpc_url, timeout=120, admin_token=TOKEN) as c:
        yield c


def test_management_needs_the_admin_token_and_generation_does_not(server, anyone, admin):
    with pytest.raises(UnavailableError, match="action 'load' is restricted on this server: send "
                                               "the admin token in the input 'admin_token' "
                                               r"\(the request has none\)"):
        anyone.load_adapter("r8-qv")
    with SLoRAClient(server.grpc_url, timeout=120, admin_token="a guess") as guesser:
        with pytest.raises(UnavailableError, match="the input 'admin_token' is not the admin token"):
            guesser.load_adapter("r8-qv")
    assert "r8-qv" not in {a["name"] for a in anyone.list_adapters()}  # reading stays open
    # Generation is open, including an adapter registered on first use.
    assert anyone.complete("Hello", lora_name="r4-mlp", max_tokens=4, ignore_eos=True).text
    assert admin.load_adapter("r8-qv")["name"] == "r8-qv"
    with pytest.raises(UnavailableError, match="action 'unload' is restricted"):
        anyone.unload_adapter("r8-qv")
    with pytest.raises(UnavailableError, match="action 'abort' is restricted"):
        anyone.abort("some-request")
    assert admin.abort("some-request") == 0
    admin.unload_adapter("r8-qv")
    assert "r8-qv" not in {a["name"] for a in anyone.list_adapters()}
    admin.load_adapter("r8-qv")  # served again after the restart below


def _kill_engine_mid_stream(client: SLoRAClient, pid: int) -> tuple[SLoRAClientError, float]:
    generation = client.generate("A long answer", max_tokens=400, ignore_eos=True,
                                 lora_name="r8-qv")
    assert next(generation)  # streaming has begun
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(SLoRAClientError) as e:
        for _ in generation:
            pass
    return e.value, time.monotonic() - killed


def test_a_killed_engine_ends_its_stream_and_is_restarted(server, anyone, admin):
    before = admin.stats()
    assert before["engine_restarts"] == 0
    error, seconds = _kill_engine_mid_stream(anyone, before["engine_pid"])
    assert error.code == "INTERNAL" and "the engine process exited (exit code -9)" in error.message
    assert seconds < 10

    def served():
        try:
            return anyone.complete("Hello", lora_name="r8-qv", max_tokens=4, ignore_eos=True)
        except UnavailableError as e:
            assert "the engine is restarting (restart 1 of 1)" in e.message
            return None

    assert wait_for(served, timeout=120, interval=0.5, what="a request after the restart").text
    after = admin.stats()
    assert after["engine_restarts"] == 1 and after["engine_pid"] != before["engine_pid"]
    # The restarted engine serves the adapters registered before (registry.json).
    assert {"r4-mlp", "r8-qv"} <= {a["name"] for a in anyone.list_adapters()}
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as r:
        assert r.status == 200


def test_a_second_death_leaves_the_model_failed_and_every_call_says_so(server, anyone, admin):
    pid = admin.stats()["engine_pid"]
    error, _ = _kill_engine_mid_stream(anyone, pid)
    assert "exit code -9" in error.message
    for call in (lambda: anyone.complete("Hello", max_tokens=4),
                 lambda: anyone.list_adapters()):
        with pytest.raises(UnavailableError, match="died 2 times and is restarted at most 1 "
                                                   "times .*stays failed until the server restarts"):
            call()
    log = server.log_file
    assert wait_for(lambda: "stays failed until the server restarts" in log.read_text(errors="replace"),
                    timeout=10, what="the final failure in the server log")
    assert "the engine process was restarted" in log.read_text(errors="replace")
    assert anyone.is_ready()  # Triton's readiness cannot reflect it (docs/serving.md)
