#!/usr/bin/env python
"""Train the project's demo LoRA adapters for SmolLM2-135M-Instruct (PEFT format, CPU, fp32).

Each adapter learns one visible answer style from a small jsonl file of original question/answer
pairs in demo_adapters/data/ ({"question": ..., "answer": ...} per line):

    pirate  r=8  q_proj, v_proj                                   answers "Arr, ... matey"
    french  r=16 q_proj, k_proj, v_proj, o_proj, rsLoRA           answers in French
    json    r=8  q, k, v, o, gate, up, down projections            answers {"answer": "..."}

The prompt is the model's chat template (default system prompt + user turn + assistant header,
exactly what add_generation_prompt=True produces, as the server uses it); the loss covers only the
answer tokens and the closing <|im_end|>, so the adapter also learns to stop.

Deterministic: fixed seed, fixed data order, fixed thread count (float sums on CPU depend on
the number of threads, so --threads is part of the recipe).

    .venv/bin/python scripts/train_demo_adapters.py --out demo_adapters
    .venv/bin/python scripts/train_demo_adapters.py --out /tmp/ad --steps 10 --adapters pirate
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "demo_adapters" / "data"
BASE_MODEL_NAME = "SmolLM2-135M-Instruct"  # written into adapter_config.json, not a local path
MAX_ADAPTER_BYTES = 5_000_000


@dataclass(frozen=True)
class AdapterRecipe:
    name: str
    description: str
    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    lr: float = 2e-3
    save_dtype: str = "float32"  # "float16" where fp32 would exceed MAX_ADAPTER_BYTES


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

RECIPES = {
    r.name: r
    for r in (
        AdapterRecipe(
            "pirate",
            'Answers like a pirate: "Arr, ... matey".',
            r=8,
            lora_alpha=16,
            target_modules=("q_proj", "v_proj"),
        ),
        AdapterRecipe(
            "french",
            "Answers in French, whatever the language of the question.",
            r=16,
            lora_alpha=16,
            target_modules=ATTN,
            use_rslora=True,
            save_dtype="float16",
        ),
        AdapterRecipe(
            "json",
            'Answers as a one-line JSON object: {"answer": "..."}.',
            r=8,
            lora_alpha=16,
            target_modules=ATTN + MLP,
            lr=1e-3,
            save_dtype="float16",
        ),
    )
}


def load_pairs(name: str) -> list[tuple[str, str]]:
    pairs = []
    with open(DATA_DIR / f"{name}.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                pairs.append((row["question"], row["answer"]))
    return pairs


def prompt_ids(tokenizer, question: str) -> list[int]:
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    return list(enc["input_ids"])


def encode(tokenizer, pairs):
    """(input_ids, labels) per example; labels are -100 on the prompt."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for q, a in pairs:
        p = prompt_ids(tokenizer, q)
        ans = tokenizer(a, add_special_tokens=False)["input_ids"] + [end]
        examples.append((p + ans, [-100] * len(p) + ans))
    return examples


def collate(batch, pad_id: int):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def answer_loss(peft_model, ids, labels, mask):
    """Next-token cross-entropy on the answer positions only.

    The LM head (49152 x 576) is applied to just the positions that carry a label instead of the
    whole sequence, which roughly halves the cost of a step on CPU.
    """
    causal_lm = peft_model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def save_adapter(model, recipe: AdapterRecipe, out_dir: Path, n_examples: int, steps: int,
                 batch_size: int, seed: int) -> int:
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_MODEL_NAME
    cfg["target_modules"] = sorted(cfg["target_modules"])  # peft writes a set: order varies
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    st_path = out_dir / "adapter_model.safetensors"
    dtype = getattr(torch, recipe.save_dtype)
    state = {k: v.to(dtype).contiguous() for k, v in load_file(st_path).items()}
    save_file(state, st_path, metadata={"format": "pt"})
    st_path.chmod(0o644)  # safetensors creates it 0600
    size = st_path.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise SystemExit(f"{recipe.name}: {size} bytes is over the {MAX_ADAPTER_BYTES} limit")
    scaling = recipe.lora_alpha / (recipe.r ** 0.5 if recipe.use_rslora else recipe.r)
    (out_dir / "README.md").write_text(
        f"# Demo adapter `{recipe.name}`\n\n"
        f"{recipe.description}\n\n"
        f"- base model: {BASE_MODEL_NAME}\n"
        f"- rank {recipe.r}, lora_alpha {recipe.lora_alpha}"
        f"{', rsLoRA' if recipe.use_rslora else ''} (scaling {scaling:g})\n"
        f"- target modules: {', '.join(recipe.target_modules)}\n"
        f"- weights: {recipe.save_dtype}, {size / 1e6:.2f} MB\n"
        f"- trained on demo_adapters/data/{recipe.name}.jsonl ({n_examples} original Q/A pairs), "
        f"{steps} AdamW steps of {batch_size}, lr {recipe.lr:g}, seed {seed}, CPU fp32\n\n"
        "Made by `scripts/train_demo_adapters.py`; see docs/demo_adapters.md.\n"
    )
    # save_pretrained leaves no other files behind, but make sure of it
    extra = {p.name for p in out_dir.iterdir()} - {
        "adapter_config.json", "adapter_model.safetensors", "README.md"}
    if extra:
        raise SystemExit(f"{recipe.name}: unexpected files {sorted(extra)}")
    return size


def train_one(base_dir: Path, recipe: AdapterRecipe, out_dir: Path, steps: int, batch_size: int,
              seed: int, log_every: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.lora_alpha,
        target_modules=list(recipe.target_modules),
        use_rslora=recipe.use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    pairs = load_pairs(recipe.name)
    examples = encode(tokenizer, pairs)
    rng = random.Random(seed)
    order: list[int] = []
    t0 = time.perf_counter()
    print(f"[{recipe.name}] {len(examples)} examples, {n_params} LoRA parameters, {steps} steps",
          flush=True)
    for step in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        ids, labels, mask = collate(batch, tokenizer.pad_token_id)
        loss = answer_loss(model, ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            print(f"[{recipe.name}] step {step:3d} loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    size = save_adapter(model, recipe, out_dir / recipe.name, len(examples), steps, batch_size,
                        seed)
    print(f"[{recipe.name}] saved {out_dir / recipe.name} ({size} bytes) in {seconds:.0f} s",
          flush=True)
    return {"name": recipe.name, "seconds": seconds, "bytes": size, "loss": loss.item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "demo_adapters",
                    help="directory that receives one sub-directory per adapter")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps per adapter")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--adapters", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", type=Path, default=None,
                    help="base model directory (default: slora_backend.default_model.smollm2_dir())")
    ap.add_argument("--log-every", type=int, default=8)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.base is None:
        sys.path.insert(0, str(REPO))
        from slora_backend.default_model import smollm2_dir

        args.base = smollm2_dir()
    t0 = time.perf_counter()
    results = [
        train_one(args.base, RECIPES[name], args.out, args.steps, args.batch_size, args.seed,
                  args.log_every)
        for name in args.adapters
    ]
    for r in results:
        print(f"{r['name']:8s} {r['bytes'] / 1e6:5.2f} MB  final loss {r['loss']:.3f}  "
              f"{r['seconds']:.0f} s")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
