"""Paged attention over the unified pool: decode and (chunked) prefill in one kernel, plus the
KV write.

One layer's pool buffer is viewed as ``kv_pages[num_pages, 2, block_tokens, kv_heads, head_dim]``
(index 0 = K, 1 = V); token t of sequence b lives in page ``block_tables[b, t // block_tokens]``
at offset ``t % block_tokens``. Sequence b's queries are the last ``q_len_b`` of its
``context_len_b`` cached tokens (a chunked prefill has a cached prefix; decode has q_len 1).

A program owns one sequence, one KV head and a tile of that sequence's queries: all
``group = num_heads / kv_heads`` query heads of up to ``BLOCK_Q`` query tokens, flattened into
``BLOCK_Q * GROUP_PAD`` rows, so a K/V tile read from the pool serves every query head that
shares it (GQA). Keys stream through in tiles of ``BLOCK_N`` tokens with an online softmax.
Decode with few sequences splits each sequence's keys over ``num_splits`` programs
(flash-decoding) and merges their partial softmax states in a second, small kernel.
Torch references: ``attention_reference.paged_attention_ref`` / ``write_kv_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    cdiv,
    check_device,
    check_tensor,
    dot_precision,
    dot_upcast,
    next_pow2,
    num_sms,
    pdl_options,
)
from ._launch import cached_launch

_LOG2E = 1.4426950408889634
# Running-max start: finite, so a row that sees no key in a split keeps exp2(m - m_new) = 1
# and p = exp2(-inf) = 0 instead of NaN.
_NEG_BIG = tl.constexpr(-1.0e30)

# ---------------------------------------------------------------------------------------------
# KV write
# ---------------------------------------------------------------------------------------------


@cached_launch
@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kv_ptr, kv_slots_ptr,
    kv_heads, head_dim, block_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_page, stride_kv, stride_tok, stride_head,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # k and v come from the kernels before: wait, then let the next launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    i = tl.program_id(0)
    slot = tl.load(kv_slots_ptr + i).to(tl.int64)
    if slot >= 0:  # negative slots (padding tokens) write nothing
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        live = (h < kv_heads)[:, None] & (d < head_dim)[None, :]
        dst = (kv_ptr + (slot // block_tokens) * stride_page + (slot % block_tokens) * stride_tok
               + h[:, None] * stride_head + d[None, :])
        k = tl.load(k_ptr + i.to(tl.int64) * stride_kt + h[:, None] * stride_kh + d[None, :],
                    mask=live)
        v = tl.load(v_ptr + i.to(tl.int64) * stride_vt + h[:, None] * stride_vh + d[None, :],
                    mask=live)
        tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=live)
        tl.store(dst + stride_kv, v.to(kv_ptr.dtype.element_ty), mask=live)


def _check_kv_pages(kv_pages: torch.Tensor) -> None:
    check_tensor("kv_pages", kv_pages, dtypes=FLOAT_DTYPES, ndim=5, inner_contiguous=True)
    check_device("kv_pages", kv_pages)
    if kv_pages.shape[1] != 2:
        raise ValueError(f"kv_pages dimension 1 must be 2 (K, V), got shape {list(kv_pages.shape)}")


def write_kv(
    kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_slots: torch.Tensor, *,
    pdl: bool | None = None,
) -> None:
    """kv_pages[s_i // bt, 0, s_i % bt] = k[i];  kv_pages[s_i // bt, 1, s_i % bt] = v[i]  (s_i >= 0)

    k, v: [T, kv_heads, head_dim] (token and head strides free, last dim contiguous), cast to the
    pool's dtype; kv_slots: int64 [T], ``page * block_tokens + offset``; a negative slot (a
    padding token) writes nothing. ``pdl`` (None: ``pdl_chain``): a programmatic dependent
    launch of the kernel before (its programs wait for it before reading).
    """
    _check_kv_pages(kv_pages)
    _, _, block_tokens, kv_heads, head_dim = kv_pages.shape
    dev = kv_pages.device
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=3, shape=(None, kv_heads, head_dim),
                     device=dev, inner_contiguous=True)
    num_tokens = k.shape[0]
    check_tensor("v", v, shape=(num_tokens,))
    check_tensor("kv_slots", kv_slots, dtypes=(torch.int64,), ndim=1, shape=(num_tokens,),
                 device=dev, contiguous=True)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_pages, kv_slots,
        kv_heads, head_dim, block_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2), kv_pages.stride(3),
        BLOCK_H=next_pow2(kv_heads), BLOCK_D=next_pow2(head_dim), num_warps=4,
        **pdl_options(pdl, kv_pages),
    )



# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


# Arguments that change from step to step are not specialised on (value 1, multiple of 16):
# each new combination would compile the kernel again in the middle of serving.
@cached_launch
@triton.jit(do_not_specialize=["keys_per_split", "num_splits", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, kv_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    block_tables_ptr, query_starts_ptr, context_lens_ptr,
    qk_scale, group, block_tokens, keys_per_split, num_splits, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_page, stride_kv, stride_tok, stride_head, stride_bt,
    BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # q and this step's keys come from the kernels before
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    q_start = tl.load(query_starts_ptr + seq)
    q_len = tl.load(query_starts_ptr + seq + 1) - q_start
    ctx = tl.load(context_lens_ptr + seq)
    first_q = q_block * BLOCK_Q
    if first_q < q_len:
        # Row r of the tile = query token first_q + r // GROUP_PAD, head kv_head*group + r % GP.
        r = tl.arange(0, BLOCK_Q * GROUP_PAD)
        q_idx = first_q + r // GROUP_PAD
        g = r % GROUP_PAD
        row_live = (q_idx < q_len) & (g < group)
        token = (q_start + q_idx).to(tl.int64)
        head = kv_head * group + g
        d = tl.arange(0, BLOCK_D)
        d_live = d < HEAD_DIM
        q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_live[:, None] & d_live[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        pos = ctx - q_len + q_idx  # absolute position of each row's query: sees keys <= pos
        # Keys this program reads: its split's range, cut at the tile's last causal position.
        lo = split * keys_per_split
        hi = tl.minimum(tl.minimum(lo + keys_per_split, ctx),
                        ctx - q_len + tl.minimum(first_q + BLOCK_Q, q_len))
        m_i = tl.full([BLOCK_Q * GROUP_PAD], _NEG_BIG, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], dtype=tl.float32)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        head_off = kv_head.to(tl.int64) * stride_head
        for nb in range(0, tl.cdiv(hi - lo, BLOCK_N)):
            n = lo + nb * BLOCK_N + tl.arange(0, BLOCK_N)
            n_live = n < hi
            page = tl.load(table + n // block_tokens, mask=n_live, other=0).to(tl.int64)
            tok = page * stride_page + (n % block_tokens) * stride_tok + head_off
            kv_mask = n_live[:, None] & d_live[None, :]
            k = tl.load(kv_ptr + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(kv_ptr + stride_kv + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:  # CPU interpreter only: its bf16 dot multiplies raw bit patterns
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
            visible = (n[None, :] <= pos[:, None]) & n_live[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        if SPLIT:
            # Unnormalised partial state of this split, merged by _combine_splits_kernel.
            part = (token * num_heads + head) * num_splits + split
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc,
                     mask=row_live[:, None] & d_live[None, :])
            tl.store(part_ml_ptr + part * 2, m_i, mask=row_live)
            tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_live)
        else:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_live[:, None] & d_live[None, :])


@cached_launch
@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, num_splits, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_live = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_live = d < HEAD_DIM
    part = (token * num_heads + head) * num_splits + s
    m = tl.load(part_ml_ptr + part * 2, mask=s_live, other=_NEG_BIG)
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=s_live, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :],
                  mask=s_live[:, None] & d_live[None, :], other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # splits that saw no key have l = 0, acc = 0
    denom = tl.sum(w * l_s, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d,
             out.to(out_ptr.dtype.element_ty), mask=d_live)


def _default_splits(q: torch.Tensor, num_seqs: int, kv_heads: int, max_context_len: int) -> int:
    """Enough programs to fill the GPU twice over, but no split shorter than 256 keys."""
    if q.device.type != "cuda":
        return 1
    programs = num_seqs * kv_heads
    want = cdiv(2 * num_sms(q.device), programs)
    return max(1, min(want, cdiv(max_context_len, 256)))


def _tiles(
    dtype: torch.dtype, block_d: int, group: int, max_query_len: int
) -> tuple[int, int, int]:
    """(BLOCK_Q, GROUP_PAD, BLOCK_N). A tile has BLOCK_Q * GROUP_PAD >= 16 rows (a dot's minimum).

    fp32 runs its dots exactly on CUDA cores, whose operands live in registers: its tiles are
    smaller so they do not spill.
    """
    wide = dtype == torch.float32 and block_d > 64
    if max_query_len == 1:
        # Decode: one query token, the group's heads padded to 16 rows.
        return 1, max(16, next_pow2(group)), 32 if wide else 64
    group_pad = next_pow2(group)
    rows = 16 if (max_query_len <= 16 or wide) else 64
    return max(1, rows // group_pad), group_pad, 32 if wide else 64


def paged_attention(
    q: torch.Tensor,
    kv_pages: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_context_len: int,
    num_splits: int | None = None,
    *,
    decode_seqs: int = 0,
    out: torch.Tensor | None = None,
    tiles: dict[str, int] | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """out[i] = softmax_j(scale * q[i] . K_b[j], j <= pos_i) @ V_b  (causal, GQA by head groups).

    q: [T, num_heads, head_dim] (token/head strides free, last dim contiguous); kv_pages: one
    layer's pool view ``[P, 2, block_tokens, kv_heads, head_dim]``; block_tables: int32 [B, W];
    query_starts: int32 [B + 1]; context_lens: int32 [B]; pos_i = context_len_b - q_len_b + (i -
    query_starts[b]). max_query_len / max_context_len: host ints bounding the batch (size the
    grid). num_splits: key splits per sequence for decode (None = choose from the GPU size; only
    used when max_query_len == 1). decode_seqs: how many leading sequences have one query token
    each (a mixed step puts its decode rows first, tokens 0 .. decode_seqs - 1); they get a
    launch of their own with the decode tiles, so prompts in the batch do not widen their
    tiles to BLOCK_Q query rows (on the H200, 256 decode rows + one 128-token prompt: 21.0 ms
    of attention per step in one launch, 14.3 ms for the decode rows alone). ``out``: where to
    write (else a new tensor). ``tiles`` overrides BLOCK_N / num_warps / num_stages (for
    benchmark sweeps). ``pdl`` (None: ``pdl_chain``): programmatic dependent launches, each
    waiting for the kernel before. Returns out: [T, num_heads, head_dim] contiguous, in q's
    dtype.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3, inner_contiguous=True)
    check_device("q", q)
    _check_kv_pages(kv_pages)
    _, _, block_tokens, kv_heads, head_dim = kv_pages.shape
    num_tokens, num_heads = q.shape[0], q.shape[1]
    dev = q.device
    check_tensor("kv_pages", kv_pages, dtypes=(q.dtype,), device=dev)
    check_tensor("q", q, shape=(None, None, head_dim))
    if num_heads % kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv_heads {kv_heads}")
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2, device=dev,
                 inner_contiguous=True)
    num_seqs = block_tables.shape[0]
    check_tensor("query_starts", query_starts, dtypes=(torch.int32,), ndim=1,
                 shape=(num_seqs + 1,), device=dev, contiguous=True)
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), ndim=1, shape=(num_seqs,),
                 device=dev, contiguous=True)
    if max_context_len > block_tables.shape[1] * block_tokens:
        raise ValueError(
            f"max_context_len {max_context_len} exceeds the block table's capacity "
            f"{block_tables.shape[1]} pages x {block_tokens} tokens"
        )
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=dev)
    else:
        check_tensor("out", out, dtypes=(q.dtype,), shape=(num_tokens, num_heads, head_dim),
                     device=dev, contiguous=True)
    if num_tokens == 0 or num_seqs == 0 or max_query_len < 1:
        return out
    if 0 < decode_seqs < num_seqs and max_query_len > 1:
        d = decode_seqs
        paged_attention(q[:d], kv_pages, block_tables[:d], query_starts[:d + 1], context_lens[:d],
                        scale, 1, max_context_len, num_splits, out=out[:d], tiles=tiles, pdl=pdl)
        return paged_attention(q, kv_pages, block_tables[d:], query_starts[d:], context_lens[d:],
                               scale, max_query_len, max_context_len, out=out, tiles=tiles,
                               pdl=pdl)
    group = num_heads // kv_heads
    block_d = next_pow2(head_dim)
    block_q, group_pad, block_n = _tiles(q.dtype, block_d, group, max_query_len)
    cfg = dict(BLOCK_N=block_n, num_warps=4, num_stages=2)
    cfg.update(tiles or {})
    block_n = cfg["BLOCK_N"]
    splits = 1
    if max_query_len == 1:
        splits = num_splits or _default_splits(q, num_seqs, kv_heads, max_context_len)
    keys_per_split = cdiv(cdiv(max(max_context_len, 1), splits), block_n) * block_n
    splits = cdiv(max(max_context_len, 1), keys_per_split)
    if splits > 1:
        part_acc = torch.empty(num_tokens, num_heads, splits, head_dim, dtype=torch.float32,
                               device=dev)
        part_ml = torch.empty(num_tokens, num_heads, splits, 2, dtype=torch.float32, device=dev)
    else:
        part_acc = part_ml = out  # never touched
    grid = (num_seqs, kv_heads, cdiv(max_query_len, block_q) * splits)
    _paged_attention_kernel[grid](
        q, kv_pages, out, part_acc, part_ml,
        block_tables, query_starts, context_lens,
        scale * _LOG2E, group, block_tokens, keys_per_split, splits, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2), kv_pages.stride(3),
        block_tables.stride(0),
        BLOCK_Q=block_q, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d,
        SPLIT=splits > 1, PRECISION=dot_precision(q.dtype), UPCAST=dot_upcast(q.dtype), **cfg,
        **pdl_options(pdl, q),
    )
    if splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_ml, splits, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=next_pow2(splits), num_warps=4,
            **pdl_options(pdl, q),
        )
    return out
