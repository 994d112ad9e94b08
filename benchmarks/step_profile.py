"""Where an engine's step time goes during a replay: a diagnosis tool, not a benchmark.

``StepProfile(engine)`` wraps, on that engine instance only, ``step`` and the calls inside it
that can take long (scheduling, waiting for adapter copies, the forward, sampling - which
waits for the GPU); with ``cprofile=True`` it also runs the engine thread under cProfile, which
slows the engine's host side about 2x (so those runs are for finding hot functions, not for
timing). ``report()`` gives per-phase totals and percentiles plus the step's batch shape;
``write(dir, name)`` saves the report as JSON and, with cProfile, the engine thread's hottest
functions as text.

Host timings, plus on CUDA one GPU span per step: ``gpu_execute``, from the point the forward
starts on the compute stream to the point its last kernel ends (CUDA events; no sync added). A
phase that only launches GPU work looks cheap on the host, and its GPU time shows up in
``read`` (reading the tokens of the step launched before: the only call that waits for the
GPU, while this step's forward is queued behind that one); ``gpu_execute`` near ``execute``
means the host was the bottleneck, well above it means the GPU was. ``kernel_window=(first, count)`` also
runs torch.profiler over that many steps - or, with first = "mixed" / "decode" (optionally
"decode@B", batches of at least B), over that many steps of the kind - and reports GPU time per
kernel name (the profiler slows launches, so the profiled steps' host timings are not
representative); ``timeline=True`` adds the host's ops to that window and writes the first
steps' timelines as Chrome traces. ``launch_lag=True`` marks every decoder layer's start in
eager forwards (host time and a CUDA event): how far the GPU runs behind the host's launches
through a step, without a profiler's overhead. Used by ``harness --profile-dir``.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Any

PHASES = ("schedule", "copy_wait", "execute", "sample", "prefetch", "read")
# parts of ``execute``: the engine thread's CPU time in it, building the step's LoRA tables,
# copying a graph step's inputs in, the host time of eager LoRA and attention calls (launches;
# a graph replay makes none)
EXECUTE_PARTS = ("execute_cpu", "lora_tables", "graph_fill", "lora_ops", "attention_ops")


class StepProfile:
    def __init__(self, engine: Any, cprofile: bool = False,
                 kernel_window: tuple[int | str, int] | None = None, timeline: bool = False,
                 launch_lag: bool = False) -> None:
        self.engine = engine
        self.kernels = _KernelWindow(*kernel_window, timeline=timeline) if kernel_window else None
        self._cuda = engine.device.type == "cuda"
        self.lag = _LaunchLag(engine.runner.model) if launch_lag and self._cuda else None
        self.steps: list[dict[str, Any]] = []
        self.profile = cProfile.Profile() if cprofile else None
        self._current: dict[str, Any] | None = None
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.adapters.copier, "wait", "copy_wait")
        self._wrap(engine.runner, "execute", "execute", self._note_batch)
        self._wrap(engine.runner, "_lora_batch", "lora_tables")
        if engine.runner.graphs is not None:
            self._wrap(engine.runner.graphs, "_fill", "graph_fill")
        # (on the ops instance: graphs captured before this keep calling nothing from Python)
        for attr, phase in (("lora_shrink", "lora_ops"), ("lora_expand", "lora_ops"),
                            ("attention", "attention_ops")):
            self._wrap(engine.runner.ops, attr, phase)
        self._wrap(engine.adapters, "prefetch_for", "prefetch")
        self._wrap(engine.sampler, "sample_on_device", "sample")
        self._wrap(engine.outputs, "process", "read")
        self._wrap(engine, "step", "step")
        if self.profile is not None:
            loop, profile = engine._loop, self.profile
            engine._loop = lambda: profile.runcall(loop)
        self.compiles: list[dict[str, Any]] = []
        _on_triton_compile(self._note_compile)
        self._allocator_start = _allocator_counts(engine)

    def _note_compile(self, kernel: str) -> None:
        self.compiles.append({"t": round(time.perf_counter(), 3), "kernel": kernel[:400]})

    def close(self) -> None:
        _on_triton_compile(None)

    def _wrap(self, obj: Any, attr: str, phase: str, note=None) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            if phase == "step":
                self._current = {"t": time.perf_counter()}
                if self.kernels is not None:
                    self.kernels.before_step(self.steps)
            if phase == "execute" and self.kernels is not None:
                self.kernels.before_execute(args[0])
            events = _record_event() if phase == "execute" and self._cuda else None
            cpu0 = time.thread_time() if phase == "execute" else 0.0
            t0 = time.perf_counter()
            if events is not None and self.lag is not None:
                self.lag.open(t0, events)
            try:
                return inner(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                if events is not None and self._current is not None:
                    self._current["_gpu_events"] = (events, _record_event())
                    if self.lag is not None:
                        self._current["_marks"] = self.lag.close(self._current["_gpu_events"][1])
                if phase == "execute" and self._current is not None:
                    # the engine thread's CPU time: well below ``execute`` means it slept (on
                    # the GIL, a lock); near it does not rule out the driver spinning (a launch
                    # finding the GPU's launch queue full)
                    self._current["execute_cpu"] = time.thread_time() - cpu0
                if self._current is not None:
                    self._current[phase] = self._current.get(phase, 0.0) + dt
                    if note is not None:
                        note(self._current, *args)
                    if phase == "step":
                        self._current["running"] = len(self.engine.scheduler.running)
                        self._current["waiting"] = len(self.engine.scheduler.waiting)
                        self.steps.append(self._current)
                        self._current = None
                        if self.kernels is not None:
                            self.kernels.after_step(self.steps)

        setattr(obj, attr, timed)

    @staticmethod
    def _note_batch(step: dict[str, Any], scheduled, residents, pending=None) -> None:
        step["batch"] = len(scheduled)
        step["tokens"] = sum(s.num_new_tokens for s in scheduled)
        step["adapters"] = len(residents)

    def report(self) -> dict[str, Any]:
        if self._cuda:
            import torch

            torch.cuda.synchronize(self.engine.device)
        for s in self.steps:
            if "_marks" in s:
                s.update(_lag_figures(s.pop("_marks")))
            if "_gpu_events" in s:
                s["gpu_execute"] = _gpu_span_ms(s) / 1e3
                del s["_gpu_events"]
        worked = [s for s in self.steps if "batch" in s]
        total = sum(s["step"] for s in worked) or 1e-9
        phases = {}
        for phase in ("step", *PHASES, *EXECUTE_PARTS, "gpu_execute"):
            if not any(phase in s for s in worked):
                continue
            values = sorted(s.get(phase, 0.0) for s in worked)
            phases[phase] = {
                "total_s": round(sum(values), 4),
                "share_of_step": round(sum(values) / total, 3),
                "p50_ms": round(1e3 * values[len(values) // 2], 3),
                "p90_ms": round(1e3 * values[int(len(values) * 0.9)], 3),
                "max_ms": round(1e3 * values[-1], 3),
            }
        prefill = [s for s in worked if s["tokens"] > s["batch"]]
        decode = [s for s in worked if s["tokens"] == s["batch"]]

        def mean(rows: list[dict[str, Any]], key: str) -> float | None:
            return round(sum(r[key] for r in rows) / len(rows), 4) if rows else None

        return {
            "steps": len(worked),
            "idle_steps": len(self.steps) - len(worked),
            "phases": phases,
            "decode_steps": len(decode),
            "decode_step_ms_avg": None if not decode else round(1e3 * mean(decode, "step"), 3),
            "decode_batch_avg": mean(decode, "batch"),
            "decode_adapters_avg": mean(decode, "adapters"),
            "mixed_steps": len(prefill),
            "mixed_step_ms_avg": None if not prefill else round(1e3 * mean(prefill, "step"), 3),
            "mixed_tokens_avg": mean(prefill, "tokens"),
            "kernels": None if self.kernels is None else self.kernels.summary,
            "launch_lag": None if self.lag is None else {
                "mixed": _lag_summary(prefill), "decode": _lag_summary(decode)},
            "triton_compiles": self.compiles,
            # cudaMalloc / cudaFree calls and allocation retries during the replay: each free
            # and retry synchronises the device, which a host timing would misread as host work
            "cuda_allocator": {k: v - self._allocator_start.get(k, 0)
                               for k, v in _allocator_counts(self.engine).items()},
            "timeline": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items()}
                         for s in worked[:2000]],
        }

    def hottest(self, limit: int = 45) -> str:
        out = io.StringIO()
        stats = pstats.Stats(self.profile, stream=out)
        stats.sort_stats("tottime").print_stats(limit)
        stats.sort_stats("cumulative").print_stats(limit)
        return out.getvalue()

    def write(self, directory: Path, name: str) -> None:
        self.close()
        directory.mkdir(parents=True, exist_ok=True)
        if self.kernels is not None:
            self.kernels.write_timelines(directory, name)
        (directory / f"{name}_steps.json").write_text(json.dumps(self.report(), indent=1))
        if self.profile is not None:
            (directory / f"{name}_pstats.txt").write_text(self.hottest())


class _KernelWindow:
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
        if self.timeline and len(self._timelines) < _TIMELINES_KEPT:
            self._timelines.append(self.profiler)
        for name, (us, calls) in _kernel_times(self.profiler).items():
            total = self._times.setdefault(name, [0.0, 0])
            total[0] += us
            total[1] += calls
        self._window += window
        self.profiler = None
        if len(self._window) >= self.count:
            self.summary = _kernel_summary(self._times, self._wall, self._window)

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


_TIMELINES_KEPT = 2


class _LaunchLag:
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
            self._marks.append((time.perf_counter(), _record_event()))


def _lag_figures(marks: list[tuple[float, Any]]) -> dict[str, Any]:
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


def _lag_summary(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
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


def parse_step_kind(text: str) -> tuple[str, int]:
    """"mixed" / "decode", optionally "@B" (a minimum batch): (kind, B). ValueError otherwise."""
    kind, at, batch = text.partition("@")
    if kind not in ("mixed", "decode") or (at and not batch.isdigit()):
        raise ValueError(f"expected mixed or decode, optionally @MIN_BATCH, got {text!r}")
    return kind, int(batch) if at else 0


def _kernel_times(profiler: Any) -> dict[str, tuple[float, int]]:
    """Kernel name -> (GPU microseconds, launches); CPU op time where there is no CUDA."""
    import torch

    if torch.cuda.is_available():
        kind, self_us = torch.autograd.DeviceType.CUDA, lambda e: e.self_device_time_total
    else:
        kind, self_us = torch.autograd.DeviceType.CPU, lambda e: e.self_cpu_time_total
    return {e.key: (self_us(e), e.count) for e in profiler.key_averages()
            if e.device_type == kind and self_us(e) > 0}


def _kernel_summary(times: dict[str, list[float]], wall_s: float,
                    window: list[dict[str, Any]]) -> dict[str, Any]:
    busy_us = sum(us for us, _ in times.values())
    spans = [_gpu_span_ms(s) for s in window if "_gpu_events" in s]
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


def _gpu_span_ms(step: dict[str, Any]) -> float:
    """A finished step's forward on the GPU, from its CUDA events (``report`` and the kernel
    window synchronise first: a step's tokens are read only during the next step)."""
    start, end = step["_gpu_events"]
    return start.elapsed_time(end)


def _record_event() -> Any:
    import torch

    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _allocator_counts(engine: Any) -> dict[str, int]:
    if engine.device.type != "cuda":
        return {}
    import torch

    stats = torch.cuda.memory_stats(engine.device)
    return {k: int(stats.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc",
                                               "num_device_free", "num_sync_all_streams")}


def _on_triton_compile(callback) -> None:
    """Have Triton call ``callback(repr=...)`` before it compiles a kernel variant (Triton
    >= 3.4); the variant's repr names the argument types it specialised on."""
    try:
        from triton import knobs
    except ImportError:
        return
    if callback is None:
        knobs.runtime.jit_cache_hook = None
        return

    def hook(*, repr: str, **kwargs: Any) -> None:
        callback(repr)
        return None  # compile as usual

    knobs.runtime.jit_cache_hook = hook
