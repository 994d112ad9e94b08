"""The decode-graph path's padded static inputs give the eager path's tokens.

CUDA graphs cannot be captured on CPU, so ``DecodeGraphs(capture=False)`` replays eagerly (on
whichever device the tests run) from the same padded static buffers a captured graph would read
(batch, rank and context buckets, padding rows with slot -1): this checks the padding and
metadata copying, not the capture.
"""

from __future__ import annotations

import pytest

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.cuda_graphs import ATTENTION_MODULES, DecodeGraphs
from tests.conftest import make_adapter
from tests.engine.test_triton_backend import DEVICE, LORAS, PROMPTS, _adapters


def _engine(model_dir, root, emulate_graphs: bool) -> Engine:
    """The Triton path without CUDA graphs, or with graphs replayed eagerly from their padded
    static inputs (``emulate_graphs``)."""
    engine = Engine(EngineConfig(base_model=str(model_dir), adapter_root=str(root), device=DEVICE,
                                 kernel_backend="triton", pool_pages=256, block_tokens=4,
                                 cuda_graphs=False))
    if emulate_graphs:
        r = engine.runner
        r.graphs = DecodeGraphs(engine.model, r.ops, r.pool, r.kv_shape, 256,
                                engine.max_model_len, capture=False, slot_tables=r.slot_tables)
    return engine


@pytest.mark.parametrize("adapters", ["mlp_too", "attention_only"])
def test_padded_graph_inputs_match_eager(adapters, tiny_models, tmp_path):
    """Batches whose adapters touch only q/k/v/o replay graphs captured without the MLP's LoRA
    launches; a batch with any MLP target replays one with every module's."""
    root = _adapters(tiny_models["gqa"], tmp_path)
    loras = LORAS
    if adapters == "attention_only":
        make_adapter(tiny_models["gqa"], root / "attn", 8, ["q_proj", "k_proj", "o_proj"], 16, seed=7)
        loras = ["attn", None, "attn", "attn"]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    results = []
    for emulate in (False, True):
        engine = _engine(tiny_models["gqa"], root, emulate)
        results.append([o.token_ids for o in engine.generate(PROMPTS + PROMPTS[:1], params,
                                                             loras + loras[:1])])
        if emulate:
            keys = set(engine.runner.graphs._graphs)  # 5 sequences padded to a bucket of 8
            want = ATTENTION_MODULES if adapters == "attention_only" else None
            assert keys and {targets for _, rank, targets in keys if rank} == {want}
    assert results[0] == results[1]


def test_capture_all_covers_every_adapter_kind(tiny_models, tmp_path):
    """One graph per batch bucket for each (rank bucket, target set) among the adapters given:
    rank 8 on attention only and rank 8 with an MLP target are two kinds, rank 12 joins 16."""
    engine = Engine(EngineConfig(base_model=str(tiny_models["gqa"]), device=DEVICE,
                                 kernel_backend="triton", pool_pages=64, cuda_graphs=False))
    r = engine.runner
    graphs = DecodeGraphs(engine.model, r.ops, r.pool, r.kv_shape, 2, 32, capture=False,
                          slot_tables=r.slot_tables)
    graphs.capture_all([(0, None), (8, frozenset({0, 1})), (8, frozenset({0, 4})),
                        (12, frozenset({3})), (8, ATTENTION_MODULES)])
    assert set(graphs._graphs) == {(b, rank, targets) for b in (1, 2) for rank, targets in
                                   ((0, None), (8, ATTENTION_MODULES), (8, None),
                                    (16, ATTENTION_MODULES))}


def test_graphs_follow_widened_slot_tables(tiny_models, tmp_path):
    """A rank larger than any before widens the device LoRA tables into new tensors: the graphs
    that read the old ones are dropped and captured again, tokens stay the eager path's, and a
    batch of smaller ranks reads its columns out of the wider tables unchanged."""
    root = _adapters(tiny_models["gqa"], tmp_path)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    results = []
    for emulate in (False, True):
        engine = _engine(tiny_models["gqa"], root, emulate)
        r = engine.runner
        tokens = [o.token_ids for o in engine.generate(PROMPTS[:2], params, ["r8", "r8"])]
        assert r.slot_tables.width == 8
        tokens += [o.token_ids for o in engine.generate(PROMPTS[:2], params, ["r16", "r8"])]
        assert r.slot_tables.width == 16 and r.slot_tables.version == 1
        # rank-8 steps now read 8 columns cut from the 16-wide tables (a strided view)
        again = [o.token_ids for o in engine.generate(PROMPTS[:2], params, ["r8", "r8"])]
        assert again == tokens[:2]
        if emulate:
            graphs = [g for g in r.graphs._graphs.values() if g.lora is not None]
            assert graphs and all(g.lora.a_offsets.data_ptr() == r.slot_tables.a.data_ptr()
                                  for g in graphs)
        results.append(tokens)
    assert results[0] == results[1]
