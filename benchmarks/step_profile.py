"""Where an engine's step time goes during a replay: a diagnosis tool, not a benchmark.

``StepProfile(engine)`` wraps, on that engine instance only, ``step`` and the calls inside it
that can take long (scheduling, waiting for adapter copies, the forward, sampling - which
waits for the GPU); with ``cprofile=True`` it also runs the engine thread under cProfile, which
slows the engine's host side about 2x (so those runs are for finding hot functions, not for
timing). ``report()`` gives per-phase totals and percentiles plus the step's batch shape;
``write(dir, name)`` saves the report as JSON and, with cProfile, the engine thread's hottest
functions as text.

Host timings only: a phase that only launches GPU work looks cheap, and its GPU time shows up
in ``sample`` (the first call that waits for the GPU). Used by ``harness --profile-dir``.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Any

PHASES = ("schedule", "copy_wait", "execute", "prefetch", "sample")


class StepProfile:
    def __init__(self, engine: Any, cprofile: bool = False) -> None:
        self.engine = engine
        self.steps: list[dict[str, Any]] = []
        self.profile = cProfile.Profile() if cprofile else None
        self._current: dict[str, Any] | None = None
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.copier, "wait", "copy_wait")
        self._wrap(engine.runner, "execute", "execute", self._note_batch)
        self._wrap(engine, "_prefetch_adapters", "prefetch")
        self._wrap(engine.sampler, "sample", "sample")
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
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                if self._current is not None:
                    self._current[phase] = self._current.get(phase, 0.0) + dt
                    if note is not None:
                        note(self._current, *args)
                    if phase == "step":
                        self._current["running"] = len(self.engine.scheduler.running)
                        self._current["waiting"] = len(self.engine.scheduler.waiting)
                        self.steps.append(self._current)
                        self._current = None

        setattr(obj, attr, timed)

    @staticmethod
    def _note_batch(step: dict[str, Any], scheduled, residents) -> None:
        step["batch"] = len(scheduled)
        step["tokens"] = sum(s.num_new_tokens for s in scheduled)
        step["adapters"] = len(residents)

    def report(self) -> dict[str, Any]:
        worked = [s for s in self.steps if "batch" in s]
        total = sum(s["step"] for s in worked) or 1e-9
        phases = {}
        for phase in ("step", *PHASES):
            values = sorted(s.get(phase, 0.0) for s in worked)
            if not values:
                continue
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
