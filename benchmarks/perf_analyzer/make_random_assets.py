#!/usr/bin/env python
"""Assets for serving a random-weight model shape (``random:<shape>``) end to end:

- ``tokenizer/``: a synthetic word-level tokenizer with exactly the shape's vocabulary
  (``<unk>``, ``<s>``, ``</s>``, then ``w3`` ... ``w<V-1>``), so that every token id the random
  model samples decodes to text and a prompt of n words is n tokens. Throughput work needs the
  shape, not the values (the S-LoRA paper's dummy-weight runs), and no real tokenizer of the
  Llama-2 vocabulary is available offline.
- ``adapters/``: random PEFT adapters ``a0`` ... ``a<n-1>``, ranks round robin over ``--ranks``.
- ``prompts.txt``: prompts of ``--prompt-tokens`` words each.

    python benchmarks/perf_analyzer/make_random_assets.py --shape llama-7b --out /tmp/assets \\
        --adapters 8 --ranks 8,16,32,64 --prompt-tokens 128
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_tokenizer(out: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out


def write_prompts(out: Path, n: int, words: int, vocab_size: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(words)) for _ in range(n)]
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.synthetic_adapters import write_random_adapter
    from slora_backend.model_loader import random_config
    from slora_backend.model_spec import ModelSpec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-7b")
    p.add_argument("--out", required=True)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    spec = ModelSpec.from_hf_config(random_config(args.shape))
    out = Path(args.out)
    write_tokenizer(out / "tokenizer", spec.vocab_size)
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = args.targets.split(",")
    dtype = getattr(torch, args.dtype)
    for i in range(args.adapters):
        adapter = out / "adapters" / f"a{i}"
        if not (adapter / "adapter_config.json").is_file():
            write_random_adapter(adapter, spec, ranks[i % len(ranks)], targets, seed=args.seed + i,
                                 dtype=dtype)
    write_prompts(out / "prompts.txt", args.prompts, args.prompt_tokens, spec.vocab_size, args.seed)
    print(f"{args.shape}: tokenizer ({spec.vocab_size} tokens), {args.adapters} adapters "
          f"(ranks {ranks}, {','.join(targets)}), {args.prompts} prompts of {args.prompt_tokens} "
          f"tokens under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
