"""Inputs for the kernel tests: scaled-down shapes of real models, adapters packed into a page
pool by the engine's own ``PoolLayout`` on pages scattered out of order, token-to-adapter
assignments of each popularity, and KV caches on shuffled pages.

Pool memory that no adapter row or KV token occupies holds random values, never zeros, so a
kernel that reads the wrong place gives a visibly wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from slora_backend.batch import LORA_MODULES, AttentionBatch, LoraBatch, slot_segments
from slora_backend.layout import PoolLayout

# (hidden, heads, kv_heads, head_dim, intermediate): real models scaled down.
SHAPES: dict[str, SimpleNamespace] = {
    # Llama-2-7B / 32: multi-head attention.
    "llama2": SimpleNamespace(hidden_size=128, num_heads=4, num_kv_heads=4, head_dim=32,
                              intermediate_size=344),
    # SmolLM2-135M / 3: GQA with 3 query heads per KV head (not a power of two).
    "smollm2": SimpleNamespace(hidden_size=192, num_heads=3, num_kv_heads=1, head_dim=64,
                               intermediate_size=512),
    # Llama-3-8B / 16: GQA 4:1.
    "llama3": SimpleNamespace(hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32,
                              intermediate_size=896),
    # Odd sizes: row offsets that are not 16-byte multiples, partial tiles everywhere.
    "odd": SimpleNamespace(hidden_size=100, num_heads=4, num_kv_heads=2, head_dim=25,
                           intermediate_size=150),
}

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Max elementwise deviation allowed from the fp32-accumulating torch references: fp32 differs
# only in summation order; 16-bit outputs may differ by an ulp of rounding (bf16: 2^-8 rel).
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}

MIXED_RANKS = (8, 16, 32, 64, 128)
POPULARITIES = ("distinct", "uniform", "skewed", "identical", "base_mixed")
# (modules, which dims) of the four fused LoRA calls of a decoder layer.
MODULE_GROUPS = {"qkv": (0, 1, 2), "o": (3,), "gate_up": (4, 5), "down": (6,)}


def module_dims(shape: SimpleNamespace) -> list[tuple[int, int]]:
    layout = PoolLayout(shape, block_tokens=4)  # type: ignore[arg-type]
    return [layout.module_dims[m] for m in LORA_MODULES]


def assign_adapters(popularity: str, num_seqs: int, gen: torch.Generator) -> list[int]:
    """Adapter index of each sequence (-1 = base model) for one popularity pattern."""
    if popularity == "distinct":
        return list(range(num_seqs))
    if popularity == "uniform":
        n = max(2, num_seqs // 2)
        return torch.randint(0, n, (num_seqs,), generator=gen).tolist()
    if popularity == "skewed":
        # S-LoRA's workload: int(power(alpha) * n) with alpha < 1 piles onto low indices.
        u = torch.rand(num_seqs, generator=gen) ** (1 / 0.3)
        return (u * num_seqs).long().tolist()
    if popularity == "identical":
        return [0] * num_seqs
    if popularity == "base_mixed":
        return [-1 if i % 3 == 1 else i for i in range(num_seqs)]
    raise ValueError(popularity)


def adapter_ranks(rank: int | str, adapter: int) -> dict[str, int]:
    """Ranks per target module. "mixed": ranks round robin, and some adapters leave modules
    untargeted (rank 0), as a PEFT adapter on q/v only does."""
    if rank != "mixed":
        return {m: int(rank) for m in LORA_MODULES}
    r = MIXED_RANKS[adapter % len(MIXED_RANKS)]
    if adapter % 3 == 2:
        return {"q_proj": r, "v_proj": r, "down_proj": r}
    return {m: r for m in LORA_MODULES}


@dataclass
class AdapterPool:
    pool: torch.Tensor  # one layer's flat buffer
    ranks: torch.Tensor
    a_offsets: torch.Tensor
    b_offsets: torch.Tensor
    scalings: torch.Tensor


def build_adapter_pool(
    shape: SimpleNamespace, dtype: torch.dtype, ranks_per_adapter: list[dict[str, int]],
    device: torch.device, gen: torch.Generator,
) -> AdapterPool:
    layout = PoolLayout(shape, block_tokens=4)  # type: ignore[arg-type]
    dims = layout.module_dims
    plans = [layout.plan_adapter(r) for r in ranks_per_adapter]
    num_pages = sum(p.num_pages for p in plans) + 3  # 3 pages nobody owns
    page_of = torch.randperm(num_pages, generator=gen).tolist()  # scattered, out of order
    pool = torch.randn(num_pages * layout.page_size, generator=gen) * 3.0  # junk
    n, max_rank = len(plans), max(max(r.values(), default=0) for r in ranks_per_adapter)
    a_off = torch.zeros(n, len(LORA_MODULES), max_rank, dtype=torch.int64)
    b_off = torch.zeros_like(a_off)
    ranks = torch.zeros(n, len(LORA_MODULES), dtype=torch.int32)
    cursor = 0
    for s, (plan, module_ranks) in enumerate(zip(plans, ranks_per_adapter)):
        pages = page_of[cursor:cursor + plan.num_pages]
        cursor += plan.num_pages
        for module, rank in module_ranks.items():
            ranks[s, LORA_MODULES.index(module)] = rank
        for row in plan.rows:
            m = LORA_MODULES.index(row.module)
            table = a_off if row.kind == "a" else b_off
            start = pages[row.page] * layout.page_size + row.offset
            table[s, m, row.index] = start
            # A rows ~ 1/sqrt(in), B^T rows ~ 1/sqrt(rank): z and the LoRA delta stay O(1).
            fan_in = dims[row.module][0] if row.kind == "a" else module_ranks[row.module]
            norm = fan_in ** 0.5
            pool[start:start + row.length] = torch.randn(row.length, generator=gen) / norm
    scalings = 0.5 + 1.5 * torch.rand(n, generator=gen)
    return AdapterPool(pool.to(dtype).to(device), ranks.to(device), a_off.to(device),
                       b_off.to(device), scalings.to(device))


def lora_batch(
    token_slots: list[int], adapters: AdapterPool, is_decode: bool, device: torch.device,
    decode_tokens: int = 0,
) -> LoraBatch:
    """The LoraBatch the model runner would build: segments = maximal runs of one slot >= 0
    (split at ``decode_tokens``, the end of a mixed step's one-token sequences)."""
    starts, lens, slots, decode_segments = slot_segments(
        ((i, 1, s) for i, s in enumerate(token_slots)), decode_tokens)

    def i32(v: list[int]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int32, device=device)

    return LoraBatch(
        token_slots=i32(token_slots), ranks=adapters.ranks, scalings=adapters.scalings,
        a_offsets=adapters.a_offsets, b_offsets=adapters.b_offsets,
        max_rank=int(adapters.a_offsets.shape[2]),
        seg_starts=i32(starts), seg_lens=i32(lens), seg_slots=i32(slots),
        max_seg_len=max(lens, default=0), is_decode=is_decode,
        decode_tokens=decode_tokens, decode_segments=decode_segments,
    )


@dataclass
class KvCase:
    kv_pages: torch.Tensor  # [P, 2, block_tokens, kv_heads, head_dim]
    attn: AttentionBatch
    q: torch.Tensor  # [T, heads, head_dim]


def build_kv_case(
    shape: SimpleNamespace, dtype: torch.dtype, q_lens: list[int], context_lens: list[int],
    block_tokens: int, device: torch.device, gen: torch.Generator,
) -> KvCase:
    """A KV cache holding each sequence's context on shuffled pages, queries for its last
    q_len tokens. Unowned pages and page tails hold random values too."""
    kvh, hd = shape.num_kv_heads, shape.head_dim
    pages_each = [-(-c // block_tokens) for c in context_lens]
    num_pages = sum(pages_each) + 2
    page_of = torch.randperm(num_pages, generator=gen).tolist()
    kv_pages = torch.randn(num_pages, 2, block_tokens, kvh, hd, generator=gen)
    max_blocks = max(pages_each) + 1
    tables = torch.zeros(len(q_lens), max_blocks, dtype=torch.int32)
    cursor = 0
    kv_slots: list[int] = []
    positions: list[int] = []
    query_starts = [0]
    for b, (q_len, ctx) in enumerate(zip(q_lens, context_lens)):
        tables[b, : pages_each[b]] = torch.tensor(page_of[cursor:cursor + pages_each[b]])
        cursor += pages_each[b]
        for p in range(ctx - q_len, ctx):
            kv_slots.append(int(tables[b, p // block_tokens]) * block_tokens + p % block_tokens)
            positions.append(p)
        query_starts.append(query_starts[-1] + q_len)
    attn = AttentionBatch(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        query_starts=torch.tensor(query_starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        kv_slots=torch.tensor(kv_slots, dtype=torch.int64, device=device),
        max_query_len=max(q_lens), max_context_len=max(context_lens),
        is_decode=max(q_lens) == 1,
        query_starts_host=query_starts, context_lens_host=list(context_lens),
    )
    q = torch.randn(query_starts[-1], shape.num_heads, hd, generator=gen)
    return KvCase(kv_pages.to(dtype).to(device), attn, q.to(dtype).to(device))
