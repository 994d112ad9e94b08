"""The gateway metrics without a server: LoRA info series lifecycle, KV usage, max_lora."""

from __future__ import annotations

import pytest

from slora_backend.serving.gateway_metrics import (
    MAX_LORA_LABEL,
    RUNNING_ADAPTERS_LABEL,
    WAITING_ADAPTERS_LABEL,
    AdapterActivity,
    LoraInfoGauge,
    kv_cache_usage,
    max_lora,
)
from slora_backend.serving.metrics import METRICS, MetricsPublisher


class Series:
    def __init__(self, labels):
        self.labels, self.values = labels, []

    def set(self, value):
        self.values.append(value)


def test_activity_names_each_adapter_once_sorted_without_base():
    activity = AdapterActivity.of(["b", None, "a", "b", ""], ["c", None])
    assert activity == AdapterActivity(("a", "b"), ("c",))


def test_lora_info_makes_a_series_per_label_change_and_sets_time():
    made: list[Series] = []

    def make(labels):
        made.append(Series(labels))
        return made[-1]

    gauge = LoraInfoGauge(make, max_lora=4, base_labels={"model": "slora_engine"})
    gauge.update(AdapterActivity(("a",), ("b",)), now=100.0)
    gauge.update(AdapterActivity(("a",), ("b",)), now=101.0)  # same labels: same series
    gauge.update(AdapterActivity(("a", "b"), ()), now=102.0)
    assert len(made) == 2
    assert made[0].labels == {"model": "slora_engine", RUNNING_ADAPTERS_LABEL: "a",
                              WAITING_ADAPTERS_LABEL: "b", MAX_LORA_LABEL: "4"}
    assert made[0].values == [100.0, 101.0]
    assert made[1].labels[RUNNING_ADAPTERS_LABEL] == "a,b"
    assert made[1].labels[WAITING_ADAPTERS_LABEL] == ""
    assert made[1].values == [102.0]
    assert gauge._series is made[1]  # the old series is no longer referenced


def test_lora_info_refuses_a_zero_max_lora():
    with pytest.raises(ValueError, match="max_lora must be >= 1, got 0"):
        LoraInfoGauge(Series, max_lora=0)


def test_max_lora_is_the_batch_limit_else_one_per_sequence():
    assert max_lora(8, 256) == 8
    assert max_lora(None, 256) == 256


def test_kv_cache_usage_is_the_kv_share_of_the_pool():
    assert kv_cache_usage({"pool_pages_kv": 25, "pool_pages_total": 100}) == 0.25
    assert kv_cache_usage({}) == 0.0


def test_publisher_exports_kv_cache_usage():
    class Gauge:
        value = None

        def set(self, v):
            self.value = v

        def increment(self, v):
            pass

    metrics = {spec: Gauge() for spec in METRICS}
    MetricsPublisher(metrics, Gauge()).update({"pool_pages_kv": 30, "pool_pages_total": 120})
    usage = next(m for s, m in metrics.items() if s.stat == "kv_cache_usage")
    assert usage.value == 0.25


def test_router_reports_waiting_until_output_then_running():
    import time

    from slora_backend.serving import StreamRouter, parse_generate
    from tests.serving.serving_fakes import FakeEngine, FakeSink, getter, wait_added

    engine, sink_a, sink_b = FakeEngine(), FakeSink(), FakeSink()
    router = StreamRouter(engine)

    def request(lora):
        return parse_generate(getter(text_input="Q: ", max_tokens=4, lora_name=lora), 100)

    try:
        router.submit(request("a"), "c1", sink_a, time.monotonic())
        rid_a = wait_added(engine)
        router.submit(request("b"), "c2", sink_b, time.monotonic())
        wait_added(engine, 2)
        assert router.adapter_activity() == AdapterActivity((), ("a", "b"))
        engine.emit(rid_a, [5], "x")
        deadline = time.monotonic() + 5
        while router.adapter_activity().running != ("a",):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert router.adapter_activity() == AdapterActivity(("a",), ("b",))
        engine.emit(rid_a, [5, 6], "y", finished=True, reason="length")
        assert sink_a.done.wait(5)
        assert router.adapter_activity() == AdapterActivity((), ("b",))
    finally:
        router.stop()
