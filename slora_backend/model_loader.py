"""Base models from a Hugging Face directory, a GGUF file, or random weights of a named shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .default_model import cache_root, convert_gguf
from .model_spec import ModelSpec
from .models.llama import LlamaModel

# Shapes for throughput work (weights' values do not matter there, as in the S-LoRA paper's
# dummy-weight runs). Tiny shapes use SmolLM2's vocabulary so its tokenizer can drive them.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                     max_position_embeddings=4096),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                      max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=131072, rope_theta=500000.0,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0,
                                        original_max_position_embeddings=8192)),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny-mha": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=49152,
                     max_position_embeddings=1024),
    "tiny-gqa": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                     max_position_embeddings=1024, tie_word_embeddings=True),
}


def random_config(shape: str) -> Any:
    from transformers import LlamaConfig

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape {shape!r}; known: {', '.join(RANDOM_SHAPES)}")
    return LlamaConfig(**RANDOM_SHAPES[shape])


def resolve_model_dir(base_model: str) -> Path:
    """A Hugging Face directory for ``base_model`` (GGUF files are converted once, then cached)."""
    path = Path(base_model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return convert_gguf(path, cache_root() / "gguf" / path.stem)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def load_model(
    base_model: str, dtype: torch.dtype, device: torch.device, seed: int = 0, min_vocab: int = 0
) -> tuple[LlamaModel, Path | None]:
    """Build the model and fill its weights. Returns (model, its HF directory or None).

    ``min_vocab``: random shapes grow their vocabulary to this size, so that a tokenizer of
    another model (e.g. SmolLM2's for a Llama-2-7B shape) can drive them with text.
    """
    from transformers import AutoConfig

    if base_model.startswith("random:"):
        config = random_config(base_model.split(":", 1)[1])
        config.vocab_size = max(config.vocab_size, min_vocab)
        spec = ModelSpec.from_hf_config(config)
        model = LlamaModel(spec, dtype, device)
        _fill_random(model, seed)
        return model, None
    model_dir = resolve_model_dir(base_model)
    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(model_dir))
    model = LlamaModel(spec, dtype, device)
    _load_safetensors(model, model_dir)
    return model, model_dir


def _fill_random(model: LlamaModel, seed: int) -> None:
    gen = torch.Generator(device=model.embed.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.data.fill_(1.0 if "norm" in name else 0.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def _load_safetensors(model: LlamaModel, model_dir: Path) -> None:
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    loaded = 0
    for file in files:
        with safe_open(model_dir / file, framework="pt") as f:
            for name in f.keys():
                if model.load_weight(name, f.get_tensor(name)):
                    loaded += 1
    if loaded != model.expected_weights():
        raise ValueError(
            f"{model_dir}: loaded {loaded} weight tensors, expected {model.expected_weights()}"
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path | None, *, optional: bool = False) -> Any:
    """The tokenizer at ``path``. ``optional``: None when ``path`` is a directory without
    tokenizer files (a model saved without one; prompts must then be token ids)."""
    if path is None:
        return None
    if optional and Path(path).is_dir() and not any((Path(path) / f).exists()
                                                    for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
