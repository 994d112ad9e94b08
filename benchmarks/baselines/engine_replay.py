"""Replay a trace into this engine in-process: the S-LoRA system and baselines (b), (c), (d).

The engine runs on its own thread (``engine.start()``); this thread submits each request at its
arrival time with ``ignore_eos`` so every request generates exactly ``output_len`` tokens. The
variants differ only in their EngineConfig (and, for (b), in sending no adapter):

- ``slora``: unified pool, the engine's LoRA kernels;
- ``no_lora`` (b): the same requests on the base model - the upper bound;
- ``bmm`` (c): ``lora_ops="bmm"``, LoRA as padded gather + torch.bmm (the paper's ablation);
- ``no_unified`` (d): ``adapter_pool_pages``, adapters in a fixed partition of their own.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..adapter_sets import model_spec, write_registry
from ..metrics import OccupancySampler, Recorder, stats_delta
from ..prompts import token_prompts
from ..run_metadata import gpu_state
from ..workload import LORA_TARGETS, Workload, paced
from .replay_note import replay_summary

ABORTED_AT_LIMIT = "time_limit"


@dataclass(frozen=True)
class EngineVariant:
    system: str
    label: str
    use_adapters: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)


def variant(key: str, partition_pages: int | None = None) -> EngineVariant:
    """``slora`` or a baseline letter: b (no LoRA), c (bmm), d (no unified memory)."""
    if key == "slora":
        return EngineVariant("slora", "S-LoRA (this engine)")
    if key == "b":
        return EngineVariant("no_lora", "(b) base model, no adapters", use_adapters=False)
    if key == "c":
        return EngineVariant("bmm", "(c) LoRA as padded gather + torch.bmm",
                             overrides={"lora_ops": "bmm"})
    if key == "d":
        if partition_pages is None:
            raise ValueError("baseline d needs partition_pages (the fixed adapter partition)")
        return EngineVariant("no_unified", f"(d) adapters in a fixed {partition_pages}-page "
                             "partition", overrides={"adapter_pool_pages": partition_pages})
    raise ValueError(f"unknown engine variant {key!r}; known: slora, b, c, d")


def partition_pages(base_model: str, block_tokens: int, rank: int, num_adapters: int) -> int:
    """Pages of a fixed adapter partition holding ``num_adapters`` adapters of ``rank``."""
    from slora_backend.layout import PoolLayout

    plan = PoolLayout(model_spec(base_model), block_tokens).plan_adapter(
        {m: rank for m in LORA_TARGETS})
    return plan.num_pages * num_adapters


def build_engine(engine_kwargs: dict[str, Any], v: EngineVariant, adapter_root: Path | None,
                 adapter_names: Sequence[str]) -> Any:
    """An engine whose registry holds exactly ``adapter_names`` (registered at start-up)."""
    from slora_backend import Engine, EngineConfig

    if adapter_root is not None and v.use_adapters:
        write_registry(adapter_root, adapter_names)
    kwargs = {**engine_kwargs, **v.overrides}
    kwargs["adapter_root"] = str(adapter_root) if adapter_root and v.use_adapters else None
    return Engine(EngineConfig(**kwargs))


def free_device_memory(device: Any) -> None:
    """Give cached device memory back once the last reference to an engine or model is gone
    (the next engine sizes its pool from free memory, so cached blocks must go too)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def warm_up(engine: Any, workload: Workload, use_adapters: bool) -> None:
    """Compile kernels before timing: prefill and decode with each rank of the set, and a
    mixed-rank batch (kernels may specialise on the batch's max rank)."""
    from slora_backend import SamplingParams

    names: list[str | None] = [None]
    if use_adapters:
        by_rank: dict[int, str] = {}
        for a in workload.adapters:
            by_rank.setdefault(a.rank, a.name)
        names += list(by_rank.values())
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    prompt = list(range(3, 35))
    for name in names:
        engine.generate([prompt], params, [name])
    engine.generate([prompt] * len(names), params, names)
    if engine.config.preload_adapters:  # the paper's set-up: every adapter in host memory first
        engine.adapters.reads.wait_preloads()


def replay(engine: Any, workload: Workload, v: EngineVariant, *, slo_s: float,
           time_limit_s: float | None = None, prompt_seed: int = 0,
           sample_interval_s: float = 0.25, drain_timeout_s: float = 60.0,
           idle_timeout_s: float = 120.0) -> dict[str, Any]:
    """Replay ``workload`` into a started or stopped ``engine``; returns the run's figures.

    With ``time_limit_s``, requests arriving later are not sent and requests still running at
    the limit are aborted (finish reason ``time_limit``); throughput is then completed requests
    over the limit.
    """
    import torch

    from slora_backend import SamplingParams

    try:
        from slora_backend.errors import EngineOverloadedError
    except ImportError:  # older engine: no admission limit
        EngineOverloadedError = ()  # type: ignore[assignment]  # noqa: N806

    requests = workload.requests if v.use_adapters else workload.without_adapters().requests
    prompts = token_prompts(requests, engine.spec.vocab_size, prompt_seed)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    recorder = Recorder()
    sampler = OccupancySampler(engine, sample_interval_s)
    cut: set[str] = set()

    def on_output(out) -> None:
        now = time.perf_counter()
        sampler.maybe_sample(now)
        if out.finished:
            reason = ABORTED_AT_LIMIT if out.request_id in cut else (out.finish_reason or "")
            recorder.finish(out.request_id, reason, len(out.token_ids), now)
        elif out.delta_token_ids:
            recorder.token(out.request_id, len(out.token_ids), now)

    before = engine.stats().to_dict()
    graphs = engine.runner.graphs
    capture_s = graphs.capture_seconds if graphs else 0.0
    pieces = engine.runner.piecewise
    pieces_capture_s = pieces.capture_seconds if pieces else 0.0
    engine.start()
    start = time.perf_counter() + 0.05
    deadline = start + time_limit_s if time_limit_s else None
    for i, req, arrival in paced(requests, start, time_limit_s):
        rid = f"r{i}"
        recorder.submitted(rid, arrival, req.output_len)
        try:
            engine.add_request(prompts[i], SamplingParams(max_tokens=req.output_len, ignore_eos=True),
                               req.adapter, request_id=rid, on_output=on_output)
        except EngineOverloadedError:
            recorder.rejected(rid)
    truncated = not recorder.wait(deadline, idle_timeout_s)
    # Completions are counted up to the moment the run is cut, which is later than the deadline
    # when the submitter itself ran late (it then kept the engine busy past the limit).
    cut_at = time.perf_counter()
    if truncated:
        cut.update(recorder.open_ids())
        for rid in list(cut):
            engine.abort(rid)
        recorder.wait(time.perf_counter() + drain_timeout_s)
    finished = [r.finished for r in recorder.records.values() if r.finished is not None]
    end = max(finished, default=start) if not truncated or recorder.stalled else cut_at
    after = engine.stats().to_dict()
    result = {
        "system": v.system,
        "label": v.label,
        **replay_summary(recorder, requests_in_trace=len(requests), start=start, end=end,
                         truncated=truncated, slo_s=slo_s, time_limit_s=time_limit_s,
                         idle_timeout_s=idle_timeout_s, silence="output", open_requests="aborted"),
        **sampler.summary(),
        **stats_delta(before, after),
        "graph_capture_s": round(graphs.capture_seconds - capture_s, 2) if graphs else None,
        # (> 0: piecewise graphs captured while serving, each capture a stall of the steps)
        "piecewise_capture_s": round(pieces.capture_seconds - pieces_capture_s, 2) if pieces else None,
        "piecewise_capture_at_start_s": round(pieces_capture_s, 2) if pieces else None,
        "engine_config": asdict(engine.config),
    }
    if cuda:
        result["gpu_max_allocated_gib"] = round(
            torch.cuda.max_memory_allocated(engine.device) / 2**30, 2)
    return result


def run_variant(engine_kwargs: dict[str, Any], v: EngineVariant, workload: Workload,
                adapter_root: Path | None, *, slo_s: float, time_limit_s: float | None,
                prompt_seed: int = 0, profile_dir: Path | None = None,
                profile_options: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Build an engine for ``v``, warm it up, replay ``workload``, release it. With
    ``profile_dir``, the replay's step profile is written there (``benchmarks.step_profile``;
    ``profile_options`` are ``StepProfile``'s keywords: cProfile, kernel trace, launch lag)."""
    t0 = time.perf_counter()
    engine = build_engine(engine_kwargs, v, adapter_root, [a.name for a in workload.adapters])
    device = engine.device
    profile = None
    try:
        build_s = time.perf_counter() - t0
        warm_up(engine, workload, v.use_adapters)
        log(f"  {v.system}: engine ready in {build_s:.1f} s (+ warm-up "
            f"{time.perf_counter() - t0 - build_s:.1f} s), {engine.pool.num_pages} pool pages, "
            f"{engine.adapters.store.num_in_host} adapters in host memory")
        if profile_dir is not None:
            from ..step_profile import StepProfile

            profile = StepProfile(engine, **(profile_options or {}))
        result = replay(engine, workload, v, slo_s=slo_s, time_limit_s=time_limit_s,
                        prompt_seed=prompt_seed)
        if profile is not None:
            engine.stop()  # ends the profiled thread
            profile.write(profile_dir, v.system)
        result["engine_build_s"] = round(build_s, 2)
        result["gpu_state_after"] = gpu_state() if device.type == "cuda" else None
        return result
    finally:
        engine.stop()
        del engine, profile  # (the profile holds the engine too)
        free_device_memory(device)
