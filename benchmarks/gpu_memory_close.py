"""Where a closed engine's GPU memory goes: free device memory at each stage of two engines built,
used and closed one after the other in one process, and the tensors still allocated after
``close()`` (with the stack that allocated each, from torch's allocator history).

A gap that appears after the first engine and does not grow with the second is a one-time cost of
the process (CUDA libraries and kernel modules loaded on first use), not memory the engine keeps.

Usage: python -m benchmarks.gpu_memory_close --model random:tiny-gqa [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
from typing import Any

import torch

from slora_backend import Engine, EngineConfig, SamplingParams

GIB = 2**30


def _free_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / GIB


def _live_blocks(limit: int = 12) -> list[dict[str, Any]]:
    """The largest blocks the caching allocator still has allocated, with their allocating stack."""
    blocks = []
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = [f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"
                      for f in block.get("frames", [])
                      if "slora" in f["filename"] or "benchmarks" in f["filename"]]
            blocks.append({"bytes": block["size"], "frames": frames[:6]})
    blocks.sort(key=lambda b: -b["bytes"])
    return blocks[:limit]


def _one_engine(config: EngineConfig, stages: dict[str, float], tag: str) -> None:
    prompts = [[100 + 7 * i + j for j in range(5 + 3 * i)] for i in range(16)]
    with Engine(config) as engine:
        stages[f"{tag}_built"] = _free_gib()
        engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
        stages[f"{tag}_generated"] = _free_gib()
    gc.collect()
    stages[f"{tag}_closed"] = _free_gib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:tiny-gqa")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.cuda.init()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    stages = {"start": _free_gib()}
    config = EngineConfig(base_model=args.model, device="cuda", dtype=args.dtype,
                          gpu_memory_utilization=args.gpu_memory_utilization)
    _one_engine(config, stages, "first")
    out: dict[str, Any] = {
        "allocated_after_close_bytes": torch.cuda.memory_allocated(),
        "reserved_after_close_bytes": torch.cuda.memory_reserved(),
        "live_blocks": _live_blocks(),
    }
    _one_engine(config, stages, "second")
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    stages["cublas_workspaces_cleared"] = _free_gib()
    out["stages_free_gib"] = {k: round(v, 3) for k, v in stages.items()}
    out["first_close_minus_start_gib"] = round(stages["start"] - stages["first_closed"], 3)
    out["second_close_minus_first_close_gib"] = round(stages["first_closed"] - stages["second_closed"], 3)
    out["model"], out["device"] = args.model, torch.cuda.get_device_name()
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
