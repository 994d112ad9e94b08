"""Decode LoRA in one launch, for small ranks: y += scale * round(x A^T) B^T, token by token.

The two-launch path (``lora_decode``: shrink, then expand) pays two dependent launches and a
round trip of z through memory. At rank 8 the adapter bytes of a 64-token batch take ~6 us to
read on the H200, but the pair took 20 us (docs/benchmarks.md, issue 3's 50% target missed).
Here one program (token, module, block of BLOCK_N output columns) computes its token's z for
that module itself and applies it to its columns. The A rows are read by every column block of
a module - ``out_dim / BLOCK_N`` times, all but the first from L2 - so the redundant shrink
grows with rank: this is a small-rank kernel (the launcher does not enforce a limit; the
benchmark decides where it pays). z is rounded to the input dtype before it multiplies B^T, as
the two-launch path and PEFT round it, so both paths give the same result.

Reference: ``lora_reference.lora_shrink_ref`` followed by ``lora_expand_ref``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2, pad3, vector_elems
from ._tl_helpers import add_scaled_row, misaligned_rows, token_module_columns
from .lora_args import check_fused, check_token_slots
from .lora_decode import _rows_times_x


@triton.jit
def _fused_delta(
    x_row, pool_ptr, a_offs_ptr, b_offs_ptr, rank, in_dim, cols, col_live,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """[BLOCK_N] fp32: sum_{j < rank} round(A[j] . x) * B^T[j, cols]."""
    delta = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_R):
        rows = j0 + tl.arange(0, BLOCK_R)
        live = rows < rank
        a_offs = tl.load(a_offs_ptr + rows, mask=live, other=0)
        z = _rows_times_x(x_row, pool_ptr, a_offs, live, in_dim, BLOCK_R, BLOCK_K, VEC, ALIGNED)
        z = z.to(x_row.dtype.element_ty).to(tl.float32)
        b_offs = tl.load(b_offs_ptr + rows, mask=live, other=0)
        if ALIGNED:
            b_offs = (b_offs // VEC) * VEC
        bt = tl.load(pool_ptr + b_offs[:, None] + cols[None, :],
                     mask=live[:, None] & col_live[None, :], other=0.0)
        delta += tl.sum(bt.to(tl.float32) * z[:, None], axis=0)
    return delta


@triton.jit
def _bgmv_fused_kernel(
    x_ptr, y_ptr, pool_ptr, token_slots_ptr, ranks_ptr, a_offsets_ptr, b_offsets_ptr,
    scalings_ptr, in_dim,
    stride_x, stride_y, stride_rank, stride_off_s, stride_off_m,
    mod0, mod1, mod2, start0, start1, start2, dim0, dim1, dim2,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr,
):
    token, mi, first_col, slot, module, out_dim, rank = token_module_columns(
        token_slots_ptr, ranks_ptr, stride_rank, mod0, mod1, mod2, dim0, dim1, dim2, BLOCK_N)
    # Base rows, untargeted modules and column blocks past the module's width do nothing.
    if (rank > 0) & (first_col < out_dim):
        cols = first_col + tl.arange(0, BLOCK_N)
        col_live = cols < out_dim
        x_row = x_ptr + token.to(tl.int64) * stride_x
        a_offs_ptr = a_offsets_ptr + slot * stride_off_s + module * stride_off_m
        b_offs_ptr = b_offsets_ptr + slot * stride_off_s + module * stride_off_m
        misaligned = (misaligned_rows(a_offs_ptr, rank, VEC, BLOCK_R)
                      + misaligned_rows(b_offs_ptr, rank, VEC, BLOCK_R))
        if misaligned == 0:
            delta = _fused_delta(x_row, pool_ptr, a_offs_ptr, b_offs_ptr, rank, in_dim, cols,
                                 col_live, BLOCK_R, BLOCK_K, BLOCK_N, VEC, True)
        else:
            delta = _fused_delta(x_row, pool_ptr, a_offs_ptr, b_offs_ptr, rank, in_dim, cols,
                                 col_live, BLOCK_R, BLOCK_K, BLOCK_N, VEC, False)
        add_scaled_row(y_ptr, token, stride_y, mi, start0, start1, start2, cols, col_live, delta,
                       scalings_ptr, slot)


def lora_decode_fused(
    y: torch.Tensor,
    x: torch.Tensor,
    pool: torch.Tensor,
    token_slots: torch.Tensor,
    ranks: torch.Tensor,
    a_offsets: torch.Tensor,
    b_offsets: torch.Tensor,
    scalings: torch.Tensor,
    modules: Sequence[int],
    out_starts: Sequence[int],
    out_dims: Sequence[int],
    *,
    tiles: dict[str, int] | None = None,
) -> None:
    """y[i, out_starts[mi] + n] += scalings[s_i] * sum_{j < rank} z[i, mi, j] * B^T_{s_i, m}[j, n]
    with z[i, mi, j] = round(sum_k x[i, k] * A_{s_i, m}[j, k]) to x's dtype (m = modules[mi]).

    x: [T, in_dim], y: [T, total_out] (rows may be strided), same dtype; pool: one layer's flat
    buffer; token_slots: int32 [T] (-1 = base model); ranks: int32 [S, 7]; a_offsets /
    b_offsets: int64 [S, 7, R]; scalings: fp32 [S]. Rows with slot -1 and modules of rank 0
    leave y untouched; fp32 accumulation, one rounding into y. ``tiles`` overrides BLOCK_R /
    BLOCK_K / BLOCK_N / num_warps (for benchmark sweeps).
    """
    args, out = check_fused(y, x, pool, ranks, a_offsets, b_offsets, scalings, modules,
                            out_starts, out_dims)
    check_token_slots(token_slots, args.num_tokens, x.device)
    if args.num_tokens == 0 or args.max_rank == 0 or ranks.shape[0] == 0:
        return
    cfg = dict(BLOCK_R=min(8, next_pow2(args.max_rank)), BLOCK_K=min(512, next_pow2(args.in_dim)),
               BLOCK_N=min(1024, next_pow2(max(out.out_dims))), num_warps=4)
    cfg.update(tiles or {})
    grid = (args.num_tokens, len(args.modules), cdiv(max(out.out_dims), cfg["BLOCK_N"]))
    _bgmv_fused_kernel[grid](
        x, y, pool, token_slots, ranks, a_offsets, b_offsets, scalings, args.in_dim,
        x.stride(0), y.stride(0), ranks.stride(0), a_offsets.stride(0), a_offsets.stride(1),
        *pad3(args.modules), *pad3(out.out_starts), *pad3(out.out_dims),
        VEC=vector_elems(x.dtype), **cfg,
    )
