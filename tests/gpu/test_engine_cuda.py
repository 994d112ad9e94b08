"""On CUDA: the engine on the compiled Triton kernels (decode steps from CUDA graphs) gives the
torch backend's greedy tokens on SmolLM2-135M in fp32, with mixed adapters. Collected only where
CUDA exists (tests/conftest.py)."""

from __future__ import annotations

from slora_backend import Engine, EngineConfig, SamplingParams
from tests.engine.test_triton_backend import LORAS, PROMPTS, _adapters, _tokens


def test_triton_backend_matches_torch_on_smollm2_cuda(smollm2, tmp_path):
    root = _adapters(smollm2, tmp_path, scale=0.5)
    assert _tokens(smollm2, root, "triton", 16) == _tokens(smollm2, root, "torch", 16)


def test_graph_replay_equals_eager(smollm2, tmp_path):
    root = _adapters(smollm2, tmp_path, scale=0.5)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    results = {}
    for graphs in (True, False):
        engine = Engine(EngineConfig(base_model=str(smollm2), adapter_root=str(root), device="cuda",
                                     dtype="float32", cuda_graphs=graphs, pool_pages=512))
        results[graphs] = [o.token_ids for o in engine.generate(PROMPTS * 3, params, LORAS * 3)]
        if graphs:
            assert engine.runner.graphs.num_graphs > 0
        else:
            assert engine.runner.graphs is None
    assert results[True] == results[False]
