"""Baseline (e)'s replay: one job of the harness's trace sent to vLLM's ``AsyncLLM``.

This module runs in vLLM's own Python process, started by ``benchmarks.baselines.vllm_peer``
with vLLM's interpreter and PYTHONPATH (vLLM needs numpy 2, the engine's environment numpy 1).
It imports nothing of the engine and no torch of its own: the job file holds everything that
defines the run, decided by the harness (the trace, the token-id prompts, vLLM's engine
arguments, the adapters and their stable ids), and the result is written as one JSON row.

Rules of the replay (the same as the harness's engine replay, ``engine_replay.replay``):
- each request is sent at its scheduled arrival (replay start + ``arrival_s``) on the event loop;
  greedy, ``ignore_eos``, ``min_tokens = max_tokens`` = the trace's output length, so every
  request generates exactly its length;
- first-token latency runs from the scheduled arrival (``benchmarks.metrics.Recorder``);
- with ``time_limit_s``: requests arriving at or after the limit are not sent, requests still
  open at the limit are cut (finish reason ``time_limit``) and throughput is completions over
  the time to the cut;
- before timing, a warm-up: the base model and the first adapter of each rank alone, then all
  of them in one batch with prompts across the trace's range (graphs and kernels compiled).

Usage (the harness does this): python -m benchmarks.baselines.vllm_replay JOB.json OUT.json
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..metrics import Recorder
from .replay_note import replay_summary

ABORTED_AT_LIMIT = "time_limit"
# FlashInfer is not carried to the GPU machine (greedy sampling never needs it); the machine
# reaches no network; the engine core must be spawned, not forked after CUDA is initialised.
VLLM_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


def sampling(num_tokens: int) -> Any:
    """Greedy, exactly ``num_tokens`` tokens, streamed as deltas, no detokenizing."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(temperature=0.0, max_tokens=num_tokens, min_tokens=num_tokens,
                          ignore_eos=True, detokenize=False, output_kind=RequestOutputKind.DELTA)


async def stream(engine: Any, request_id: str, prompt: list[int], num_tokens: int, lora: Any,
                 recorder: Recorder | None = None) -> int:
    """One request to its end; returns its output tokens and records them in ``recorder``."""
    produced = 0
    async for out in engine.generate({"prompt_token_ids": prompt}, sampling(num_tokens),
                                     request_id, lora_request=lora):
        now = time.perf_counter()
        produced += len(out.outputs[0].token_ids)
        if recorder is not None:
            if out.finished:
                recorder.finish(request_id, out.outputs[0].finish_reason or "", produced, now)
            else:
                recorder.token(request_id, produced, now)
    return produced


async def warm_up(engine: Any, warm_adapters: list[str | None], loras: dict[str, Any]) -> None:
    """Each adapter of ``warm_adapters`` (None: the base model) alone, then all in one batch."""
    requests = [loras.get(name) if name else None for name in warm_adapters]
    prompt = list(range(3, 35))
    for k, lora in enumerate(requests):
        await stream(engine, f"warm-{k}", prompt, 4, lora)
    lens = [8, 64, 200, 511]
    await asyncio.gather(*(
        stream(engine, f"warm-m{k}", list(range(3, 3 + lens[k % 4])), 4, requests[k % len(requests)])
        for k in range(2 * len(requests) + 4)))


async def replay(engine: Any, requests: list[list[Any]], prompts: list[list[int]],
                 loras: dict[str, Any], *, time_limit_s: float | None, slo_s: float,
                 idle_timeout_s: float = 120.0) -> dict[str, Any]:
    """Send ``requests`` (``[arrival_s, adapter or None, output_len]``) at their arrival times;
    returns ``benchmarks.metrics.summarize``'s figures and how the run ended."""
    recorder, tasks, errors = Recorder(), {}, []

    async def one(rid: str, i: int, adapter: str | None, output_len: int) -> None:
        try:
            await stream(engine, rid, prompts[i], output_len,
                         loras.get(adapter) if adapter else None, recorder)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - counted and reported in the row
            errors.append(repr(e)[:300])
            recorder.finish(rid, "error")

    start = time.perf_counter() + 0.05
    deadline = start + time_limit_s if time_limit_s else None
    for i, (arrival_s, adapter, output_len) in enumerate(requests):
        if time_limit_s is not None and arrival_s >= time_limit_s:
            break
        arrival = start + arrival_s
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        rid = f"r{i}"
        recorder.submitted(rid, arrival, output_len)
        tasks[rid] = asyncio.create_task(one(rid, i, adapter, output_len))
    truncated = False
    while pending := [t for t in tasks.values() if not t.done()]:
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            truncated = True
            break
        if now - recorder.last_event >= idle_timeout_s:
            truncated = recorder.stalled = True
            break
        await asyncio.wait(pending, timeout=1.0 if deadline is None else min(1.0, deadline - now))
    cut_at = time.perf_counter()
    if truncated:
        for rid in recorder.open_ids():
            recorder.finish(rid, ABORTED_AT_LIMIT, now=cut_at)
            tasks[rid].cancel()  # AsyncLLM aborts a request whose generator is cancelled
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    finished = [r.finished for r in recorder.records.values() if r.finished is not None]
    end = max(finished, default=start) if not truncated or recorder.stalled else cut_at
    result = replay_summary(recorder, requests_in_trace=len(requests), start=start, end=end,
                            truncated=truncated, slo_s=slo_s, time_limit_s=time_limit_s,
                            idle_timeout_s=idle_timeout_s, silence="output", open_requests="cut")
    if errors:
        result["errors"] = {"count": len(errors), "first": errors[0]}
    return result


def settings_in_effect(engine: Any) -> dict[str, Any]:
    """vLLM's own view of the settings that matter for the comparison (read back, not assumed)."""
    import vllm

    cfg = engine.vllm_config
    lora = cfg.lora_config
    return {
        "version": vllm.__version__,
        "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "async_scheduling": getattr(cfg.scheduler_config, "async_scheduling", None),
        "prefix_caching": cfg.cache_config.enable_prefix_caching,
        "kv_cache_blocks": cfg.cache_config.num_gpu_blocks,
        "enforce_eager": cfg.model_config.enforce_eager,
        "cudagraph_mode": str(getattr(cfg.compilation_config, "cudagraph_mode", None)),
        "lora": None if lora is None else {
            "max_loras": lora.max_loras, "max_lora_rank": lora.max_lora_rank,
            "max_cpu_loras": lora.max_cpu_loras,
            "target_modules": getattr(lora, "target_modules", None)},
    }


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Build the engine of ``job``, warm it up, replay its trace, shut it down."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    loras = {name: LoRARequest(name, lora_id, path) for name, lora_id, path in job["loras"]}
    t0 = time.perf_counter()
    # OPENAI_API_SERVER: the defaults `vllm serve` takes, as a deployment would run it.
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**job["engine_args"]),
                                       usage_context=UsageContext.OPENAI_API_SERVER)
    try:
        build_s = time.perf_counter() - t0
        await warm_up(engine, job["warm_adapters"], loras)
        print(f"[vllm {job['mode']}] engine built in {build_s:.1f} s, warm-up "
              f"{time.perf_counter() - t0 - build_s:.1f} s", flush=True)
        result = await replay(engine, job["requests"], job["prompts"], loras,
                              time_limit_s=job["time_limit_s"], slo_s=job["slo_s"],
                              idle_timeout_s=job.get("idle_timeout_s", 120.0))
        result["engine_build_s"] = round(build_s, 1)
        result["vllm"] = settings_in_effect(engine)
        return result
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.baselines.vllm_replay JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import uvloop  # what `vllm serve` runs on

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    result = run(run_job(job))
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
