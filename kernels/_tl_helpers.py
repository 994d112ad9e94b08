"""Small ``@triton.jit`` helpers shared by several kernels.

Kept few on purpose: under the CPU interpreter every call of a nested jit function re-patches
``triton.language`` (~0.5 ms), so helpers called once per loop iteration would dominate the
test suite's time. Per-module scalars are picked inline with ``tl.where`` for the same reason.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def misaligned_rows(offs_ptr, rank, VEC: tl.constexpr, BLOCK_R: tl.constexpr):
    """How many of the first ``rank`` row offsets at ``offs_ptr`` are not multiples of VEC."""
    count = tl.zeros([], dtype=tl.int32)
    for jb in range(0, tl.cdiv(rank, BLOCK_R)):
        rows = jb * BLOCK_R + tl.arange(0, BLOCK_R)
        offs = tl.load(offs_ptr + rows, mask=rows < rank, other=0)
        count += tl.sum((offs % VEC != 0).to(tl.int32), axis=0)
    return count


@triton.jit
def segment_tile(seg_lens_ptr, num_segs, tile, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Segments cut into tiles of BLOCK_M tokens (segment g into cdiv(seg_lens[g], BLOCK_M)
    tiles), numbered in segment order: (g, first token of the tile within g) for tile number
    ``tile``; g == num_segs for a tile past the last one. A scan over the segment lengths, so a
    grid needs only as many tiles as the batch has, not max_seg_len / BLOCK_M per segment."""
    seg = tl.zeros([], dtype=tl.int32)
    start = tl.zeros([], dtype=tl.int32)  # number of segment ``seg``'s first tile
    before = tl.zeros([], dtype=tl.int32)  # tiles of the segments of earlier chunks
    for g0 in range(0, num_segs, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        valid = g < num_segs
        tiles = (tl.load(seg_lens_ptr + g, mask=valid, other=0) + BLOCK_M - 1) // BLOCK_M
        ends = before + tl.cumsum(tiles, axis=0)  # tiles of segments 0..g
        passed = valid & (ends <= tile)
        seg += tl.sum(passed.to(tl.int32), axis=0)
        start = tl.maximum(start, tl.max(tl.where(passed, ends, 0), axis=0))
        before += tl.sum(tiles, axis=0)
    return seg, (tile - start) * BLOCK_M


@triton.jit
def add_scaled_row(y_ptr, token, stride_y, mi, start0, start1, start2, cols, col_live, delta,
                   scalings_ptr, slot):
    """y[token, start_mi + cols] += scalings[slot] * delta: fp32 sum, one rounding into y."""
    scale = tl.load(scalings_ptr + slot)
    out_start = tl.where(mi == 0, start0, tl.where(mi == 1, start1, start2))
    y_ptrs = y_ptr + token.to(tl.int64) * stride_y + out_start + cols
    y = tl.load(y_ptrs, mask=col_live, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta * scale).to(y_ptr.dtype.element_ty), mask=col_live)


@triton.jit
def token_module_columns(token_slots_ptr, ranks_ptr, stride_rank, mod0, mod1, mod2,
                         dim0, dim1, dim2, BLOCK_N: tl.constexpr):
    """For a per-token program on grid (token, module of the call, block of output columns):
    (token, mi, first_col, slot, module, out_dim, rank). rank is 0 for base rows (slot -1)."""
    token = tl.program_id(0)
    mi = tl.program_id(1)
    first_col = tl.program_id(2) * BLOCK_N
    slot = tl.load(token_slots_ptr + token)
    module = tl.where(mi == 0, mod0, tl.where(mi == 1, mod1, mod2))
    out_dim = tl.where(mi == 0, dim0, tl.where(mi == 1, dim1, dim2))
    rank = tl.load(ranks_ptr + slot * stride_rank + module, mask=slot >= 0, other=0)
    return token, mi, first_col, slot, module, out_dim, rank
