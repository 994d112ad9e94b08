"""Decode LoRA in one launch: y += scale * round(x A^T) B^T, one program per (token, module).

The two-launch path (``lora_decode``: shrink, then expand) pays two dependent launches and a
round trip of z through memory. At rank 8 the adapter bytes of a 64-token batch take ~6.8 us to
read on the H200, but the pair took 20 us (docs/benchmarks.md, issue 3's 50% target missed).
Here one program owns a token and a module: it reads the adapter's A rows once, writes its z
(rounded to the input dtype, as the pair and PEFT round it) to a scratch row, then streams the
B^T rows block of columns by block, adding each block's delta into y with one rounding. Each
program moves tens of kilobytes in a few wide loads, so a batch of 64 x 3 programs keeps HBM
busy with far fewer, longer programs than the pair. (The first version, one program per column
block recomputing z, measured 29.5 us at batch 64 rank 8: the repeated shrink cost more than
the launch it saved.)

Reference: ``lora_reference.lora_shrink_ref`` followed by ``lora_expand_ref``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import next_pow2, pad3, vector_elems
from ._launch import cached_launch
from ._tl_helpers import add_scaled_row, misaligned_rows, token_module_columns
from .lora_args import check_fused, check_token_slots
from .lora_decode import _rows_times_x, _z_times_rows

# Elements of one tile (rank rows x columns): 8 warps hold a 16k-element fp32 tile in ~64
# registers a thread, so a rank-8 row of A (4096) takes two wide loads.
_TILE_ELEMS = 16384


@triton.jit
def _fused_row(
    x_row, y_ptr, z_row, pool_ptr, a_offs_ptr, b_offs_ptr, scalings_ptr,
    token, mi, slot, rank, in_dim, out_dim, stride_y, start0, start1, start2,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # 1. z[:rank] = round(A x), block of rank rows by block, into this program's scratch row.
    for j0 in range(0, rank, BLOCK_R):
        rows = j0 + tl.arange(0, BLOCK_R)
        live = rows < rank
        offs = tl.load(a_offs_ptr + rows, mask=live, other=0)
        z = _rows_times_x(x_row, pool_ptr, offs, live, in_dim, BLOCK_R, BLOCK_K, VEC, ALIGNED)
        tl.store(z_row + rows, z.to(z_row.dtype.element_ty), mask=live)
    tl.debug_barrier()  # the z each thread reads below was written by other threads
    # 2. y[cols] += scale * z B^T[:, cols], block of columns by block, one rounding into y.
    for nb in range(0, tl.cdiv(out_dim, BLOCK_N)):
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_live = cols < out_dim
        delta = _z_times_rows(z_row, b_offs_ptr, pool_ptr, rank, cols, col_live,
                              BLOCK_R, BLOCK_N, VEC, ALIGNED, False)
        add_scaled_row(y_ptr, token, stride_y, mi, start0, start1, start2, cols, col_live, delta,
                       scalings_ptr, slot)


@cached_launch
@triton.jit
def _bgmv_fused_kernel(
    x_ptr, y_ptr, z_ptr, pool_ptr, token_slots_ptr, ranks_ptr, a_offsets_ptr, b_offsets_ptr,
    scalings_ptr, in_dim,
    stride_x, stride_y, stride_zt, stride_zm, stride_rank, stride_off_s, stride_off_m,
    mod0, mod1, mod2, start0, start1, start2, dim0, dim1, dim2,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr,
):
    # A 2-D grid (token, module): the prologue's column block is always 0 here.
    token, mi, _, slot, module, out_dim, rank = token_module_columns(
        token_slots_ptr, ranks_ptr, stride_rank, mod0, mod1, mod2, dim0, dim1, dim2, BLOCK_N)
    # Base rows and untargeted modules do nothing.
    if rank > 0:
        x_row = x_ptr + token.to(tl.int64) * stride_x
        z_row = z_ptr + token.to(tl.int64) * stride_zt + mi * stride_zm
        a_offs_ptr = a_offsets_ptr + slot * stride_off_s + module * stride_off_m
        b_offs_ptr = b_offsets_ptr + slot * stride_off_s + module * stride_off_m
        misaligned = (misaligned_rows(a_offs_ptr, rank, VEC, BLOCK_R)
                      + misaligned_rows(b_offs_ptr, rank, VEC, BLOCK_R))
        if misaligned == 0:
            _fused_row(x_row, y_ptr, z_row, pool_ptr, a_offs_ptr, b_offs_ptr, scalings_ptr,
                       token, mi, slot, rank, in_dim, out_dim, stride_y, start0, start1, start2,
                       BLOCK_R, BLOCK_K, BLOCK_N, VEC, True)
        else:
            _fused_row(x_row, y_ptr, z_row, pool_ptr, a_offs_ptr, b_offs_ptr, scalings_ptr,
                       token, mi, slot, rank, in_dim, out_dim, stride_y, start0, start1, start2,
                       BLOCK_R, BLOCK_K, BLOCK_N, VEC, False)


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
    block_r = min(16, next_pow2(args.max_rank))
    cfg = dict(BLOCK_R=block_r, BLOCK_K=min(_TILE_ELEMS // block_r, next_pow2(args.in_dim)),
               BLOCK_N=min(_TILE_ELEMS // block_r, next_pow2(max(out.out_dims))), num_warps=8)
    cfg.update(tiles or {})
    z = torch.empty(args.num_tokens, len(args.modules), args.max_rank, dtype=x.dtype,
                    device=x.device)
    grid = (args.num_tokens, len(args.modules))
    _bgmv_fused_kernel[grid](
        x, y, z, pool, token_slots, ranks, a_offsets, b_offsets, scalings, args.in_dim,
        x.stride(0), y.stride(0), z.stride(0), z.stride(1), ranks.stride(0),
        a_offsets.stride(0), a_offsets.stride(1),
        *pad3(args.modules), *pad3(out.out_starts), *pad3(out.out_dims),
        VEC=vector_elems(x.dtype), **cfg,
    )
