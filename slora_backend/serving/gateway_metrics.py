"""The metrics a Kubernetes inference gateway routes by (Gateway API Inference Extension's endpoint
picker, llm-d): queue length, running requests, KV-cache usage, and which adapters are in use.

The endpoint picker reads these from each model server's Prometheus endpoint under names given in
its engine config; vLLM's names are its defaults. Triton's metric names follow this project's
``slora_`` prefix (no ``:``: ``vllm:`` is vLLM's namespace, not a Prometheus convention), so the
gateway is given the mapping ``GATEWAY_METRIC_FLAGS`` (``deploy/kubernetes/`` writes it out).

LoRA info follows vLLM's ``vllm:lora_requests_info``: one gauge series whose labels carry the
comma-separated adapter names of running and waiting requests and ``max_lora``, and whose value is
the time of the update in seconds since the epoch; a scraper takes the series with the largest
value. This module keeps exactly one series: when the labels change, the new series is made and
set before the old one is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# Names exported on Triton's metrics port (the request counts are MetricsPublisher's gauges).
QUEUED_REQUESTS_METRIC = "slora_requests_waiting"
RUNNING_REQUESTS_METRIC = "slora_requests_running"
KV_CACHE_USAGE_METRIC = "slora_kv_cache_usage_perc"
LORA_INFO_METRIC = "slora_lora_requests_info"
RUNNING_ADAPTERS_LABEL = "running_lora_adapters"
WAITING_ADAPTERS_LABEL = "waiting_lora_adapters"
MAX_LORA_LABEL = "max_lora"
LORA_INFO_DESCRIPTION = ("Adapters of running and waiting requests (labels); the value is the "
                         "update time in seconds since the epoch")

# The endpoint picker's command-line flags (Gateway API Inference Extension up to v1.4; later
# releases take the same four names in the engine config of EndpointPickerConfig).
GATEWAY_METRIC_FLAGS = {
    "total-queued-requests-metric": QUEUED_REQUESTS_METRIC,
    "total-running-requests-metric": RUNNING_REQUESTS_METRIC,
    "kv-cache-usage-percentage-metric": KV_CACHE_USAGE_METRIC,
    "lora-info-metric": LORA_INFO_METRIC,
}


@dataclass(frozen=True)
class AdapterActivity:
    """Adapter names of the requests in flight: ``running`` once a request has produced output,
    ``waiting`` before (queued or in its prefill). The base model (no adapter) is not named."""

    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()

    @classmethod
    def of(cls, running: Iterable[str | None], waiting: Iterable[str | None]) -> AdapterActivity:
        return cls(tuple(sorted({n for n in running if n})), tuple(sorted({n for n in waiting if n})))


def kv_cache_usage(stats: dict[str, Any]) -> float:
    """Fraction (0..1) of the unified pool's pages that hold KV cache."""
    total = stats.get("pool_pages_total", 0)
    return stats.get("pool_pages_kv", 0) / total if total else 0.0


def max_lora(max_adapters_per_batch: int | None, max_num_seqs: int) -> int:
    """Adapters one batch may hold: the engine's limit, else one per sequence (S-LoRA has no fixed
    adapter slots; the pool bounds them, and each running sequence can use its own)."""
    return max_adapters_per_batch or max_num_seqs


class LoraInfoGauge:
    """Keeps the one LoRA info series current.

    ``make_series(labels)`` returns an object with ``set(value)`` (a Triton metric of the gauge
    family); dropping the last reference to a series removes it from the endpoint.
    """

    def __init__(self, make_series: Callable[[dict[str, str]], Any], max_lora: int,
                 base_labels: dict[str, str] | None = None) -> None:
        if max_lora < 1:
            raise ValueError(f"max_lora must be >= 1, got {max_lora}")
        self._make_series = make_series
        self._base_labels = dict(base_labels or {})
        self.max_lora = max_lora
        self._labels: dict[str, str] | None = None
        self._series: Any = None

    def labels_for(self, activity: AdapterActivity) -> dict[str, str]:
        return {**self._base_labels,
                RUNNING_ADAPTERS_LABEL: ",".join(activity.running),
                WAITING_ADAPTERS_LABEL: ",".join(activity.waiting),
                MAX_LORA_LABEL: str(self.max_lora)}

    def update(self, activity: AdapterActivity, now: float) -> None:
        labels = self.labels_for(activity)
        if labels != self._labels:
            series = self._make_series(labels)
            series.set(now)
            self._labels, self._series = labels, series  # the old series goes with its reference
        else:
            self._series.set(now)
