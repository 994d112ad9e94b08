"""Base models: Llama 2/3 (GQA, llama3 RoPE scaling, tied or not), Mistral, Qwen2 (q/k/v bias),
sharded checkpoints and random shapes; anything else is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.model_loader import RANDOM_SHAPES
from tests.engine.peft_reference import PeftReference

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
             initializer_range=0.2)


def _make(tmp_path, smollm2, config_cls, shard=False, **extra):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    config = config_cls(**{**SMALL, **extra})
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path / config.model_type
    model.save_pretrained(out, max_shard_size="1MB" if shard else "5GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, out / name)
    return out


def _families():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama2-untied": (LlamaConfig, dict(tie_word_embeddings=False), False),
        "llama3-rope-scaling": (LlamaConfig, dict(rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64), rope_theta=500000.0), False),
        "mistral": (MistralConfig, dict(sliding_window=4096), False),
        "qwen2-bias-sharded": (Qwen2Config, dict(tie_word_embeddings=True), True),
    }


@pytest.mark.parametrize("family", list(_families()))
def test_family_matches_transformers(family, tmp_path, smollm2):
    config_cls, extra, shard = _families()[family]
    model_dir = _make(tmp_path, smollm2, config_cls, shard=shard, **extra)
    if shard:
        assert (model_dir / "model.safetensors.index.json").is_file()
    engine = Engine(EngineConfig(base_model=str(model_dir)))
    ref = PeftReference(model_dir, {})
    prompts = ["A long time ago", "Numbers: 3 1 4 1 5 9 2 6 5 3 5 8 9 7 9 3 2 3 8 4 6 2 6 4 3 3"]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == ref.greedy(engine.tokenizer.encode(prompt), None, 8), family


def test_unsupported_model_type_is_refused_by_name(tmp_path, smollm2):
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        Engine(EngineConfig(base_model=str(model_dir)))


def test_random_shape_serves_token_ids():
    engine = Engine(EngineConfig(base_model="random:tiny-mha", pool_pages=64))
    out = engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.text == ""
    assert {"llama-7b", "llama-13b", "llama3-8b"} <= set(RANDOM_SHAPES)
    with pytest.raises(ValueError, match="unknown random shape 'llama-1t'"):
        Engine(EngineConfig(base_model="random:llama-1t"))


def test_gguf_file_loads_through_transformers(smollm2):
    # The default model comes from a GGUF file; it was converted once and is served from the cache.
    from slora_backend.default_model import smollm2_gguf
    from slora_backend.model_loader import resolve_model_dir

    assert smollm2_gguf().suffix == ".gguf"
    assert (smollm2 / "config.json").is_file() and (smollm2 / "model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir("/nonexistent/model.gguf")
