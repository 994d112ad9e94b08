"""Paged attention (decode, split decode, prefill, chunked prefill, mixed) and the KV write
against ``attention_reference``; KV pages always shuffled in the pool, MHA and GQA."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, SHAPES, TOLERANCES, build_kv_case
from slora_kernels.attention_reference import paged_attention_ref, write_kv_ref
from slora_kernels.paged_attention import paged_attention, write_kv

from slora_backend.ops import TorchOps
from slora_backend.ops.triton_ops import TritonOps

# name: (shape, q_lens, context_lens, block_tokens, num_splits)
CONFIGS = {
    "decode-mha": ("llama2", [1, 1, 1, 1], [1, 7, 16, 33], 4, None),
    "decode-gqa3-split": ("smollm2", [1, 1, 1], [5, 40, 70], 16, 3),
    "prefill-gqa4": ("llama3", [5, 12, 1], [5, 12, 1], 4, None),
    "chunked-prefill": ("llama3", [4, 20], [30, 20], 6, None),  # cached prefix, odd pages
    "mixed-odd-headdim": ("odd", [1, 7, 1], [9, 7, 20], 3, None),
    # Several query tiles and key tiles per sequence; 110 cached tokens before the chunk.
    "long-chunked-prefill": ("llama3", [40, 3], [150, 3], 16, None),
    "long-decode-split": ("llama2", [1, 1], [300, 129], 16, 4),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_paged_attention(dtype_name: str, config: str, device) -> None:
    dtype = DTYPES[dtype_name]
    shape_name, q_lens, ctx, block_tokens, splits = CONFIGS[config]
    gen = torch.Generator().manual_seed(11)
    case = build_kv_case(SHAPES[shape_name], dtype, q_lens, ctx, block_tokens, device, gen)
    a = case.attn
    scale = SHAPES[shape_name].head_dim ** -0.5
    ref = paged_attention_ref(case.q, case.kv_pages, a.block_tables, a.query_starts_host,
                              a.context_lens_host, scale)
    out = paged_attention(case.q, case.kv_pages, a.block_tables, a.query_starts, a.context_lens,
                          scale, a.max_query_len, a.max_context_len, num_splits=splits)
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_mixed_batch_with_decode_rows_launched_apart(dtype_name: str, num_splits, device) -> None:
    """decode_seqs: the leading one-token sequences run as a decode launch (with key splits when
    asked), the prompts as another, into one output: equal to the reference."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(15)
    case = build_kv_case(SHAPES["llama3"], dtype, [1, 1, 1, 5, 12], [9, 70, 3, 5, 30], 4,
                         device, gen)
    a = case.attn
    scale = SHAPES["llama3"].head_dim ** -0.5
    ref = paged_attention_ref(case.q, case.kv_pages, a.block_tables, a.query_starts_host,
                              a.context_lens_host, scale)
    out = torch.full_like(case.q, float("nan"))
    got = paged_attention(case.q, case.kv_pages, a.block_tables, a.query_starts, a.context_lens,
                          scale, a.max_query_len, a.max_context_len, num_splits=num_splits,
                          decode_seqs=3, out=out)
    assert got is out
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])
    with pytest.raises(ValueError, match="out has size"):
        paged_attention(case.q, case.kv_pages, a.block_tables, a.query_starts, a.context_lens,
                        scale, a.max_query_len, a.max_context_len, decode_seqs=3, out=out[1:])


@pytest.mark.parametrize("shape_name", ["llama2", "smollm2"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_write_kv(dtype_name: str, shape_name: str, device) -> None:
    """k and v are slices of a fused qkv output; a negative slot (padding) writes nothing."""
    dtype = DTYPES[dtype_name]
    shape = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(12)
    case = build_kv_case(shape, dtype, [3, 2], [3, 6], 4, device, gen)
    kv_dim = shape.num_kv_heads * shape.head_dim
    q_dim = shape.num_heads * shape.head_dim
    qkv = torch.randn(5, q_dim + 2 * kv_dim, generator=gen).to(dtype).to(device)
    k = qkv[:, q_dim:q_dim + kv_dim].view(5, shape.num_kv_heads, shape.head_dim)
    v = qkv[:, q_dim + kv_dim:].view(5, shape.num_kv_heads, shape.head_dim)
    slots = case.attn.kv_slots.clone()
    ref = case.kv_pages.clone()
    write_kv_ref(ref, k[1:], v[1:], slots[1:])
    slots[0] = -1
    out = case.kv_pages.clone()
    write_kv(out, k, v, slots)
    assert torch.equal(out, ref)
    # The reference skips the padding token too (indexed as is, -1 is the pool's last slot).
    padded = case.kv_pages.clone()
    write_kv_ref(padded, k, v, slots)
    assert torch.equal(padded, ref)


def test_ops_attention_path_matches_torch(device) -> None:
    """TritonOps.write_kv + attention == TorchOps on a mixed prefill/decode batch (fp32)."""
    gen = torch.Generator().manual_seed(13)
    case = build_kv_case(SHAPES["llama3"], torch.float32, [6, 1, 3], [6, 9, 10], 4, device, gen)
    k = torch.randn(10, 2, 32, generator=gen).to(device)
    v = torch.randn(10, 2, 32, generator=gen).to(device)
    results = []
    for ops in (TorchOps(), TritonOps()):
        kv = case.kv_pages.clone()
        ops.write_kv(kv, k, v, case.attn)
        results.append((kv, ops.attention(case.q, kv, case.attn, 0.2)))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], **TOLERANCES[torch.float32])


def test_attention_launchers_reject_bad_arguments(device) -> None:
    gen = torch.Generator().manual_seed(14)
    case = build_kv_case(SHAPES["llama3"], torch.float16, [1, 1], [3, 5], 4, device, gen)
    a = case.attn
    args = (a.block_tables, a.query_starts, a.context_lens, 0.1, 1, 5)
    with pytest.raises(ValueError, match="kv_pages has dtype"):
        paged_attention(case.q, case.kv_pages.float(), *args)
    with pytest.raises(ValueError, match="not a multiple of kv_heads"):
        paged_attention(case.q[:, :7], case.kv_pages, *args)
    with pytest.raises(ValueError, match="q has size"):
        paged_attention(case.q[..., :16], case.kv_pages, *args)
    with pytest.raises(ValueError, match="exceeds the block table"):
        paged_attention(case.q, case.kv_pages, a.block_tables, a.query_starts, a.context_lens,
                        0.1, 1, 500)
    with pytest.raises(ValueError, match="query_starts has size"):
        paged_attention(case.q, case.kv_pages, a.block_tables, a.query_starts[:2],
                        a.context_lens, 0.1, 1, 5)
    with pytest.raises(ValueError, match="kv_slots has dtype"):
        write_kv(case.kv_pages, case.q[:, :2], case.q[:, :2], a.kv_slots.int())
    with pytest.raises(ValueError, match="dimension 1 must be 2"):
        write_kv(case.kv_pages[:, :1], case.q[:, :2], case.q[:, :2], a.kv_slots)


def test_batched_decode_reference_equals_the_loop_reference():
    """The engine's CPU decode path (all sequences at once) equals the per-sequence reference."""
    from slora_kernels.attention_reference import paged_attention_ref, paged_decode_attention_batched

    gen = torch.Generator().manual_seed(0)
    num_pages, block_tokens, kv_heads, head_dim, heads = 40, 4, 2, 16, 6
    kv_pages = torch.randn(num_pages, 2, block_tokens, kv_heads, head_dim, generator=gen)
    context = [1, 7, 13, 4]
    perm = torch.randperm(num_pages, generator=gen).tolist()  # pages scattered out of order
    tables = torch.zeros(len(context), 4, dtype=torch.int32)
    for b, n in enumerate(context):
        blocks = -(-n // block_tokens)
        tables[b, :blocks] = torch.tensor([perm.pop() for _ in range(blocks)], dtype=torch.int32)
    q = torch.randn(len(context), heads, head_dim, generator=gen)
    want = paged_attention_ref(q, kv_pages, tables, list(range(len(context) + 1)), context, 0.25)
    got = paged_decode_attention_batched(q, kv_pages, tables, torch.tensor(context), 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
