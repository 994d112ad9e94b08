"""Engine statistics as Prometheus metrics (through whatever metric objects the caller made)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .gateway_metrics import KV_CACHE_USAGE_METRIC, kv_cache_usage


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "gauge" | "counter"
    description: str
    stat: str  # key of EngineStats.to_dict(), or "kv_cache_usage" (derived from it)
    labels: tuple[tuple[str, str], ...] = ()


METRICS = (
    MetricSpec("slora_requests_running", "gauge", "Requests in the running batch", "num_running"),
    MetricSpec("slora_requests_waiting", "gauge", "Requests queued for admission", "num_waiting"),
    MetricSpec("slora_pool_pages", "gauge", "Pages of the unified pool by use", "pool_pages_kv",
               (("use", "kv"),)),
    MetricSpec("slora_pool_pages", "gauge", "Pages of the unified pool by use",
               "pool_pages_adapter", (("use", "adapter"),)),
    MetricSpec("slora_pool_pages", "gauge", "Pages of the unified pool by use", "pool_pages_free",
               (("use", "free"),)),
    MetricSpec("slora_pool_pages_total", "gauge", "Pages in the unified pool", "pool_pages_total"),
    MetricSpec(KV_CACHE_USAGE_METRIC, "gauge", "Fraction (0..1) of the unified pool's pages holding KV cache",
               "kv_cache_usage"),
    MetricSpec("slora_adapters", "gauge", "Adapters by residency", "adapters_gpu",
               (("residency", "gpu"),)),
    MetricSpec("slora_adapters", "gauge", "Adapters by residency", "adapters_host",
               (("residency", "host"),)),
    MetricSpec("slora_adapters", "gauge", "Adapters by residency", "adapters_registered",
               (("residency", "registered"),)),
    MetricSpec("slora_adapter_loads_total", "counter", "Adapters copied into the pool",
               "adapter_loads"),
    MetricSpec("slora_adapter_evictions_total", "counter", "Adapters evicted from the pool",
               "adapter_evictions"),
    MetricSpec("slora_adapter_hits_total", "counter",
               "Adapter lookups that found the adapter resident", "adapter_hits"),
    MetricSpec("slora_adapter_misses_total", "counter",
               "Adapter lookups that had to load the adapter", "adapter_misses"),
    MetricSpec("slora_generated_tokens_total", "counter", "Tokens generated", "generated_tokens"),
    MetricSpec("slora_finished_requests_total", "counter", "Requests finished (any reason)",
               "finished_requests"),
    MetricSpec("slora_preemptions_total", "counter", "Requests preempted for lack of pages",
               "preemptions"),
)
HIT_RATIO = MetricSpec("slora_adapter_hit_ratio", "gauge",
                       "Share of adapter lookups that found the adapter resident", "")
TTFT_NAME = "slora_time_to_first_token_seconds"
# Fine below 0.25 s, where first tokens of a served request fall (vLLM's TTFT histogram is
# as fine there): a p50 read off the buckets then resolves tens of milliseconds.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0, 30.0)
FIRST_RESPONSE_DELAY_NAME = "slora_first_response_delay_seconds"
FIRST_RESPONSE_DELAY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                0.25, 0.5, 1.0)


class MetricsPublisher:
    """Engine stats -> metric objects with ``set`` (gauges) or ``increment`` (counters).

    Counters are fed the growth of the engine's cumulative counts since the last update.
    """

    def __init__(self, metrics: Mapping[MetricSpec, Any], hit_ratio: Any) -> None:
        self.metrics = dict(metrics)
        self.hit_ratio = hit_ratio
        self._last: dict[MetricSpec, float] = {}

    def update(self, stats: Mapping[str, Any]) -> None:
        stats = {**stats, "kv_cache_usage": kv_cache_usage(stats)}
        for spec, metric in self.metrics.items():
            value = float(stats.get(spec.stat, 0))
            if spec.kind == "gauge":
                metric.set(value)
            else:
                delta = value - self._last.get(spec, 0.0)
                if delta > 0:
                    metric.increment(delta)
                self._last[spec] = value
        lookups = stats.get("adapter_hits", 0) + stats.get("adapter_misses", 0)
        if lookups:
            self.hit_ratio.set(stats.get("adapter_hits", 0) / lookups)
