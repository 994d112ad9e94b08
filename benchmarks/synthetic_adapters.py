"""Random LoRA adapters in PEFT format, written straight to disk (fast enough for thousands).

The files are what ``peft`` writes: ``adapter_config.json`` + ``adapter_model.safetensors`` with
keys ``base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from slora_backend.layout import PoolLayout
from slora_backend.model_spec import ModelSpec

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_random_adapter(
    out: Path, spec: ModelSpec, rank: int, targets: Sequence[str], alpha: float | None = None,
    seed: int = 0, dtype: torch.dtype = torch.float16, std: float = 0.02,
) -> Path:
    dims = PoolLayout(spec).module_dims
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for m in targets:
            in_dim, out_dim = dims[m]
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[m]}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_dim, generator=gen) * std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_dim, rank, generator=gen) * std).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
              "task_type": "CAUSAL_LM", "base_model_name_or_path": spec.model_type}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out
