"""One decode step of the engine at batch B over B distinct adapters, against the bandwidth bound.

A decode step must read at least: the base weights (all linear layers and the LM head; only the
B embedding rows it looks up), the KV cache of every request at its current context length, and
the weights of the B adapters. At the measured HBM bandwidth (4.27e12 B/s on the H200, see
shared/docs/RUNTIME-NOTES.md) that takes ``bound_s = bytes / bandwidth``; the step is reported as
``step_s / bound_s`` (the issue asks for <= 1.5).

The step is ``engine.step()`` as the engine loop runs it (scheduling, batch metadata, forward,
sampling; the next step built while the GPU runs the last), timed back to back with CUDA events
after warm-up (``timed_steps``); a second run without adapters gives the base model's step at
the same batch for comparison.

Usage: python -m benchmarks.bench_decode_step --device cuda [--batch 64] [--context 512]
         [--rank 8] [--cache DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

H200_BANDWIDTH = 4.27e12  # B/s, torch sum over 4 GiB on the H200 (RUNTIME-NOTES.md)


def weight_bytes(engine: Any, batch: int) -> int:
    """Bytes of base weights one decode step reads (embedding: only the looked-up rows)."""
    model = engine.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not engine.spec.tie_word_embeddings:  # untied: the table is read by row only
        embed = model.embed
        total -= embed.numel() * embed.element_size()
        total += batch * embed.shape[1] * embed.element_size()
    return total


def kv_bytes(engine: Any, context_lens: list[int]) -> int:
    s = engine.spec
    elem = engine.runner.pool.element_size()
    return sum(context_lens) * 2 * s.num_layers * s.num_kv_heads * s.head_dim * elem


def adapter_weight_bytes(engine: Any, names: list[str]) -> int:
    return sum(engine.adapters.store.get(n).size_bytes for n in names)


def profile_steps(engine: Any, steps: int, before_step=lambda i: None) -> dict[str, Any]:
    """GPU kernel time of ``steps`` decode steps by kernel, and the share of the steps' wall
    time the GPU spent in kernels (the rest is host time the GPU waited for)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for i in range(steps):
            before_step(i)
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    busy_us = sum(e.self_device_time_total for e in kernels)
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start]
    return {
        "steps": steps,
        "wall_ms_per_step": round(wall / steps * 1e3, 3),
        "kernel_ms_per_step": round(busy_us / steps / 1e3, 3),
        # kernel time that ran beside other kernels (side streams: overlap_lora_shrink)
        "concurrent_ms_per_step": round(concurrent_us(spans) / steps / 1e3, 3),
        "top_kernels": [{"name": e.key[:90], "calls_per_step": e.count / steps,
                         "ms_per_step": round(e.self_device_time_total / steps / 1e3, 3)}
                        for e in kernels[:15]],
    }


def concurrent_us(spans: list[tuple[float, float]]) -> float:
    """Of kernels' (start, end) spans: their summed length minus the length of their union,
    i.e. the time kernels ran while another kernel was running."""
    total = union = 0.0
    reach = float("-inf")
    for start, end in sorted(spans):
        total += end - start
        if start >= reach:
            union += end - start
            reach = end
        elif end > reach:
            union += end - reach
            reach = end
    return total - union


def timed_steps(engine: Any, iters: int, before_step=lambda i: None) -> tuple[list[float], list[float]]:
    """(GPU seconds, wall seconds) of each of ``iters`` engine steps run back to back, as the
    engine loop runs them: the engine builds a step while the GPU runs the one before, so a
    step's time is the time between consecutive steps' ends on the GPU (CUDA events recorded
    after each ``step()``, no sync in between) - the GPU's time per step when it is the
    bottleneck, the host's when that is. (Synchronising around each step would time host and
    GPU one after the other, which the engine does not do.)"""
    import torch

    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    marks, walls = [], [time.perf_counter()]
    engine.step()  # the step whose end opens the first interval
    if cuda:
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[-1].record()
    walls[0] = time.perf_counter()
    for i in range(iters):
        before_step(i)
        engine.step()
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        walls.append(time.perf_counter())
    if cuda:
        torch.cuda.synchronize()
    wall = [b - a for a, b in zip(walls, walls[1:])]
    if not cuda:
        return wall, wall
    return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])], wall


def measure(engine: Any, names: list[str | None], context: int, warmup: int, iters: int,
            profile: int = 0, mixed_prompt: int = 0, log=print) -> dict[str, Any]:
    """Prefill ``len(names)`` requests of ``context`` tokens, then time ``iters`` decode steps.
    With ``mixed_prompt``, also time ``iters`` mixed steps: in each, one request of the batch is
    replaced by a new one (same adapter) whose ``mixed_prompt``-token prompt is prefilled while
    the others decode - the steady state of a busy server, where requests finish and arrive."""

    from slora_backend import SamplingParams

    produced: dict[str, int] = {}
    finished: list[str] = []

    def on_output(out) -> None:
        produced[out.request_id] = len(out.token_ids)
        if out.finished and out.finish_reason != "abort":
            finished.append(out.request_id)

    def batch_stays_full() -> None:
        """A request that finished would leave the timed steps with fewer rows than measured."""
        if finished:
            raise RuntimeError(f"request {finished[0]} finished while steps were timed: the "
                               f"batch shrank below {len(names)} (max_tokens {max_tokens})")

    # The prompts are prefilled in chunks of max_batched_tokens, and the first requests decode
    # while later ones are still prefilled: they start that many steps ahead.
    head_start = -(-len(names) * context // engine.config.max_batched_tokens) + 1
    max_tokens = head_start + warmup + 2 * iters + 2 * profile + 4
    for i, name in enumerate(names):
        prompt = [3 + (7 * i + j) % 30000 for j in range(context)]
        engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), name,
                           request_id=f"d{i}", on_output=on_output)
    batch = len(names)
    while len(produced) < batch or min(produced.values()) < 1:  # prefill (chunked)
        engine.step()
    for _ in range(warmup):
        engine.step()
    contexts = []
    def before_decode_step(_: int) -> None:
        batch_stays_full()
        contexts.append(sum(context + produced[f"d{i}"] for i in range(batch)))

    step_s, wall = timed_steps(engine, iters, before_decode_step)
    cuda = engine.device.type == "cuda"
    prof = profile_steps(engine, profile) if profile and cuda else None
    mixed = {}
    if mixed_prompt:
        live = [f"d{i}" for i in range(batch)]
        replaced = itertools.count()

        def replace_one(_: int) -> None:  # the oldest request leaves, a new one arrives
            batch_stays_full()
            k = next(replaced)
            engine.abort(live[k % batch])
            live[k % batch] = f"m{k}"
            prompt = [3 + (11 * k + j) % 30000 for j in range(mixed_prompt)]
            engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                               names[k % batch], request_id=f"m{k}")

        mixed_s, _ = timed_steps(engine, iters, replace_one)
        mixed = {"mixed_prompt": mixed_prompt,
                 "mixed_step_ms_median": round(statistics.median(mixed_s) * 1e3, 3),
                 "mixed_step_ms_min": round(min(mixed_s) * 1e3, 3)}
        if profile and cuda:
            mixed["mixed_profile"] = profile_steps(engine, profile, replace_one)
        for rid in live:
            engine.abort(rid)
    else:
        for i in range(batch):
            engine.abort(f"d{i}")
    engine.step()
    mean_context = statistics.mean(contexts) / batch
    lens = [int(round(mean_context))] * batch
    adapters = [n for n in names if n is not None]
    w, kv, ad = weight_bytes(engine, batch), kv_bytes(engine, lens), adapter_weight_bytes(engine, adapters)
    return {
        "batch": batch,
        "distinct_adapters": len(set(adapters)),
        "context_len_mean": round(mean_context, 1),
        "step_ms_median": round(statistics.median(step_s) * 1e3, 3),
        "step_ms_min": round(min(step_s) * 1e3, 3),
        "step_wall_ms_median": round(statistics.median(wall) * 1e3, 3),
        "bytes_weights": w,
        "bytes_kv": kv,
        "bytes_adapters": ad,
        "bytes_total": w + kv + ad,
        **({"profile": prof} if prof else {}),
        **mixed,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", default="random:llama-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens of every request")
    ap.add_argument("--setting", default="S1", help="adapters: the first --batch of this set")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="bytes per second")
    ap.add_argument("--cache", type=Path, default=None, help="adapter cache directory")
    ap.add_argument("--pool-pages", type=int, default=None)
    ap.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile this many steps: GPU time by kernel, host share")
    ap.add_argument("--mixed-prompt", type=int, default=0, metavar="TOKENS",
                    help="also time mixed steps: one request replaced by a new prompt this long")
    ap.add_argument("--json", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slora_backend import Engine, EngineConfig

    from .adapter_sets import DEFAULT_CACHE, registered_set
    from .baselines.engine_replay import free_device_memory
    from .harness_systems import parse_engine_params
    from .run_metadata import run_metadata

    root, names = registered_set(args.cache or DEFAULT_CACHE, args.setting, args.batch,
                                 base=args.base_model)
    engine = Engine(EngineConfig(
        base_model=args.base_model, adapter_root=str(root), device=args.device, dtype=args.dtype,
        pool_pages=args.pool_pages, max_num_seqs=max(args.batch, 1),
        # A mixed step is measured as one: the replacement request joins at once.
        **{"admit_wait_steps": 0, **parse_engine_params(args.engine_param)}))
    device = engine.device
    try:
        lora = measure(engine, list(names), args.context, args.warmup, args.iters, args.profile,
                       args.mixed_prompt)
        base = measure(engine, [None] * args.batch, args.context, args.warmup, args.iters,
                       args.profile, args.mixed_prompt)
    finally:
        engine.stop()
        del engine
        free_device_memory(device)
    for r in (lora, base):
        r["bound_ms"] = round(r["bytes_total"] / args.bandwidth * 1e3, 3)
        r["ratio_to_bound"] = round(r["step_ms_median"] / r["bound_ms"], 3)
    return {
        "benchmark": "decode_step_bandwidth",
        "meta": run_metadata(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "bandwidth_B_s": args.bandwidth,
        "lora": lora,
        "base": base,
        "lora_over_base_step": round(lora["step_ms_median"] / base["step_ms_median"], 3),
        "target": "lora.ratio_to_bound <= 1.5",
        "meets_target": lora["ratio_to_bound"] <= 1.5,
    }


if __name__ == "__main__":
    main()
