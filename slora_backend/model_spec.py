"""The shape and arithmetic of a Llama-family base model, read from a transformers config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Architectures served by ``models/llama.py``: same block structure, differing in GQA, biases,
# RoPE scaling and embedding tying, all of which ModelSpec carries.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (Qwen2)
    hf_config: Any = field(repr=False, compare=False, default=None)  # for RoPE init

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelSpec:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {model_type!r} is not supported; this engine serves "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported; only 'silu'")
        max_pos = config.max_position_embeddings
        window = getattr(config, "sliding_window", None)
        if model_type == "mistral" and window:
            # Within the window, sliding-window attention equals full attention.
            max_pos = min(max_pos, window)
        if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
            raise ValueError("qwen2 with use_sliding_window=True is not supported")
        return cls(
            model_type=model_type,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            hf_config=config,
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim
