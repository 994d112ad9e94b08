"""Do adapter reads on helper threads slow the engine thread? (CPU; no GPU needed.)

The engine reads queued requests' adapters from disk on helper threads while its own thread
runs steps, and all of them share the GIL. This measures both sides: a stand-in for the engine
thread (a loop of small torch ops, the host side of an eager step) timed alone and while
``--readers`` threads read adapters through ``AdapterStore.weights`` without pause (each read
dropped again, so every read goes to disk or the page cache), and the reads per second.

Usage: python -m benchmarks.bench_adapter_reads [--shape llama-7b] [--rank 8] [--readers 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from slora_backend.adapters.host_store import AdapterStore
from slora_backend.layout import PoolLayout

from .adapter_sets import model_spec
from .run_metadata import run_metadata
from .synthetic_adapters import write_random_adapter


def engine_like_step(x: torch.Tensor, ops: int) -> float:
    t = time.perf_counter()
    for _ in range(ops):
        x.add_(1.0)
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    spec = model_spec(f"random:{args.shape}")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    store = AdapterStore(PoolLayout(spec, 16), torch.float16, 1 << 40, False)
    for i in range(args.adapters):
        path = args.dir / f"{args.shape}-r{args.rank}-{i}"
        if not path.is_dir():
            write_random_adapter(path, spec, args.rank, targets, seed=i)
        store.register(f"a{i}", path)
    x = torch.zeros(64)

    def median_step_ms() -> float:
        return statistics.median(engine_like_step(x, args.ops) for _ in range(args.steps)) * 1e3

    alone = median_step_ms()
    stop = threading.Event()
    reads = [0] * args.readers

    def reader(w: int) -> None:
        i = w
        while not stop.is_set():
            name = f"a{i % args.adapters}"
            store.weights(name)
            store.drop_weights(name)
            reads[w] += 1
            i += args.readers

    threads = [threading.Thread(target=reader, args=(w,)) for w in range(args.readers)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # past the first reads (the gather index is built once per file layout)
    # Steps run back to back for at least --steps steps and half a second, so the read rate is
    # counted over a window long enough to hold several reads.
    t0, r0 = time.perf_counter(), sum(reads)
    busy_steps = []
    while len(busy_steps) < args.steps or time.perf_counter() - t0 < 0.5:
        busy_steps.append(engine_like_step(x, args.ops))
    busy = statistics.median(busy_steps) * 1e3
    rate = (sum(reads) - r0) / (time.perf_counter() - t0)
    stop.set()
    for t in threads:
        t.join()
    return {
        "benchmark": "adapter_reads_vs_engine_thread", "meta": run_metadata(),
        "params": {k: str(v) for k, v in vars(args).items()},
        "adapter_mb": round(store.get("a0").size_bytes / 1e6, 1),
        "step_ms_alone": round(alone, 3), "step_ms_while_reading": round(busy, 3),
        "slowdown": round(busy / alone, 2), "reads_per_s": round(rate, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=12, help="distinct files read round robin")
    ap.add_argument("--readers", type=int, default=1)
    ap.add_argument("--ops", type=int, default=1000, help="small torch ops per stand-in step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/slora-bench-adapter-reads"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
