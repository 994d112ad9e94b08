"""On CUDA: the engine on the compiled Triton kernels gives the torch backend's greedy tokens on
SmolLM2-135M in fp32, with mixed adapters. Collected only where CUDA exists (tests/conftest.py)."""

from __future__ import annotations

from tests.engine.test_triton_backend import _adapters, _tokens


def test_triton_backend_matches_torch_on_smollm2_cuda(smollm2, tmp_path):
    root = _adapters(smollm2, tmp_path, scale=0.5)
    assert _tokens(smollm2, root, "triton", 16) == _tokens(smollm2, root, "torch", 16)
