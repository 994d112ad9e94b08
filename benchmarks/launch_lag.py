"""Launch lag: how far the GPU runs behind the host's launches through an eager forward, from a
mark (host time, CUDA event) at each decoder layer's start; no profiler overhead."""

from __future__ import annotations

import time
from typing import Any


class LaunchLag:
    """Marks each decoder layer's start in an eager forward: the host's time and a CUDA event
    on the compute stream. When the GPU keeps up with the launches it reaches each mark soon
    after the host (host-bound); when it has more to do than the host, it falls ever further
    behind (GPU-bound). Graph replays pass no marks (their layers are not called)."""

    def __init__(self, model: Any) -> None:
        self._marks: list[tuple[float, Any]] | None = None
        for layer in model.layers:
            layer.register_forward_pre_hook(self._mark)

    def open(self, t0: float, start_event: Any) -> None:
        self._marks = [(t0, start_event)]

    def close(self, end_event: Any) -> list[tuple[float, Any]]:
        marks, self._marks = self._marks or [], None
        return marks + [(time.perf_counter(), end_event)]

    def _mark(self, module: Any, args: Any) -> None:
        if self._marks is not None:
            self._marks.append((time.perf_counter(), record_event()))


def lag_figures(marks: list[tuple[float, Any]]) -> dict[str, Any]:
    """Host and GPU times (ms from the execute's start) at each mark; the mark list is the
    execute's start, each layer's start, the execute's end."""
    if len(marks) < 3:
        return {}
    t0, e0 = marks[0]
    host = [1e3 * (t - t0) for t, _ in marks]
    gpu = [e0.elapsed_time(e) for _, e in marks]
    layers = len(marks) - 2
    return {
        "lag_prep_host_ms": round(host[1], 3),  # metadata before the first layer
        "lag_layer_host_ms": round((host[-1] - host[1]) / layers, 4),
        "lag_layer_gpu_ms": round((gpu[-1] - gpu[1]) / layers, 4),
        # GPU behind the host at the first layer, the middle one, the end of the forward
        "lag_ms": [round(gpu[i] - host[i], 3) for i in (1, 1 + layers // 2, len(marks) - 1)],
    }


def lag_summary(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    rows = [s for s in steps if "lag_ms" in s]
    if not rows:
        return None

    def median(values: list[float]) -> float:
        return round(sorted(values)[len(values) // 2], 3)

    return {
        "steps": len(rows),
        "prep_host_ms": median([s["lag_prep_host_ms"] for s in rows]),
        "layer_host_ms": median([s["lag_layer_host_ms"] for s in rows]),
        "layer_gpu_ms": median([s["lag_layer_gpu_ms"] for s in rows]),
        "lag_first_mid_end_ms": [median([s["lag_ms"][i] for s in rows]) for i in range(3)],
    }


def record_event() -> Any:
    import torch

    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
