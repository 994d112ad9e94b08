"""Mixed steps (a batch decoding while a new prompt prefills) eager against piecewise CUDA graphs.

One engine with ``piecewise_graphs`` on: its capture time and the device memory the piecewise
graphs took, then ``bench_decode_step.measure``'s mixed steps (each step one request of the
batch is replaced by a new one whose ``--prompt``-token prompt prefills beside the others'
decode tokens) timed twice on the same engine: with the pieces, and with them set aside (the
eager path every step that prefills took before). Step times are GPU time between consecutive
steps' ends, the engine building each step while the one before runs (``timed_steps``).

Usage: python -m benchmarks.bench_piecewise_step [--batch 64] [--prompt 512 1024]
         [--context 512] [--base-model random:llama-7b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", default="random:llama-7b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens of the decoding requests")
    ap.add_argument("--prompt", type=int, nargs="+", default=[128, 512, 1024],
                    help="prompt tokens of the request that joins each mixed step")
    ap.add_argument("--setting", default="S1", help="adapters: the first --batch of this set")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cache", type=Path, default=None, help="adapter cache directory")
    ap.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, default=None)
    return ap


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from slora_backend import Engine, EngineConfig

    from .adapter_sets import DEFAULT_CACHE, registered_set
    from .bench_decode_step import measure
    from .harness_systems import parse_engine_params
    from .run_metadata import run_metadata

    root, names = registered_set(args.cache or DEFAULT_CACHE, args.setting, args.batch,
                                 base=args.base_model)
    params = {"admit_wait_steps": 0, "max_num_seqs": args.batch,
              **parse_engine_params(args.engine_param), "piecewise_graphs": True}
    engine = Engine(EngineConfig(base_model=args.base_model, adapter_root=str(root),
                                 device="cuda", dtype=args.dtype, **params))
    runner = engine.runner
    pieces = runner.piecewise
    if pieces is None:
        raise SystemExit("no piecewise graphs: they need CUDA, the Triton kernels and cuda_graphs")
    result: dict[str, Any] = {
        "benchmark": "piecewise_mixed_step", "meta": run_metadata(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "capture_s": round(pieces.capture_seconds, 2),
        "piecewise_graphs": pieces.num_graphs,
        "token_buckets": list(pieces.buckets),
        "device_reserved_gib": round(torch.cuda.memory_reserved(engine.device) / 2**30, 2),
        "runs": [],
    }
    try:
        for prompt in args.prompt:
            row: dict[str, Any] = {"prompt": prompt}
            for tag in ("piecewise", "eager"):
                runner.piecewise = pieces if tag == "piecewise" else None
                replays = pieces.replays
                m = measure(engine, list(names), args.context, args.warmup, args.iters,
                            mixed_prompt=prompt, log=lambda *_: None)
                row[tag] = {k: m[k] for k in ("step_ms_median", "mixed_step_ms_median",
                                              "mixed_step_ms_min")}
                row[tag]["piecewise_replays"] = pieces.replays - replays
            row["eager_over_piecewise"] = round(row["eager"]["mixed_step_ms_median"]
                                                / row["piecewise"]["mixed_step_ms_median"], 3)
            result["runs"].append(row)
    finally:
        runner.piecewise = pieces
        engine.stop()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
