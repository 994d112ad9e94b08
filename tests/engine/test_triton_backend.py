"""The engine on the Triton kernels gives the torch backend's greedy tokens (mixed adapters).

On CPU the kernels run in Triton's interpreter (slow: tiny model, few tokens); on CUDA the same
test runs the compiled kernels (tests/gpu adds SmolLM2-135M in fp32).
"""

from __future__ import annotations

import torch

from slora_backend import Engine, EngineConfig, SamplingParams
from tests.conftest import make_adapter

PROMPTS = ["The quick brown fox", "Paris is", "1 2 3", "Hello there, how are you today?"]
LORAS = ["r8", None, "r16", "r8"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tokens(model_dir, root, backend, max_tokens, device=DEVICE, **config):
    engine = Engine(EngineConfig(base_model=str(model_dir), adapter_root=str(root), device=device,
                                 kernel_backend=backend, pool_pages=256, **config))
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, ignore_eos=True), LORAS)
    assert [o.finish_reason for o in outs] == ["length"] * len(outs)  # (an error has no tokens)
    assert engine.pool.used_by["kv"] == 0
    return [o.token_ids for o in outs]


def _adapters(model_dir, root, scale=1.0):
    make_adapter(model_dir, root / "r8", 8, ["q_proj", "v_proj", "down_proj"], 16, seed=5, scale=scale)
    make_adapter(model_dir, root / "r16", 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                               "up_proj"], 16, rslora=True, seed=6, scale=scale)
    return root


def test_triton_backend_matches_torch_on_tiny_model(tiny_models, tmp_path):
    root = _adapters(tiny_models["gqa"], tmp_path)
    torch_tokens = _tokens(tiny_models["gqa"], root, "torch", 3)
    assert _tokens(tiny_models["gqa"], root, "triton", 3) == torch_tokens


def test_triton_backend_matches_torch_in_mixed_steps(tiny_models, tmp_path, monkeypatch):
    """Prompts prefilled a few tokens per step beside other requests' decode tokens: the mixed
    steps run their decode rows on the per-token kernels and the prompt chunks on the segment
    kernels (``ops.triton_ops._mixed_split``), and still give the torch backend's tokens."""
    from slora_backend.ops import triton_ops

    splits = []
    mixed_split = triton_ops._mixed_split

    def counted(lora):
        split = mixed_split(lora)
        splits.append(split is not None)
        return split

    monkeypatch.setattr(triton_ops, "_mixed_split", counted)
    root = _adapters(tiny_models["gqa"], tmp_path)
    torch_tokens = _tokens(tiny_models["gqa"], root, "torch", 4, max_batched_tokens=6)
    assert _tokens(tiny_models["gqa"], root, "triton", 4, max_batched_tokens=6) == torch_tokens
    assert any(splits)
