"""The harness's req/s at the roofline: its trace replayed with every step taking its bound.

``benchmarks.roofline`` bounds the time to serve a whole trace. The harness reports something
else: the requests *completed before its time limit* per second, which also depends on how long
each request's own chain of steps takes and on the batch's ramp-up. This replays the trace step
by step as an engine that admits every arrival at once would, and times each step at its bound,
so the harness's figure can be read against what the hardware allows for that very figure.

Model (one line per assumption; shapes and byte counts from ``roofline.ModelShape``):
- A step runs one token of every running request and the whole prompt of each request it
  admits (first come, first served, while the batch has fewer than ``max_num_seqs`` requests and
  the step stays within ``max_batched_tokens``); the prompt's step gives the first output token.
- Linear layers: max(bytes / BW, FLOPs / F) with bytes = the base weights once + each distinct
  adapter of the step once, FLOPs = 2 per weight per token (+ LoRA; the LM head for tokens that
  sample).
- Attention: max(bytes / BW, FLOPs / F) with bytes = the KV a decode token reads (its context)
  and every token writes, FLOPs = 4 x heads x head_dim per attended position per layer.
- ``overlap=False`` (default): step = linear + attention, the two one after the other, as an
  engine that runs its GEMMs and its attention as separate kernels does; ``overlap=True``:
  max(all bytes / BW, all FLOPs / F), a floor no schedule beats.
- Every step's time is divided by ``efficiency`` (the fraction of its bound an engine reaches).
Not modelled: preemption (the KV of every request is assumed to fit), host time, sampling,
chunked prompts.

Usage: python -m benchmarks.window_bound [--cases S1:5,S1:2000,S2:100] [--efficiency 1,0.78]
         [--overlap] [--time-limit 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .roofline import (
    ModelShape,
    add_trace_arguments,
    harness_trace,
    parse_cases,
)
from .workload import get_setting


@dataclass(frozen=True)
class TimedRequest:
    arrival_s: float
    prompt_len: int
    output_len: int
    adapter: str | None
    rank: int | None


@dataclass
class _Running:
    request: TimedRequest
    context: int  # positions whose KV the next token reads
    generated: int


@dataclass(frozen=True)
class StepModel:
    shape: ModelShape
    bandwidth: float
    matmul_flops: float
    overlap: bool = False
    efficiency: float = 1.0

    def seconds(self, decoding: Sequence[_Running], admitted: Sequence[TimedRequest]) -> float:
        """The bound of one step (module docstring), divided by the efficiency."""
        s = self.shape
        adapters = {r.request.adapter: r.request.rank for r in decoding if r.request.adapter}
        adapters.update({r.adapter: r.rank for r in admitted if r.adapter})
        linear_bytes = (s.step_weight_bytes(len(decoding) + len(admitted))
                        + sum(s.adapter_bytes(rank) for rank in adapters.values()))
        linear_flops = (sum(s.token_flops(r.request.rank, lm_head=True) for r in decoding)
                        + sum(r.prompt_len * s.token_flops(r.rank, lm_head=False)
                              + 2 * s.lm_head_params for r in admitted))
        tokens = len(decoding) + sum(r.prompt_len for r in admitted)
        attn_bytes = (sum(r.context for r in decoding) + tokens) * s.kv_bytes_per_token
        attn_flops = (sum(s.attention_flops(r.context + 1) for r in decoding)
                      + sum(s.attention_flops(r.prompt_len * (r.prompt_len + 1) // 2)
                            for r in admitted))
        bw, f = self.bandwidth, self.matmul_flops
        if self.overlap:
            t = max((linear_bytes + attn_bytes) / bw, (linear_flops + attn_flops) / f)
        else:
            t = max(linear_bytes / bw, linear_flops / f) + max(attn_bytes / bw, attn_flops / f)
        return t / self.efficiency


def replay(requests: Sequence[TimedRequest], model: StepModel, time_limit: float,
           max_num_seqs: int = 256, max_batched_tokens: int = 4096) -> dict[str, float]:
    """Replay ``requests`` (sorted by arrival) until ``time_limit``: what the harness would
    report of an engine whose steps take ``model.seconds``."""
    queue: deque[TimedRequest] = deque()
    running: list[_Running] = []
    arrivals = iter(sorted(requests, key=lambda r: r.arrival_s))
    upcoming = next(arrivals, None)
    t = 0.0
    completed = tokens = steps = 0
    while True:
        while upcoming is not None and upcoming.arrival_s <= t:
            queue.append(upcoming)
            upcoming = next(arrivals, None)
        admitted: list[TimedRequest] = []
        budget = max_batched_tokens - len(running)
        while (queue and len(running) + len(admitted) < max_num_seqs
               and queue[0].prompt_len <= budget):
            budget -= queue[0].prompt_len
            admitted.append(queue.popleft())
        if not running and not admitted:
            if upcoming is None:
                break
            t = upcoming.arrival_s  # idle until the next arrival
            continue
        t += model.seconds(running, admitted)
        if t > time_limit:
            break
        steps += 1
        tokens += len(running) + len(admitted)
        still: list[_Running] = []
        for r in running:
            r.context += 1
            r.generated += 1
            if r.generated < r.request.output_len:
                still.append(r)
        still += [_Running(r, r.prompt_len, 1) for r in admitted if r.output_len > 1]
        completed += (len(running) + len(admitted)) - len(still)
        running = still
    return {"req_s": completed / time_limit, "out_tok_s": tokens / time_limit,
            "completed": completed, "steps": steps}


def trace(setting: str, n: int, args: argparse.Namespace) -> list[TimedRequest]:
    """The harness's requests of ``setting`` with ``n`` adapters that arrive before the limit."""
    workload = harness_trace(args, setting, n)
    ranks = {a.name: a.rank for a in workload.adapters}
    return [TimedRequest(r.arrival_s, r.prompt_len, r.output_len, r.adapter, ranks.get(r.adapter))
            for r in workload.requests]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_trace_arguments(ap, 15.0, "the harness's cut (s)")
    ap.add_argument("--efficiency", default="1", help="comma list of fractions of the bound")
    ap.add_argument("--overlap", action="store_true", help="bytes and FLOPs of a step overlap")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    return ap


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    efficiencies = [float(e) for e in args.efficiency.split(",")]
    if not all(0 < e <= 1 for e in efficiencies):
        raise ValueError(f"--efficiency: fractions in (0, 1], got {args.efficiency!r}")
    rows = []
    for setting, n in parse_cases(args.cases):
        requests = trace(setting, n, args)
        shape = ModelShape.named(get_setting(setting).base_shape, args.dtype_bytes)
        for e in efficiencies:
            model = StepModel(shape, args.bandwidth, args.matmul_flops, args.overlap, e)
            rows.append({"setting": setting, "n": n, "efficiency": e,
                         **replay(requests, model, args.time_limit, args.max_num_seqs,
                                  args.max_batched_tokens)})
    mode = "overlapped" if args.overlap else "linear layers, then attention"
    print(f"Harness req/s with every step at its bound / efficiency ({mode}); "
          f"{args.bandwidth / 1e12:.2f} TB/s, {args.matmul_flops / 1e12:.0f} TFLOP/s, "
          f"R = {args.rate:g}, cut at {args.time_limit:g} s\n")
    print("| setting | n | efficiency | req/s | out tok/s | steps |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['n']} | {r['efficiency']:.2f} | {r['req_s']:.1f} | "
              f"{r['out_tok_s']:.0f} | {r['steps']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
