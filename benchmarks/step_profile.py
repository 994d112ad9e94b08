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
through a step, without a profiler's overhead. Used by ``harness --profile-dir``. The kernel
window lives in ``kernel_window``, the launch-lag marks in ``launch_lag``.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Any

from .kernel_window import KernelWindow, gpu_span_ms
from .launch_lag import LaunchLag, lag_figures, lag_summary, record_event

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
        self.kernels = KernelWindow(*kernel_window, timeline=timeline) if kernel_window else None
        self._cuda = engine.device.type == "cuda"
        self.lag = LaunchLag(engine.runner.model) if launch_lag and self._cuda else None
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
            # (the loop thread's body, replaced before ``engine.start()`` starts the thread)
            loop, profile = engine.loop._run, self.profile
            engine.loop._run = lambda: profile.runcall(loop)
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
            events = record_event() if phase == "execute" and self._cuda else None
            cpu0 = time.thread_time() if phase == "execute" else 0.0
            t0 = time.perf_counter()
            if events is not None and self.lag is not None:
                self.lag.open(t0, events)
            try:
                return inner(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                if events is not None and self._current is not None:
                    self._current["_gpu_events"] = (events, record_event())
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
                s.update(lag_figures(s.pop("_marks")))
            if "_gpu_events" in s:
                s["gpu_execute"] = gpu_span_ms(s) / 1e3
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
                "mixed": lag_summary(prefill), "decode": lag_summary(decode)},
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
