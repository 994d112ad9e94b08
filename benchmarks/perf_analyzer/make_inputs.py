#!/usr/bin/env python
"""Write a perf_analyzer ``--input-data`` file for the ``slora`` ensemble.

Each entry is one request: a prompt, an adapter (round robin over ``--adapters``; "" is the
base model), ``max_tokens``, ``stream: true`` (perf_analyzer must run with ``--streaming`` for a
decoupled model) and, with ``--ignore-eos``, a fixed output length. perf_analyzer cycles through
the entries.

    python benchmarks/perf_analyzer/make_inputs.py --adapters pirate,french,json --base \\
        --max-tokens 64 --chat --out benchmarks/perf_analyzer/inputs/demo.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Give me three tips for learning a new language.",
    "What does a compiler do?",
    "Write a short poem about the sea.",
    "How many legs does a spider have?",
    "Why do we have seasons on Earth?",
    "Describe a cat to someone who has never seen one.",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot.",
    "How do plants make their food?",
    "What is a good breakfast before a long walk?",
    "Summarize the rules of chess in two sentences.",
    "What is the tallest mountain in the world?",
    "Tell me a fun fact about octopuses.",
    "How does a bicycle stay upright?",
]


def build(adapters: list[str], base: bool, max_tokens: int, chat: bool, ignore_eos: bool,
          prompts: list[str], count: int) -> dict:
    names = ([""] if base else []) + adapters
    if not names:
        raise SystemExit("name at least one adapter or pass --base")
    entries = []
    for i in range(count):
        entry = {
            "text_input": [prompts[i % len(prompts)]],
            "max_tokens": [max_tokens],
            "stream": [True],
            "lora_name": [names[i % len(names)]],
        }
        if chat:
            entry["apply_chat_template"] = [True]
        if ignore_eos:
            entry["ignore_eos"] = [True]
        entries.append(entry)
    return {"data": entries}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--adapters", default="", help="comma-separated adapter names")
    p.add_argument("--base", action="store_true", help="include base-model requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    p.add_argument("--count", type=int, default=0,
                   help="entries (default: one per prompt x adapter pairing, at least 16)")
    p.add_argument("--prompts-file", help="one prompt per line (default: built-in prompts)")
    args = p.parse_args(argv)
    adapters = [a for a in args.adapters.split(",") if a]
    prompts = PROMPTS
    if args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines()
                   if line.strip()]
    count = args.count or max(len(prompts), len(adapters) + int(args.base))
    data = build(adapters, args.base, args.max_tokens, args.chat, args.ignore_eos, prompts, count)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {len(data['data'])} requests to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
