"""Roofline of the harness's traces: the least time one GPU needs to serve a trace, in req/s.

The trace is the harness's own (``benchmarks.workload.generate`` with the same flags and seed),
so the bound sits beside the measured req/s of S-LoRA, (b) and (e) on the same requests.

Model (each line an assumption; all sums over the trace's requests i, prompt P_i, output O_i):
- Shape: the setting's base shape (``RANDOM_SHAPES``), ``--dtype-bytes`` per weight and KV value.
- Batch B: every decode step runs B requests, B = min(max_num_seqs, floor(K / mean(P + O))),
  K = (GPU memory x utilization - base weights) / KV bytes per token: as many requests as fit
  when each holds its whole prompt + output (adapters' memory left out: small beside KV).
- Prefill produces each request's first token; tokens 2..O_i come from decode steps:
  D = sum(O_i - 1) decode tokens in S = D / B steps (S fractional: every step is full).
- A decode step reads the base weights once (every linear layer, the LM head, the norms and
  B embedding rows) and each distinct adapter of its batch once; a request's k-th output token
  (k >= 2) reads the KV of its P + k - 1 earlier positions once and writes its own.
  Distinct adapters per step: B requests drawn with the trace's decode-token shares p_a, so the
  expected adapter bytes of a step are sum_a (1 - (1 - p_a)^B) x bytes_a.
- FLOPs: 2 per weight per token through every linear layer (the LM head: every decode token,
  one token per prefill), LoRA 2 x r x (in + out) per target per layer per token, attention
  4 x heads x head_dim per attended position per layer (QK^T and PV; causal in prefill).
- Times at bandwidth BW and matmul rate F: decode = max(decode bytes / BW, decode FLOPs / F),
  prefill = prefill FLOPs / F (its weight reads are hidden under its compute).
- Bounds: ``serial`` = decode + prefill (decode steps and prefill in separate steps, neither
  hiding the other: the bound of an engine that runs them one after the other); ``overlap`` =
  max(all bytes / BW, all FLOPs / F), a hard floor no schedule beats. req/s = requests / time.
The table's "mean decode ctx" is per decode token (long outputs weigh more), so it sits above
the per-request mean P + O/2. Not modelled: host time, launch gaps, preemption, KV reads of
prefill (its attention is counted as FLOPs), idle time of a trace that does not saturate.
Defaults: BW = 4.27 TB/s (a measured H200 read rate, docs/benchmarks.md), F = 788 TFLOP/s (a
dense 8192^3 16-bit matrix product measured on this H200, /work/.library/device/KINDS.md;
Hopper's fp16 and bf16 tensor rates are equal).

Usage: python -m benchmarks.roofline [--cases S1:5,S1:100,S1:2000,S2:100] [--rate 60]
         [--duration 25] [--bandwidth 4.27e12] [--matmul-flops 788e12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .workload import LORA_TARGETS, Workload, WorkloadConfig, generate, get_setting

H200_BANDWIDTH = 4.27e12  # B/s
H200_MATMUL_FLOPS = 788e12  # FLOP/s, 16-bit dense
H200_MEMORY_GIB = 139.0


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped decoder: the sizes the bound needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    dtype_bytes: int = 2

    @classmethod
    def named(cls, shape: str, dtype_bytes: int = 2) -> ModelShape:
        from slora_backend.model_loader import RANDOM_SHAPES

        s = RANDOM_SHAPES[shape]
        return cls(s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                   s["num_attention_heads"], s["num_key_value_heads"], s["vocab_size"],
                   bool(s.get("tie_word_embeddings", False)), dtype_bytes)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each attention projection (the LoRA targets)."""
        h, kv = self.hidden, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}

    @property
    def layer_params(self) -> int:
        """Weights of every layer's linear projections (attention and MLP)."""
        attn = sum(i * o for i, o in self.module_dims().values())
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    def step_weight_bytes(self, batch: int) -> int:
        """Base weights one decode step of ``batch`` reads: linear layers, LM head, norms, and
        the batch's embedding rows (a tied table is the LM head, read whole already)."""
        norms = (2 * self.layers + 1) * self.hidden
        rows = 0 if self.tied_embeddings else batch * self.hidden
        return (self.layer_params + self.lm_head_params + norms + rows) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_dim * self.dtype_bytes

    def adapter_width(self, targets: Sequence[str] = LORA_TARGETS) -> int:
        """sum(in + out) over the targets: an adapter of rank r has layers x r x this weights."""
        dims = self.module_dims()
        return sum(dims[m][0] + dims[m][1] for m in targets)

    def adapter_bytes(self, rank: int) -> int:
        return self.layers * rank * self.adapter_width() * self.dtype_bytes

    def token_flops(self, rank: int | None, lm_head: bool) -> int:
        """Matmul FLOPs of one token through the linear layers (and its LoRA, rank ``rank``)."""
        flops = 2 * self.layer_params + (2 * self.lm_head_params if lm_head else 0)
        if rank:
            flops += 2 * self.layers * rank * self.adapter_width()
        return flops

    def attention_flops(self, positions: int) -> int:
        """QK^T and PV of one query over ``positions`` keys, every layer."""
        return 4 * self.layers * self.hidden * positions


@dataclass(frozen=True)
class TraceRequest:
    prompt_len: int
    output_len: int
    adapter: str | None
    rank: int | None


def achievable_batch(shape: ModelShape, requests: Sequence[TraceRequest], max_num_seqs: int,
                     memory_bytes: float) -> int:
    """min(max_num_seqs, requests whose whole prompt + output fit in the KV memory left)."""
    kv_tokens = (memory_bytes - shape.step_weight_bytes(0)) / shape.kv_bytes_per_token
    peak = sum(r.prompt_len + r.output_len for r in requests) / len(requests)
    return max(1, min(max_num_seqs, math.floor(kv_tokens / peak)))


def trace_work(shape: ModelShape, requests: Sequence[TraceRequest], batch: int) -> dict[str, float]:
    """Bytes and FLOPs of ``requests`` at decode batch ``batch`` (module docstring's model)."""
    decode_tokens = sum(r.output_len - 1 for r in requests)
    steps = decode_tokens / batch
    kv_reads = kv_writes = attn_decode = lin_decode = 0
    share: dict[str, float] = {}
    adapter_bytes: dict[str, int] = {}
    prefill = 0
    for r in requests:
        tokens = r.output_len - 1
        # context of output token k (2..O) is P + k - 1: sum = tokens * P + tokens * (tokens + 1) / 2
        positions = tokens * r.prompt_len + tokens * (tokens + 1) // 2
        kv_reads += positions * shape.kv_bytes_per_token
        kv_writes += tokens * shape.kv_bytes_per_token
        attn_decode += shape.attention_flops(positions)
        lin_decode += tokens * shape.token_flops(r.rank, lm_head=True)
        prefill += (r.prompt_len * shape.token_flops(r.rank, lm_head=False)
                    + 2 * shape.lm_head_params  # the first output token's logits
                    + shape.attention_flops(r.prompt_len * (r.prompt_len + 1) // 2))
        if r.adapter is not None and tokens > 0:
            share[r.adapter] = share.get(r.adapter, 0) + tokens / decode_tokens
            adapter_bytes[r.adapter] = shape.adapter_bytes(r.rank)
    adapters_per_step = sum((1 - (1 - p) ** batch) * adapter_bytes[a] for a, p in share.items())
    distinct_per_step = sum(1 - (1 - p) ** batch for p in share.values())
    return {
        "requests": len(requests),
        "decode_tokens": decode_tokens,
        "decode_steps": steps,
        "weight_bytes_per_step": shape.step_weight_bytes(batch),
        "adapter_bytes_per_step": adapters_per_step,
        "distinct_adapters_per_step": distinct_per_step,
        "kv_read_bytes": kv_reads,
        "kv_write_bytes": kv_writes,
        "decode_bytes": steps * (shape.step_weight_bytes(batch) + adapters_per_step)
                        + kv_reads + kv_writes,
        "decode_flops": lin_decode + attn_decode,
        "prefill_flops": prefill,
    }


def bound(work: dict[str, float], bandwidth: float, matmul_flops: float) -> dict[str, float]:
    decode_s = max(work["decode_bytes"] / bandwidth, work["decode_flops"] / matmul_flops)
    prefill_s = work["prefill_flops"] / matmul_flops
    serial_s = decode_s + prefill_s
    overlap_s = max(work["decode_bytes"] / bandwidth,
                    (work["decode_flops"] + work["prefill_flops"]) / matmul_flops)
    return {"decode_s": decode_s, "prefill_s": prefill_s, "serial_s": serial_s,
            "overlap_s": overlap_s, "req_s_serial": work["requests"] / serial_s,
            "req_s_overlap": work["requests"] / overlap_s,
            "step_ms": (work["decode_bytes"] / bandwidth) / work["decode_steps"] * 1e3
            if work["decode_steps"] else 0.0}


def harness_trace(args: argparse.Namespace, setting: str, n: int) -> Workload:
    """The harness's trace for the flags of ``add_trace_arguments``: only what arrives before
    ``--time-limit`` when it is set (the harness sends nothing later)."""
    workload = generate(WorkloadConfig(
        setting=setting, num_adapters=n, alpha=args.alpha, rate=args.rate, cv=args.cv,
        duration_s=args.duration, input_range=tuple(args.input_range),
        output_range=tuple(args.output_range), seed=args.seed))
    return workload if args.time_limit is None else workload.within(args.time_limit)


def case_row(args: argparse.Namespace, setting: str, n: int) -> dict[str, Any]:
    workload = harness_trace(args, setting, n)
    ranks = {a.name: a.rank for a in workload.adapters}
    requests = [TraceRequest(r.prompt_len, r.output_len, r.adapter, ranks.get(r.adapter))
                for r in workload.requests]
    shape = ModelShape.named(get_setting(setting).base_shape, args.dtype_bytes)
    batch = args.batch or achievable_batch(shape, requests, args.max_num_seqs,
                                           args.gpu_gib * 2**30 * args.memory_utilization)
    work = trace_work(shape, requests, batch)
    b = bound(work, args.bandwidth, args.matmul_flops)
    mean_ctx = work["kv_read_bytes"] / shape.kv_bytes_per_token / max(work["decode_tokens"], 1)
    return {"setting": setting, "n": n, "batch": batch, "mean_prompt": round(
        sum(r.prompt_len for r in requests) / len(requests), 1),
        "mean_output": round(sum(r.output_len for r in requests) / len(requests), 1),
        "mean_decode_context": round(mean_ctx, 1), **work, **b,
        "out_tok_s_serial": sum(r.output_len for r in requests) / b["serial_s"]}


TABLE = [("setting", "setting", "{}"), ("n", "n", "{}"), ("requests", "requests", "{}"),
         ("mean prompt", "mean_prompt", "{}"), ("mean output", "mean_output", "{}"),
         ("batch", "batch", "{}"), ("mean decode ctx", "mean_decode_context", "{}"),
         ("weights GB/step", "weight_bytes_per_step", "{:.2f}", 1e-9),
         ("KV GB/step", "kv_per_step", "{:.2f}", 1e-9),
         ("adapters/step", "distinct_adapters_per_step", "{:.0f}"),
         ("adapter GB/step", "adapter_bytes_per_step", "{:.2f}", 1e-9),
         ("decode step ms", "step_ms", "{:.2f}"), ("decode s", "decode_s", "{:.2f}"),
         ("prefill TFLOP", "prefill_flops", "{:.0f}", 1e-12), ("prefill s", "prefill_s", "{:.2f}"),
         ("bound req/s (serial)", "req_s_serial", "{:.1f}"),
         ("bound req/s (overlap)", "req_s_overlap", "{:.1f}"),
         ("bound out tok/s (serial)", "out_tok_s_serial", "{:.0f}")]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(c[0] for c in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for r in rows:
        r = {**r, "kv_per_step": (r["kv_read_bytes"] + r["kv_write_bytes"]) / r["decode_steps"]
             if r["decode_steps"] else 0.0}
        lines.append("| " + " | ".join(c[2].format(r[c[1]] * (c[3] if len(c) > 3 else 1))
                                       for c in TABLE) + " |")
    return "\n".join(lines)


def add_trace_arguments(ap: argparse.ArgumentParser, time_limit: float | None,
                        time_limit_help: str) -> None:
    """The cases, the harness's trace flags (``harness_trace``) and the hardware's rates."""
    ap.add_argument("--cases", default="S1:5,S1:100,S1:2000,S2:100",
                    help="comma list of SETTING:N")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=60.0)
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=25.0, help="trace length (s)")
    ap.add_argument("--time-limit", type=float, default=time_limit, help=time_limit_help)
    ap.add_argument("--input-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    ap.add_argument("--output-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="bytes per second")
    ap.add_argument("--matmul-flops", type=float, default=H200_MATMUL_FLOPS, help="FLOP/s")
    ap.add_argument("--dtype-bytes", type=int, default=2)
    ap.add_argument("--json", default=None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_trace_arguments(ap, None, "count only requests arriving before it (as the harness "
                                  "sends them)")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="the engine's batch limit")
    ap.add_argument("--batch", type=int, default=None, help="decode batch (default: achievable)")
    ap.add_argument("--gpu-gib", type=float, default=H200_MEMORY_GIB)
    ap.add_argument("--memory-utilization", type=float, default=0.9)
    return ap


def parse_cases(text: str) -> list[tuple[str, int]]:
    cases = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        setting, sep, n = item.partition(":")
        if not sep or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--cases: {item!r} is not SETTING:N with N >= 1")
        get_setting(setting)
        cases.append((setting, int(n)))
    return cases


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    rows = [case_row(args, setting, n) for setting, n in parse_cases(args.cases)]
    print(f"Roofline at {args.bandwidth / 1e12:.2f} TB/s and {args.matmul_flops / 1e12:.0f} "
          f"TFLOP/s; trace R = {args.rate:g}, {args.duration:g} s, alpha {args.alpha:g}, seed "
          f"{args.seed} (model: python -m benchmarks.roofline --help, module docstring)\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
