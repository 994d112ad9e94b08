"""Control actions without a server: the handler's mapping of engine errors, the adapter name
check without the engine, the control channel, and the metrics publisher."""

from __future__ import annotations

import json
import os

import pytest

from slora_backend.errors import AdapterBusyError, AdapterNotFoundError
from slora_backend.serving import (
    ControlHandler,
    ControlRequest,
    MetricsPublisher,
    ServingError,
)
from slora_backend.serving.control import AdapterNames
from slora_backend.serving.metrics import HIT_RATIO, METRICS


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
