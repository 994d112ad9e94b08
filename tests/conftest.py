"""Shared fixtures: tiny random Llama-shaped models in Hugging Face format, PEFT adapters for
them, and the SmolLM2-135M demo model. Everything is built once per session under a tmp dir."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from slora_backend.default_model import smollm2_dir

# GPU-only tests live in tests/gpu and are collected only where CUDA exists (the H200 runs them),
# so a CPU run neither skips nor fakes them.
collect_ignore = [] if torch.cuda.is_available() else ["gpu"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# initializer_range is raised above the usual 0.02 so that random models have peaked logits:
# greedy comparisons then test the arithmetic, not which of two near-equal logits wins.
TINY_SHAPES = {
    "mha": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
}


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_dir()


def make_tiny_model(out: Path, shape: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=512, initializer_range=0.2,
                         bos_token_id=1, eos_token_id=2, **TINY_SHAPES[shape])
    LlamaForCausalLM(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def make_adapter(
    model_dir: Path, out: Path, rank: int, targets: list[str], alpha: float,
    rslora: bool = False, seed: int = 0, scale: float = 1.0,
) -> Path:
    """A PEFT LoRA adapter with random A and B (B is non-zero, unlike PEFT's default init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                     init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {shape: make_tiny_model(root / shape, shape, smollm2, seed=i)
            for i, shape in enumerate(TINY_SHAPES)}
