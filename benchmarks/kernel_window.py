"""The kernel window of a step profile: torch.profiler over chosen steps (by index, or by kind:
mixed / decode, optionally a minimum batch), GPU time per kernel name against the window's wall
time and the steps' GPU spans; the first profiled steps' Chrome traces."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

TIMELINES_KEPT = 2


class KernelWindow:
    """torch.profiler over ``count`` working steps after the first ``first`` (idle steps between
    them are inside the window but not counted); or, with ``first`` = "mixed" / "decode" (or
    "decode@B": batches of at least B sequences), over the forward and sampling of the next
    ``count`` steps of that kind, each profiled alone (the steps between run unprofiled).
    Reports GPU time per kernel name, and the kernels' time against the window's wall time and,
    on CUDA, against the steps' GPU spans (how busy the GPU was while those forwards ran)."""

    def __init__(self, first: int | str, count: int, timeline: bool = False) -> None:
        self.timeline = timeline
        self._timelines: list[Any] = []  # the first profiled steps' profilers, for their traces
        self.kind, self.min_batch = parse_step_kind(first) if isinstance(first, str) else (None, 0)
        self.first, self.count = (0 if self.kind else first), count
        self.profiler = None
        self.summary: dict[str, Any] | None = None
        self._t0 = 0.0
        self._start = 0  # index in the step list where the window opened
        self._times: dict[str, list[float]] = {}  # kernel -> [us, calls], over the window
        self._wall = 0.0
        self._window: list[dict[str, Any]] = []

    def before_step(self, steps: list[dict[str, Any]]) -> None:
        if self.kind is not None or self.profiler is not None or self.summary is not None:
            return
        if sum(1 for s in steps if "batch" in s) < self.first:
            return
        self._open()
        self._start = len(steps)

    def before_execute(self, scheduled: list[Any]) -> None:
        if self.kind is None or self.profiler is not None or self.summary is not None:
            return
        mixed = any(s.num_new_tokens > 1 for s in scheduled)
        if mixed == (self.kind == "mixed") and len(scheduled) >= self.min_batch:
            self._open()

    def after_step(self, steps: list[dict[str, Any]]) -> None:
        if self.profiler is None:
            return
        if self.kind is None:
            window = [s for s in steps[self._start:] if "batch" in s]  # idle steps do not count
            if len(window) < self.count:
                return
        else:
            window = [steps[-1]]
        import torch

        if torch.cuda.is_available():  # the step's kernels run on after it returns
            torch.cuda.synchronize()
        self.profiler.stop()
        self._wall += time.perf_counter() - self._t0
        if self.timeline and len(self._timelines) < TIMELINES_KEPT:
            self._timelines.append(self.profiler)
        for name, (us, calls) in kernel_times(self.profiler).items():
            total = self._times.setdefault(name, [0.0, 0])
            total[0] += us
            total[1] += calls
        self._window += window
        self.profiler = None
        if len(self._window) >= self.count:
            self.summary = kernel_summary(self._times, self._wall, self._window)

    def _open(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        # on a machine without CUDA the CPU ops stand in for kernels (tests run the window)
        cuda = torch.cuda.is_available()
        activities = [ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]
        if self.timeline and cuda:
            activities.append(ProfilerActivity.CPU)
        self.profiler = profile(activities=activities)
        self.profiler.start()
        self._t0 = time.perf_counter()


    def write_timelines(self, directory: Path, name: str) -> None:
        """The kept steps' Chrome traces (host ops and kernels), gzipped."""
        import gzip
        import os
        import tempfile

        for i, prof in enumerate(self._timelines):
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
                path = tmp.name
            try:
                prof.export_chrome_trace(path)
                with open(path, "rb") as raw, gzip.open(directory / f"{name}_timeline{i}.json.gz",
                                                       "wb") as out:
                    out.write(raw.read())
            finally:
                os.unlink(path)


def parse_step_kind(text: str) -> tuple[str, int]:
    """"mixed" / "decode", optionally "@B" (a minimum batch): (kind, B). ValueError otherwise."""
    kind, at, batch = text.partition("@")
    if kind not in ("mixed", "decode") or (at and not batch.isdigit()):
        raise ValueError(f"expected mixed or decode, optionally @MIN_BATCH, got {text!r}")
    return kind, int(batch) if at else 0


def kernel_times(profiler: Any) -> dict[str, tuple[float, int]]:
    """Kernel name -> (GPU microseconds, launches); CPU op time where there is no CUDA."""
    import torch

    if torch.cuda.is_available():
        kind, self_us = torch.autograd.DeviceType.CUDA, lambda e: e.self_device_time_total
    else:
        kind, self_us = torch.autograd.DeviceType.CPU, lambda e: e.self_cpu_time_total
    return {e.key: (self_us(e), e.count) for e in profiler.key_averages()
            if e.device_type == kind and self_us(e) > 0}


def kernel_summary(times: dict[str, list[float]], wall_s: float,
                    window: list[dict[str, Any]]) -> dict[str, Any]:
    busy_us = sum(us for us, _ in times.values())
    spans = [gpu_span_ms(s) for s in window if "_gpu_events" in s]
    top = sorted(times.items(), key=lambda kv: -kv[1][0])[:40]
    return {
        "steps": len(window),
        "batches": [s["batch"] for s in window],
        "mixed_steps": sum(1 for s in window if s["tokens"] > s["batch"]),
        "tokens": sum(s["tokens"] for s in window),
        "wall_ms": round(1e3 * wall_s, 2),
        "kernel_ms": round(busy_us / 1e3, 2),
        "gpu_busy": round(busy_us / 1e6 / wall_s, 3) if wall_s > 0 else None,
        "gpu_span_ms": round(sum(spans), 2) if spans else None,
        "kernel_share_of_span": round(busy_us / 1e3 / sum(spans), 3) if spans else None,
        "by_kernel": [{"name": name[:120], "ms": round(us / 1e3, 3), "calls": int(calls)}
                      for name, (us, calls) in top],
    }


def gpu_span_ms(step: dict[str, Any]) -> float:
    """A finished step's forward on the GPU, from its CUDA events (``report`` and the kernel
    window synchronise first: a step's tokens are read only during the next step)."""
    start, end = step["_gpu_events"]
    return start.elapsed_time(end)
