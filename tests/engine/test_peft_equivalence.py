"""The engine's greedy tokens equal transformers + PEFT, adapter by adapter, in one mixed batch."""

from __future__ import annotations

import pytest
import torch

from slora_backend import Engine, EngineConfig, SamplingParams
from tests.conftest import make_adapter
from tests.engine.peft_reference import PeftReference

# Four adapters: ranks 4..64, different target sets, one rsLoRA; plus base-model prompts.
ADAPTERS = {
    "r4-qv": dict(rank=4, targets=["q_proj", "v_proj"], alpha=8),
    "r16-attn-rs": dict(rank=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"], alpha=16,
                        rslora=True),
    "r32-mlp": dict(rank=32, targets=["gate_proj", "up_proj", "down_proj"], alpha=32),
    "r64-all": dict(rank=64, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"], alpha=64),
}
PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "Paris is the capital of",
    "1, 2, 3, 4,",
    "The weather today is",
    "Water boils at",
    "My favourite colour is",
]
LORAS = ["r4-qv", "r16-attn-rs", None, "r32-mlp", "r64-all", "r16-attn-rs", None, "r4-qv"]
MAX_TOKENS = 10
LOGIT_ATOL = 2e-3  # fp32 on CPU; measured differences are ~1e-5 (different summation order)


def _build(model_dir, tmp_path, scale):
    root = tmp_path / "adapters"
    paths = {name: make_adapter(model_dir, root / name, seed=i, scale=scale, **kw)
             for i, (name, kw) in enumerate(ADAPTERS.items())}
    engine = Engine(EngineConfig(base_model=str(model_dir), adapter_root=str(root),
                                 kernel_backend="torch"))
    for name in paths:
        engine.load_adapter(name, name)
    return engine, PeftReference(model_dir, paths)


def _check(engine: Engine, ref: PeftReference) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = engine.generate(PROMPTS, params, LORAS)
    for prompt, lora, out in zip(PROMPTS, LORAS, outs):
        ids = engine.tokenizer.encode(prompt)
        expected = ref.greedy(ids, lora, MAX_TOKENS)
        assert out.token_ids == expected, f"prompt {prompt!r} adapter {lora}"
        assert out.finish_reason == "length"
    # Logits of the first decode position agree within tolerance, per adapter.
    for prompt, lora in zip(PROMPTS[:5], LORAS[:5]):
        ids = engine.tokenizer.encode(prompt)
        got = engine_logits(engine, ids, lora)
        want = ref.logits(ids, lora)
        assert torch.allclose(got, want, atol=LOGIT_ATOL, rtol=0), (
            f"{lora}: max |diff| {float((got - want).abs().max()):.2e}"
        )
    assert engine.pool.num_free + engine.pool.used_by["adapter"] == engine.pool.num_pages


def engine_logits(engine: Engine, ids: list[int], lora: str | None) -> torch.Tensor:
    """Logits of the prompt's last position, through the engine's own prefill path."""
    captured = {}
    real = engine.runner.execute

    def spy(scheduled, residents, pending=None):
        logits = real(scheduled, residents, pending)
        captured["logits"] = logits[0].clone()
        return logits

    engine.runner.execute = spy
    try:
        engine.generate([ids], SamplingParams(max_tokens=1), [lora])
    finally:
        engine.runner.execute = real
    return captured["logits"]


@pytest.mark.parametrize("shape", ["mha", "gqa"])
def test_tiny_models_match_peft(shape, tiny_models, tmp_path):
    engine, ref = _build(tiny_models[shape], tmp_path, scale=1.0)
    _check(engine, ref)


@pytest.mark.slow
def test_smollm2_matches_peft(smollm2, tmp_path):
    # Scaled-down random adapters keep SmolLM2's answers coherent, which makes ties unlikely.
    engine, ref = _build(smollm2, tmp_path, scale=0.5)
    _check(engine, ref)
