"""The S-LoRA workload harness: one trace, this engine and its baselines in the same run.

Generates the paper's synthetic trace (``benchmarks.workload``), makes sure its adapters exist
on disk (``benchmarks.adapter_sets``), then replays the same requests into:

- ``slora``: this engine in-process (engine thread, requests sent at their arrival times);
- (a) ``peft``: transformers + PEFT as the paper ran it (``baselines/peft_serving.py``);
- (b) ``no_lora``: this engine, same requests on the base model (the upper bound);
- (c) ``bmm``: this engine with ``lora_ops="bmm"``;
- (d) ``no_unified``: this engine with adapters in a fixed partition (``adapter_pool_pages``);
- (e) ``vllm_lora`` / ``vllm_base``: vLLM in its own process and environment, with LoRA at each
  ``--vllm-max-loras`` value and on the base model (``baselines/vllm_peer.py``);
- ``slora_triton`` (``--triton-url`` or ``--triton-serve``): the same trace through tritonserver
  over gRPC streaming into the ``slora`` ensemble.

Reports throughput (req/s, output tok/s), first-token latency (avg/p50/p90/p99), SLO
attainment, pool occupancy (sampled), adapter hit ratio and peak GPU memory; writes JSON (every
parameter, the command line, date, machine and versions with the results) and a markdown table.

This module is the command line (flags, their checks, ``main``); ``harness_run`` runs one trace
and builds the report, ``harness_systems`` replays it into each system, ``run_metadata`` records
the machine and versions.

Usage: python -m benchmarks.harness --setting S1 --n 2000 --alpha 1 --rate 20 --cv 1
         --duration 60 --baselines a,b,c,d --device cuda --json out.json [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from .adapter_sets import DEFAULT_CACHE
from .baselines import vllm_peer
from .harness_run import run
from .harness_systems import BASELINES
from .kernel_window import parse_step_kind
from .metrics import DEFAULT_SLO_S


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    w = ap.add_argument_group("workload")
    w.add_argument("--setting", default="S1", help="S1 (7B, r 8), S2 (7B, r 64/32/16/8), S4")
    w.add_argument("--n", type=int, default=100, help="number of adapters")
    w.add_argument("--alpha", type=float, default=1.0, help="popularity (1 uniform, <1 skewed)")
    w.add_argument("--rate", type=float, default=10.0, help="requests per second")
    w.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gaps")
    w.add_argument("--duration", type=float, default=60.0, help="trace length (s)")
    w.add_argument("--input-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    w.add_argument("--output-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    w.add_argument("--seed", type=int, default=42)
    s = ap.add_argument_group("systems")
    s.add_argument("--baselines", default="", help="comma list of a,b,c,d,e")
    s.add_argument("--no-slora", action="store_true", help="run only the baselines")
    s.add_argument("--slora-variant", action="append", default=[],
                   metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="also replay into the engine with these EngineConfig changes (on top of "
                        "--engine-param), as system slora:NAME, in the same run")
    s.add_argument("--time-limit", type=float, default=None,
                   help="seconds per replay (slora, b, d, triton); later requests are not sent")
    s.add_argument("--slow-baseline-limit", type=float, default=120.0,
                   help="seconds for (a) PEFT and (c) bmm, which are far slower (0 = no limit)")
    s.add_argument("--peft-max-requests", type=int, default=None,
                   help="replay only this prefix of the trace in (a)")
    s.add_argument("--peft-max-batch", type=int, default=6, help="(a)'s max batch (paper: 6)")
    s.add_argument("--partition-adapters", type=int, default=None,
                   help="(d): adapters of the set's max rank the fixed partition holds "
                        "(default min(n, max_num_seqs))")
    s.add_argument("--triton-url", default=None, help="replay through this tritonserver too")
    s.add_argument("--triton-serve", action="store_true",
                   help="start a tritonserver (slora_backend.serve) and replay through it too")
    s.add_argument("--triton-streams", type=int, default=2, help="gRPC streams to spread over")
    s.add_argument("--triton-stream-interval", type=int, default=1, metavar="N",
                   help="--triton-serve: the server's stream_interval (new tokens per response)")
    s.add_argument("--triton-log", default=None)
    s.add_argument("--triton-ready-timeout", type=float, default=300.0)
    s.add_argument("--tokenizer", default="word",
                   help="tokenizer for Triton's text prompts: a directory, or 'word' (a "
                        "word-level tokenizer of the model's vocabulary, written to the cache)")
    e = ap.add_argument_group("engine")
    e.add_argument("--base-model", default=None, help="default random:<setting's shape>")
    e.add_argument("--device", default="cuda")
    e.add_argument("--dtype", default="float16")
    e.add_argument("--pool-pages", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--max-batched-tokens", type=int, default=None)
    e.add_argument("--slo", type=float, default=DEFAULT_SLO_S, help="first-token SLO (s)")
    e.add_argument("--early-abort", action="store_true", help="engine drops hopeless requests")
    e.add_argument("--max-waiting", type=int, default=None)
    e.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE")
    vllm_peer.add_arguments(ap)
    o = ap.add_argument_group("output")
    o.add_argument("--cache", default=str(DEFAULT_CACHE), help="adapter cache directory")
    o.add_argument("--gen-workers", type=int, default=None)
    o.add_argument("--json", type=Path, default=None)
    o.add_argument("--markdown", type=Path, default=None)
    o.add_argument("--profile-dir", type=Path, default=None,
                   help="write each engine replay's step profile here (benchmarks.step_profile)")
    o.add_argument("--cprofile", action="store_true",
                   help="with --profile-dir: also cProfile the engine thread (slows it ~2x)")
    o.add_argument("--kernel-trace", type=_step_window, default=None, metavar="FIRST:COUNT",
                   help="with --profile-dir: GPU time per kernel over COUNT steps from step FIRST, "
                        "or over COUNT steps of one kind (FIRST = mixed or decode, optionally "
                        "@MIN_BATCH, e.g. decode@192:10)")
    o.add_argument("--timeline", action="store_true",
                   help="with --kernel-trace: also record host ops and write the first steps' "
                        "Chrome traces")
    o.add_argument("--launch-lag", action="store_true",
                   help="with --profile-dir: mark each layer's start in eager steps (host time, "
                        "CUDA event): host- or GPU-bound, step by step")
    return ap


def _step_window(text: str) -> tuple[int | str, int]:
    first, _, count = text.partition(":")
    try:
        if first[:1].isdigit():
            window: tuple[int | str, int] = int(first), int(count)
        else:
            parse_step_kind(first)
            window = first, int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FIRST:COUNT (FIRST an integer, 'mixed' or 'decode', optionally "
            f"@MIN_BATCH), got {text!r}") from None
    if (isinstance(window[0], int) and window[0] < 0) or window[1] < 1:
        raise argparse.ArgumentTypeError(f"FIRST must be >= 0 and COUNT >= 1, got {text!r}")
    return window


def normalize(args: argparse.Namespace) -> argparse.Namespace:
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    bad = [b for b in args.baselines if b not in BASELINES]
    if bad:
        raise SystemExit(f"--baselines: unknown {bad}; choose from {','.join(BASELINES)}")
    if args.slow_baseline_limit == 0:
        args.slow_baseline_limit = None
    if "e" in args.baselines:  # bad vLLM flags fail before any replay
        vllm_peer.planned_runs(args, args.n, args.max_num_seqs or 1)
    return args


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a timeout's kill) into SystemExit, so ``finally`` blocks stop the
    tritonserver this process started (it runs in its own session and would outlive us)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = normalize(build_parser().parse_args(argv))
    report = run(args)
    print(report["markdown"])
    print(json.dumps(report["comparisons"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report["markdown"] + "\n")
    return report


if __name__ == "__main__":
    exit_on_sigterm()
    main()
