"""Tensor parallelism: req/s with and without adapters, and what LoRA adds to the collectives.

Runs one engine of ``--tensor-parallel-size`` ranks over a random-weight base model, generates
``--requests`` requests (ranks assigned round robin over ``--ranks``, every module targeted) and
the same requests on the base model, and reports req/s and, per decode step, the bytes rank 0
put into collectives: the base model's all-reduces and LoRA's own (gathers and reduces of the
``[tokens, r]`` shrinks). Example (two H200s, the paper's S4 shape):

    python benchmarks/bench_tp.py --base-model random:llama-13b --tensor-parallel-size 2 \\
        --device cuda --dtype float16 --ranks 64 32 16 --adapters 100 --requests 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.synthetic_adapters import write_random_adapter
from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.parallel.layers import full_spec

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(engine: Engine, prompts: list[list[int]], loras: list[str | None], max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.generate(prompts[:2], params, loras[:2])  # (warm-up: adapters read, kernels built)
    counters = engine.tp.comm.counters if engine.tp else None
    if counters:
        counters.reset()
    steps = engine.steps
    start = time.perf_counter()
    outs = engine.generate(prompts, params, loras)
    elapsed = time.perf_counter() - start
    steps = engine.steps - steps
    row = {"requests": len(outs), "seconds": round(elapsed, 3),
           "req_per_s": round(len(outs) / elapsed, 3), "steps": steps}
    if counters:
        row.update(base_bytes_per_step=counters.base_bytes // max(steps, 1),
                   lora_bytes_per_step=counters.lora_bytes // max(steps, 1),
                   base_calls_per_step=counters.base_calls / max(steps, 1),
                   lora_calls_per_step=counters.lora_calls / max(steps, 1))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default="random:tiny-mha")
    p.add_argument("--tensor-parallel-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ranks", type=int, nargs="+", default=[8])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    spec = full_spec(args.base_model)
    with tempfile.TemporaryDirectory() as root:
        names = []
        for i in range(args.adapters):
            rank = args.ranks[i % len(args.ranks)]
            names.append(f"a{i}-r{rank}")
            write_random_adapter(Path(root) / names[-1], spec, rank, ALL, seed=i)
        engine = Engine(EngineConfig(base_model=args.base_model, adapter_root=root,
                                     device=args.device, dtype=args.dtype,
                                     tensor_parallel_size=args.tensor_parallel_size))
        try:
            for name in names:
                engine.load_adapter(name, name)
            prompts = [[1 + (7 * i + j) % (spec.vocab_size - 1) for j in range(args.prompt_len)]
                       for i in range(args.requests)]
            loras = [names[i % len(names)] for i in range(args.requests)]
            result = {"tensor_parallel_size": args.tensor_parallel_size,
                      "base_model": args.base_model,
                      "lora": run(engine, prompts, loras, args.max_tokens),
                      "base": run(engine, prompts, [None] * len(prompts), args.max_tokens)}
        finally:
            engine.close()
    result["lora_vs_base"] = round(result["lora"]["req_per_s"] / result["base"]["req_per_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
