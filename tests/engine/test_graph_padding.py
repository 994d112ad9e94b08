"""The decode-graph path's padded static inputs give the eager path's tokens.

CUDA graphs cannot be captured on CPU, so ``DecodeGraphs(capture=False)`` replays eagerly from
the same padded static buffers a captured graph would read (batch, rank and context buckets,
padding rows with slot -1): this checks the padding and metadata copying, not the capture.
"""

from __future__ import annotations

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.cuda_graphs import DecodeGraphs
from tests.engine.test_triton_backend import LORAS, PROMPTS, _adapters


def test_padded_graph_inputs_match_eager(tiny_models, tmp_path):
    root = _adapters(tiny_models["gqa"], tmp_path)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    results = []
    for emulate in (False, True):
        engine = Engine(EngineConfig(base_model=str(tiny_models["gqa"]), adapter_root=str(root),
                                     kernel_backend="triton", pool_pages=256, block_tokens=4))
        if emulate:
            r = engine.runner
            r.graphs = DecodeGraphs(engine.model, r.ops, r.pool, r.kv_shape, 256,
                                    engine.max_model_len, capture=False)
        results.append([o.token_ids for o in engine.generate(PROMPTS + PROMPTS[:1], params,
                                                             LORAS + LORAS[:1])])
        if emulate:
            assert engine.runner.graphs.num_graphs >= 1  # 5 sequences padded to a bucket of 8
    assert results[0] == results[1]
