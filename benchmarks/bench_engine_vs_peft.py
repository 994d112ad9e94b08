"""This engine vs transformers + PEFT on the same requests (the S-LoRA paper's PEFT baseline).

PEFT serves one adapter at a time: requests are grouped by adapter, each group is one padded
``generate`` call with that adapter active. The engine serves all requests in one continuous
batch, every adapter at once. Both generate exactly ``--max-tokens`` tokens per request.

Usage: python benchmarks/bench_engine_vs_peft.py [--requests 32] [--adapters 8]
         [--max-tokens 32] [--base PATH] [--device cpu] [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.synthetic_adapters import write_random_adapter
from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.default_model import smollm2_dir
from slora_backend.model_spec import ModelSpec

TOPICS = ["the ocean", "a red bicycle", "prime numbers", "the moon landing", "bread baking",
          "a lost umbrella", "winter in Oslo", "learning the violin"]
TARGETS = [("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj")]


def prompts(n: int) -> list[str]:
    return [f"Tell me {'a short story' if i % 2 else 'three facts'} about {TOPICS[i % len(TOPICS)]}."
            + " Please be detailed." * (i % 4) for i in range(n)]


def run_peft(base: Path, adapters: dict[str, Path], reqs: list[tuple[str, str]], max_tokens: int,
             device: str, dtype: torch.dtype) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    start = time.perf_counter()
    for name in names:
        group = [p for p, a in reqs if a == name]
        if not group:
            continue
        model.set_adapter(name)
        batch = tok(group, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - batch["input_ids"].shape[1] == max_tokens
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_engine(base: Path, root: Path, reqs: list[tuple[str, str]], max_tokens: int,
               device: str, dtype: str) -> float:
    engine = Engine(EngineConfig(base_model=str(base), adapter_root=str(root), device=device,
                                 dtype=dtype))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.generate([reqs[0][0]], SamplingParams(max_tokens=2), [reqs[0][1]])  # warm-up
    start = time.perf_counter()
    outs = engine.generate([p for p, _ in reqs], params, [a for _, a in reqs])
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == max_tokens for o in outs)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--base", type=Path, default=None, help="HF model directory (default SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    base = args.base or smollm2_dir()
    from transformers import AutoConfig

    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(base))
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = {}
        for i in range(args.adapters):
            rank = (8, 16)[i % 2]
            adapters[f"lora{i}"] = write_random_adapter(
                root / f"lora{i}", spec, rank, TARGETS[i % 2], seed=i, dtype=torch.float32)
        reqs = [(p, f"lora{i % args.adapters}") for i, p in enumerate(prompts(args.requests))]
        tokens = args.requests * args.max_tokens
        t_peft = run_peft(base, adapters, reqs, args.max_tokens, args.device, dtype)
        t_engine = run_engine(base, root, reqs, args.max_tokens, args.device, args.dtype)
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "device": args.device, "dtype": args.dtype,
        "requests": args.requests, "adapters": args.adapters, "max_tokens": args.max_tokens,
        "peft_seconds": round(t_peft, 2), "engine_seconds": round(t_engine, 2),
        "peft_tok_s": round(tokens / t_peft, 1), "engine_tok_s": round(tokens / t_engine, 1),
        "speedup": round(t_peft / t_engine, 2),
    }
    print("| system | seconds | tokens/s |\n|---|---|---|")
    print(f"| transformers + PEFT (one adapter at a time) | {t_peft:.2f} | {tokens / t_peft:.1f} |")
    print(f"| slora engine (all adapters in one batch) | {t_engine:.2f} | {tokens / t_engine:.1f} |")
    print(f"speedup: {t_peft / t_engine:.2f}x")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
