"""What each tensor-parallel rank holds: the base split, the LoRA split, the pool layout."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from slora_backend import EngineConfig
from slora_backend.model_spec import ModelSpec
from slora_backend.parallel import TensorParallelShard, check_tensor_parallel
from slora_backend.parallel.layout import ShardedPoolLayout
from slora_backend.parallel.shards import COLUMN_PARALLEL, ROW_PARALLEL


def _spec(heads: int = 4, kv_heads: int = 2, hidden: int = 64, inter: int = 160) -> ModelSpec:
    return ModelSpec.from_hf_config(LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=128))


@pytest.mark.parametrize("kwargs, world, message", [
    (dict(heads=4, kv_heads=4), 3, "divide the model's 4 attention heads"),
    (dict(heads=12, kv_heads=4, hidden=96), 6, "6 and the model's 4 KV heads"),
    (dict(heads=4, kv_heads=4, inter=130), 4, "intermediate_size 130"),
    (dict(), 0, "must be >= 1"),
])
def test_uneven_splits_are_refused(kwargs, world, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(_spec(**kwargs), world)


def test_config_refuses_a_size_below_one():
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1, got 0"):
        EngineConfig(base_model="random:tiny-mha", tensor_parallel_size=0)


def test_kv_heads_are_replicated_over_ranks_when_fewer_than_ranks():
    spec = _spec(heads=4, kv_heads=2)
    head_dim = spec.head_dim
    slices = [TensorParallelShard(spec, k, 4).output_slice("k_proj") for k in range(4)]
    # ranks 0, 1 attend with KV head 0 (their query heads 0 and 1), ranks 2, 3 with head 1
    assert [(s.start // head_dim, s.stop - s.start) for s in slices] == [(0, head_dim), (0, head_dim),
                                                                          (1, head_dim), (1, head_dim)]
    assert TensorParallelShard(spec, 3, 4).local_spec.num_kv_heads == 1


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("rank_r", [4, 6, 64])
def test_lora_shards_recombine_to_the_whole_delta(world, rank_r):
    """Per module, the ranks' shards with the collectives between give x A^T B^T exactly."""
    spec = _spec()
    torch.manual_seed(0)
    shards = [TensorParallelShard(spec, k, world) for k in range(world)]
    from slora_backend.layout import PoolLayout

    dims = PoolLayout(spec).module_dims
    for module in (*COLUMN_PARALLEL, *ROW_PARALLEL):
        in_dim, out_dim = dims[module]
        a, b = torch.randn(rank_r, in_dim, dtype=torch.float64), torch.randn(out_dim, rank_r,
                                                                            dtype=torch.float64)
        x = torch.randn(3, in_dim, dtype=torch.float64)
        want = x @ a.T @ b.T
        if module in COLUMN_PARALLEL:
            parts = [x @ s.adapter_rows(module, "a", a).T for s in shards]  # [3, ceil(r / N)]
            z = torch.stack(parts, dim=-1).flatten(-2)[:, :rank_r]  # the interleaved all-gather
            for s in shards:
                got = z @ s.adapter_rows(module, "b", b)
                assert torch.allclose(got, want[:, s.output_slice(module)]), module
        else:
            z = sum(x[:, s.input_slice(module)] @ s.adapter_rows(module, "a", a).T for s in shards)
            got = torch.cat([z @ s.adapter_rows(module, "b", b) for s in shards], dim=1)
            assert torch.allclose(got, want), module


def test_every_rank_plans_the_same_pages():
    spec = _spec()
    ranks = {"q_proj": 6, "k_proj": 6, "o_proj": 6, "down_proj": 6, "gate_proj": 6}
    plans = [ShardedPoolLayout(TensorParallelShard(spec, k, 4)).plan_adapter(ranks) for k in range(4)]
    assert all(p == plans[0] for p in plans)
    layouts = [ShardedPoolLayout(TensorParallelShard(spec, k, 4)) for k in range(4)]
    assert {(lay.page_size, lay.block_tokens) for lay in layouts} == {(layouts[0].page_size,
                                                                        layouts[0].block_tokens)}
    # a KV page holds one rank's KV head of block_tokens tokens
    assert layouts[0].page_size == layouts[0].block_tokens * 2 * 1 * spec.head_dim
