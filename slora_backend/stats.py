"""What an engine reports about itself (``Engine.stats``; the serving layer's metrics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .page_pool import KV

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    pool_pages_total: int
    pool_pages_free: int
    pool_pages_kv: int
    pool_pages_adapter: int
    adapter_partition_pages: int  # 0 with unified paging
    adapters_registered: int
    adapters_gpu: int
    adapters_host: int
    adapter_loads: int
    adapter_evictions: int
    adapter_hits: int
    adapter_misses: int
    adapter_prefetches: int
    generated_tokens: int
    finished_requests: int
    preemptions: int
    steps: int
    decode_graphs: int  # CUDA graphs captured so far (one per batch/rank/context bucket)
    graph_steps: int  # decode steps replayed from a graph
    piecewise_graphs: int  # piecewise graphs captured so far (layers + 1 per token/rank bucket)
    piecewise_steps: int  # steps that prefill, replayed from piecewise graphs
    # Seconds of the engine thread spent in steps, by kind (``step_clock``): launching a step and
    # waiting for its tokens; "other" = the rest of each step (scheduling, copies, outputs).
    step_seconds_graph: float
    step_seconds_piecewise: float
    step_seconds_eager: float
    step_seconds_other: float
    # The device's seconds in steps by kind (their spans on the compute stream) and idle between
    # steps (the next not yet launched when one ended); 0 off CUDA (``step_clock.DeviceClock``).
    device_seconds_graph: float
    device_seconds_piecewise: float
    device_seconds_eager: float
    device_idle_between_steps: float
    # Adapter copies: the copy thread's seconds (reading weights not in host memory yet,
    # pinning, queueing), the engine thread's seconds blocked waiting for copies not queued
    # yet, and the side stream's seconds copying (0 off CUDA; ``step_clock.CopyClock``).
    adapter_copy_host_seconds: float
    adapter_copy_wait_seconds: float
    adapter_copy_device_seconds: float

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def engine_stats(engine: Engine) -> EngineStats:
    """The engine's counters and pool occupancy now."""
    graphs, pieces = engine.runner.graphs, engine.runner.piecewise
    return EngineStats(
        num_running=len(engine.scheduler.running),
        num_waiting=len(engine.scheduler.waiting) + len(engine._inbox),
        pool_pages_total=engine.pool.num_pages,
        pool_pages_free=engine.pool.num_free,
        pool_pages_kv=engine.pool.used_by[KV],
        adapter_partition_pages=0 if engine.scheduler.unified else engine.adapters.pool.num_pages,
        **engine.adapters.stats(),
        generated_tokens=engine.outputs.generated_tokens,
        finished_requests=engine.outputs.finished_requests,
        preemptions=engine.scheduler.num_preemptions,
        steps=engine.steps,
        decode_graphs=graphs.num_graphs if graphs else 0,
        graph_steps=graphs.replays if graphs else 0,
        piecewise_graphs=pieces.num_graphs if pieces else 0,
        piecewise_steps=pieces.replays if pieces else 0,
        **{f"step_seconds_{kind}": round(seconds, 4) for kind, seconds in engine.clock.seconds.items()},
        **{f"device_seconds_{kind}": round(seconds, 4)
           for kind, seconds in engine.device_clock.seconds.items()},
        device_idle_between_steps=round(engine.device_clock.idle_between_steps, 4),
        adapter_copy_host_seconds=round(engine.adapters.copier.host_seconds, 4),
        adapter_copy_wait_seconds=round(engine.adapters.copier.wait_seconds, 4),
        adapter_copy_device_seconds=round(engine.runner.copy_clock.seconds, 4),
    )
