"""Paged attention rows: decode against a padded gather + bmm, prefill against SDPA."""

from __future__ import annotations

import torch
import triton
from slora_kernels.paged_attention import paged_attention

from .shapes import (
    CTX,
    DEV,
    DT,
    HEAD_DIM,
    HEADS,
    LONG_CTX,
    PREFILL_LEN,
    TARGET_B,
)
from .timing import check, eager_us, record, time_us


def kv_case(b: int, ctx: int, kv_heads: int, gen: torch.Generator):
    bt = 16
    per_seq = triton.cdiv(ctx, bt)
    pages = torch.randperm(b * per_seq, generator=gen).view(b, per_seq).to(torch.int32).to(DEV)
    kv = torch.randn(b * per_seq, 2, bt, kv_heads, HEAD_DIM, device=DEV, dtype=DT)
    return kv, pages


def attention_decode_torch(q, kv, tables, ctx_lens, max_ctx, scale) -> torch.Tensor:
    """Padded gather + bmm: every sequence's pages gathered to max_ctx, masked past its end."""
    b, heads, d = q.shape
    kvh = kv.shape[3]
    w = triton.cdiv(max_ctx, kv.shape[2])
    g = kv[tables[:, :w].long()]  # [B, W, 2, bt, kvh, d]
    k = g[:, :, 0].reshape(b, -1, kvh, d)[:, :max_ctx].permute(0, 2, 3, 1)  # [B, kvh, d, ctx]
    v = g[:, :, 1].reshape(b, -1, kvh, d)[:, :max_ctx].transpose(1, 2)  # [B, kvh, ctx, d]
    s = (q.view(b, kvh, heads // kvh, d) @ k).float() * scale
    s.masked_fill_(torch.arange(max_ctx, device=q.device) >= ctx_lens[:, None, None, None],
                   float("-inf"))
    return (torch.softmax(s, -1).to(q.dtype) @ v).reshape(b, heads, d)


def bench_attention(batches: list[int], sweep: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    scale = HEAD_DIM ** -0.5
    cases = ([(b, CTX, HEADS) for b in batches]
             + [(TARGET_B, LONG_CTX, HEADS), (TARGET_B, CTX, HEADS // 4)])
    for b, ctx, kvh in cases:
        kv, tables = kv_case(b, ctx, kvh, gen)
        q = torch.randn(b, HEADS, HEAD_DIM, device=DEV, dtype=DT)
        qs = torch.arange(b + 1, dtype=torch.int32, device=DEV)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)

        def triton_fn(splits=None, tiles=None) -> torch.Tensor:
            return paged_attention(q, kv, tables, qs, lens, scale, 1, ctx, num_splits=splits,
                                   tiles=tiles)

        def torch_fn() -> torch.Tensor:
            return attention_decode_torch(q, kv, tables, lens, ctx, scale)

        check(f"attention b{b} ctx{ctx}", triton_fn(), torch_fn())
        nbytes = b * ctx * 2 * kvh * HEAD_DIM * 2 + 2 * q.numel() * 2
        config = f"decode B={b} ctx={ctx} heads {HEADS}/{kvh}"
        record("attention_decode", config, time_us(triton_fn), time_us(torch_fn), nbytes,
               triton_eager_us=round(eager_us(triton_fn), 2))
        if sweep and ctx == CTX and kvh == HEADS and b in (8, TARGET_B):
            for tiles in ({"num_stages": 3}, {"BLOCK_N": 128}):
                record("sweep_attention", f"{config} {tiles}",
                       time_us(lambda: triton_fn(None, tiles)), None, nbytes)
            for splits in (1, 2, 4):
                record("sweep_attention", f"{config} splits={splits}",
                       time_us(lambda: triton_fn(splits)), None, nbytes)
        del kv
    # Prefill: 8 fresh prompts of 512 tokens, causal (compute-bound: TFLOP/s reported). Pages
    # in order here, so that the same K/V can be viewed contiguously for torch's SDPA.
    b, n = 8, PREFILL_LEN
    kv = torch.randn(b * n // 16, 2, 16, HEADS, HEAD_DIM, device=DEV, dtype=DT)
    tables = torch.arange(b * n // 16, dtype=torch.int32, device=DEV).view(b, n // 16)
    q = torch.randn(b * n, HEADS, HEAD_DIM, device=DEV, dtype=DT)
    qs = torch.arange(0, b * n + 1, n, dtype=torch.int32, device=DEV)
    lens = torch.full((b,), n, dtype=torch.int32, device=DEV)
    k = kv[:, 0].reshape(b, n, HEADS, HEAD_DIM).transpose(1, 2)
    v = kv[:, 1].reshape(b, n, HEADS, HEAD_DIM).transpose(1, 2)

    def sdpa() -> torch.Tensor:
        qq = q.view(b, n, HEADS, -1).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(qq, k, v, is_causal=True,
                                                                scale=scale)

    def prefill() -> torch.Tensor:
        return paged_attention(q, kv, tables, qs, lens, scale, n, n)

    check("attention prefill", prefill(), sdpa().transpose(1, 2).reshape(b * n, HEADS, -1))
    t = time_us(prefill)
    flops = 4 * b * HEADS * HEAD_DIM * n * n / 2
    record("attention_prefill", f"prefill {b}x{n} causal, vs SDPA on contiguous K/V", t,
           time_us(sdpa), 4 * q.numel() * 2, tflops=round(flops / t / 1e6, 1))


# ------------------------------------------------------------------ elementwise
