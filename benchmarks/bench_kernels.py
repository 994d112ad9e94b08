"""Kernel benchmark on the GPU: Llama-2-7B dimensions (H 4096, I 11008, 32 heads of 128), fp16.

Each Triton kernel is timed against its torch baseline (padded gather + bmm for LoRA and decode
attention, the reference functions for the elementwise ops) and against its bandwidth bound:
the bytes it must move (every input read once, every output written once) / 4.27e12 B/s, the
HBM read bandwidth measured on this H200. Times are medians over CUDA events with L2 flushed
before each repetition and the host kept ahead of the GPU (see ``time_us``): kernel time.
``triton_eager_us`` is ``triton.testing.do_bench`` of the same call, where Python launch
overhead shows when it exceeds the GPU work. Every kernel's output is checked against the
baseline before it is timed.

    python -m benchmarks.bench_kernels --out results.json [--quick] [--only SECTION,...]

Prints markdown tables and writes every row (with tile sweeps at the target configurations)
to the JSON file. The sections live in ``benchmarks.kernel_bench``, one module per kernel family
(``lora``, ``attention``, ``elementwise``, ``gemm``, ``graph_check``); ``timing`` times and records a row,
``shapes`` holds the dimensions and the adapters in the pool.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import traceback

import torch
import triton

from benchmarks.kernel_bench.attention import bench_attention
from benchmarks.kernel_bench.elementwise import bench_elementwise
from benchmarks.kernel_bench.gemm import bench_gemm
from benchmarks.kernel_bench.graph_check import GRAPH_ROWS, bench_graph_check
from benchmarks.kernel_bench.lora import (
    bench_decode_tiles,
    bench_lora_decode,
    bench_lora_decode_layers,
    bench_lora_mixed_step,
    bench_lora_prefill,
    bench_lora_split_k,
)
from benchmarks.kernel_bench.timing import HBM_BYTES_PER_S, ROWS, markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_kernels.json")
    parser.add_argument("--quick", action="store_true", help="fewer sizes, no tile sweeps")
    parser.add_argument("--only", default="lora_decode,lora_prefill,attention,elementwise")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    batches = [1, 64] if args.quick else [1, 8, 32, 64, 128, 256]
    sweep = not args.quick
    sections = {
        "lora_decode": lambda: bench_lora_decode(batches, sweep),
        "lora_prefill": lambda: bench_lora_prefill([1, 8] if args.quick else [1, 8, 32, 64], sweep),
        "attention": lambda: bench_attention(batches, sweep),
        "elementwise": lambda: bench_elementwise([64, 256] if args.quick else [64, 256, 4096]),
        "graph_check": bench_graph_check,
        "lora_mixed_step": bench_lora_mixed_step,
        "lora_split_k": bench_lora_split_k,
        "decode_tiles": lambda: bench_decode_tiles([32, 64, 128]),
        "lora_decode_layers": lambda: bench_lora_decode_layers(batches, sweep),
        "gemm": lambda: bench_gemm([64, 256] if args.quick else [1, 64, 128, 256]),
    }
    failed = []
    for name in args.only.split(","):
        try:
            sections[name]()
        except Exception:  # report the other sections even if one breaks
            traceback.print_exc()
            failed.append(name)
        torch.cuda.empty_cache()
    env = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(),
               torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               hbm_bytes_per_s=HBM_BYTES_PER_S, dtype="fp16")
    with open(args.out, "w") as f:
        json.dump(dict(env=env, rows=ROWS, graph_check=GRAPH_ROWS, failed=failed), f, indent=1)
    print(json.dumps(env))
    print(markdown(ROWS))
    if failed:
        raise SystemExit(f"sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
