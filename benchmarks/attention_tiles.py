"""Decode attention at the engine's shapes: tile settings of ``paged_attention`` and a candidate
kernel for one query head per KV head (no tensor-core dot), against the bandwidth bound.

In the H200 decode step (7B, batch 64/256, ~550-token contexts) ``_paged_attention_kernel`` takes
47-70% of the GPU time at 91-93% of its bound, while the kernel bench (context 1024) measured
98.6%: this script looks for a setting that closes the gap (docs/benchmarks.md has its answer).

    python -m benchmarks.attention_tiles --batch 64 256 --context 512 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.language as tl
from slora_kernels.paged_attention import paged_attention

from .kernel_bench.timing import HBM_BYTES_PER_S, check, time_us

HEADS, HEAD_DIM, BLOCK_TOKENS = 32, 128, 16
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_one_head_kernel(
    q_ptr, kv_ptr, out_ptr, block_tables_ptr, context_lens_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_page, stride_kv, stride_tok, stride_head, stride_bt,
    BLOCK_TOKENS: tl.constexpr, PAGES: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Candidate: one program = one sequence and one head (group 1); a tile = PAGES whole
    pages, so each page id is loaded once; scores by a broadcast multiply and a row sum."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + seq)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + head * stride_qh + d).to(tl.float32) * qk_scale
    t = tl.arange(0, BLOCK_TOKENS)
    pg = tl.arange(0, PAGES)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([1], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    num_pages = tl.cdiv(ctx, BLOCK_TOKENS)
    for p0 in range(0, num_pages, PAGES):
        page_live = p0 + pg < num_pages
        page = tl.load(table + p0 + pg, mask=page_live, other=0).to(tl.int64)
        n = (p0 + pg)[:, None] * BLOCK_TOKENS + t[None, :]  # [PAGES, BLOCK_TOKENS]
        n = tl.reshape(n, [PAGES * BLOCK_TOKENS])
        off = tl.reshape(page[:, None] * stride_page + t[None, :] * stride_tok,
                         [PAGES * BLOCK_TOKENS]) + head * stride_head
        live = n < ctx
        k = tl.load(kv_ptr + off[:, None] + d[None, :], mask=live[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(live, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(kv_ptr + stride_kv + off[:, None] + d[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def one_head_decode(q, kv, tables, lens, scale, pages: int, num_warps: int, num_stages: int):
    b = tables.shape[0]
    out = torch.empty_like(q)
    _decode_one_head_kernel[(b, HEADS)](
        q, kv, out, tables, lens, scale * _LOG2E, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), tables.stride(0),
        BLOCK_TOKENS=BLOCK_TOKENS, PAGES=pages, HEAD_DIM=HEAD_DIM, num_warps=num_warps,
        num_stages=num_stages)
    return out


def case(b: int, ctx: int, gen: torch.Generator):
    per_seq = triton.cdiv(ctx, BLOCK_TOKENS)
    # pages shuffled over a pool twice the batch's need, as a busy engine's pool is
    perm = torch.randperm(2 * b * per_seq, generator=gen)[: b * per_seq]
    tables = perm.view(b, per_seq).to(torch.int32).cuda()
    kv = torch.randn(2 * b * per_seq, 2, BLOCK_TOKENS, HEADS, HEAD_DIM, device="cuda",
                     dtype=torch.float16)
    q = torch.randn(b, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    return q, kv, tables


def sweep(b: int, context: int, gen: torch.Generator, rows: list[dict]) -> None:
    """Every setting at batch ``b``: a row each, with its time and share of the bound."""
    q, kv, tables = case(b, context, gen)
    lens = torch.full((b,), context, dtype=torch.int32, device="cuda")
    qs = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5
    bound_us = b * context * 2 * HEADS * HEAD_DIM * 2 / HBM_BYTES_PER_S * 1e6
    want = paged_attention(q, kv, tables, qs, lens, scale, 1, context)

    def record(name: str, fn) -> None:
        try:
            check(name, fn(), want, tol=1e-2)
            us = time_us(fn)
        except Exception as e:  # a tile that does not compile or fit is a row, not a stop
            rows.append(dict(batch=b, config=name, error=str(e)[:200]))
            return
        rows.append(dict(batch=b, config=name, us=round(us, 2),
                         pct_of_bound=round(100 * bound_us / us, 1)))
        print(f"B={b} ctx={context} {name}: {us:.1f} us, {100 * bound_us / us:.1f}%", flush=True)

    record("default", lambda: paged_attention(q, kv, tables, qs, lens, scale, 1, context))
    for bn, w, s in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
        tiles = dict(BLOCK_N=bn, num_warps=w, num_stages=s)
        record(f"dot {tiles}", lambda t=tiles: paged_attention(
            q, kv, tables, qs, lens, scale, 1, context, tiles=t))
    for pages, w, s in itertools.product((2, 4, 8), (2, 4, 8), (1, 2, 3)):
        record(f"one-head pages={pages} warps={w} stages={s}", lambda p=pages, w=w, s=s:
               one_head_decode(q, kv, tables, lens, scale, p, w, s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for b in args.batch:
        sweep(b, args.context, gen, rows)
        torch.cuda.empty_cache()
    best: dict[int, dict] = {}
    for r in rows:
        if "us" in r and (r["batch"] not in best or r["us"] < best[r["batch"]]["us"]):
            best[r["batch"]] = r
    print("best:", json.dumps(best, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(context=args.context, rows=rows, best=best), f, indent=1)


if __name__ == "__main__":
    main()
