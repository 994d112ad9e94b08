"""Page geometry and measured waste of the unified pool for reference model shapes.

Usage: python benchmarks/pool_layout.py [--block-tokens 16]
Prints a markdown table: page size, KV block, and for adapters of several ranks and target
sets the pages they take and the share of those pages left empty (padding at page ends).
"""

from __future__ import annotations

import argparse
import random

from slora_backend.batch import LORA_MODULES
from slora_backend.layout import PoolLayout
from slora_backend.model_loader import random_config
from slora_backend.model_spec import ModelSpec

MODELS = {"Llama-2-7B (MHA)": "llama-7b", "Llama-3-8B (GQA)": "llama3-8b",
          "SmolLM2-135M (GQA)": "smollm2-135m"}
TARGETS = {"qkvo": LORA_MODULES[:4], "all": LORA_MODULES}


def kv_waste(layout: PoolLayout, samples: int = 10_000) -> float:
    """Mean empty share of KV pages for requests of 16..1024 tokens (uniform)."""
    rng = random.Random(0)
    used = total = 0
    for _ in range(samples):
        n = rng.randrange(16, 1024)
        used += n
        total += layout.kv_pages(n) * layout.block_tokens
    return 1 - used / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-tokens", type=int, default=16)
    args = ap.parse_args()
    print("| model | page (elements) | KV tokens/page | KV waste | adapter | pages "
          "| MB (fp16, all layers) | adapter waste |")
    print("|---|---|---|---|---|---|---|---|")
    for label, shape in MODELS.items():
        layout = PoolLayout(ModelSpec.from_hf_config(random_config(shape)), args.block_tokens)
        kvw = kv_waste(layout)
        for tname, modules in TARGETS.items():
            for rank in (8, 16, 32, 64, 128):
                plan = layout.plan_adapter({m: rank for m in modules})
                waste = 1 - plan.used_elements / (plan.num_pages * layout.page_size)
                mb = plan.num_pages * layout.page_size * layout.spec.num_layers * 2 / 2**20
                print(f"| {label} | {layout.page_size} | {layout.block_tokens} | {kvw:.1%} | "
                      f"r{rank} {tname} | {plan.num_pages} | {mb:.1f} | {waste:.2%} |")


if __name__ == "__main__":
    main()
