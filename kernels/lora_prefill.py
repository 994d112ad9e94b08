"""Prefill LoRA (SGMV / S-LoRA's MBGMM): runs of consecutive tokens that share one adapter.

Shrink ``z = x A^T`` and expand ``y += scale * z B^T`` tiled over *segments*: segment g covers
tokens ``seg_starts[g] .. seg_starts[g] + seg_lens[g] - 1``, all using adapter slot
``seg_slots[g]``. A program owns a tile of one segment's tokens and runs a matrix product
against that adapter's A (or B^T) rows, gathered from the page pool through their offsets.
Tiles are numbered across segments (``_tl_helpers.segment_tile``): a batch of one long prompt
and hundreds of one-token segments (a mixed step) launches about T / BLOCK_M + G tiles per
module block, not G x max_seg_len / BLOCK_M mostly empty ones.
Ranks differ per segment; a program's loop stops at its own segment's rank. Tokens outside
every segment (base model) are not visited: their z rows stay zero and their y rows untouched
(a mixed step's decode rows are the decode kernels' work, ``slora_backend.ops.triton_ops``).
Torch references: ``lora_reference.lora_shrink_ref`` / ``lora_expand_ref``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    TensorLayout,
    cdiv,
    dot_precision,
    dot_upcast,
    next_pow2,
    pad3,
    vector_elems,
)
from ._launch import cached_launch
from ._tl_helpers import misaligned_rows, segment_tile
from .lora_args import LoraArgs, check_expand, check_shrink
from .lora_decode import _b_rows
from .split_k import SplitKWorkspace, sum_of_splits
from .split_k import plan as plan_splits

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _x_times_rows_t(
    x_ptr, token, tok_live, stride_x, pool_ptr, offs, live, in_dim, kb_lo, kb_hi,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    VEC: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """[BLOCK_M, BLOCK_R] fp32: x[token, k] @ A^T[k] over the K blocks [kb_lo, kb_hi), with A's
    rows at ``offs`` (dead rows give 0)."""
    if ALIGNED:
        offs = (offs // VEC) * VEC
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    # Iterating over block indices (not k0 = 0, BLOCK_K, ...) keeps k0's divisibility known to
    # the compiler, which it needs to emit 16-byte loads.
    for kb in range(kb_lo, kb_hi):
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_live = k < in_dim
        xt = tl.load(x_ptr + token[:, None] * stride_x + k[None, :],
                     mask=tok_live[:, None] & k_live[None, :], other=0.0)
        at = tl.load(pool_ptr + offs[None, :] + k[:, None],
                     mask=k_live[:, None] & live[None, :], other=0.0)
        if UPCAST:  # CPU interpreter only: its bf16 dot multiplies raw bit patterns
            xt, at = xt.to(tl.float32), at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _segment_adapter(seg_lens_ptr, seg_slots_ptr, ranks_ptr, stride_rank, module, num_segs,
                     tile, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Segment tile ``tile``'s (segment, first token within it, segment length, slot, rank of
    ``module``); length 0 and rank 0 past the last tile."""
    seg, first_tok = segment_tile(seg_lens_ptr, num_segs, tile, BLOCK_M, BLOCK_G)
    seg_live = seg < num_segs
    seg_len = tl.load(seg_lens_ptr + seg, mask=seg_live, other=0)
    slot = tl.load(seg_slots_ptr + seg, mask=seg_live, other=-1)
    rank = tl.load(ranks_ptr + slot * stride_rank + module, mask=slot >= 0, other=0)
    return seg, first_tok, seg_len, slot, rank


# num_segs changes every step: specialising on it (== 1, multiple of 16) would compile new
# variants mid-serving (each new variant is a ~1 s compile inside a serving step); num_splits
# (1 or not) likewise. The same holds for the segment tables' alignment: a mixed step passes
# its prompts' segment tables from an offset (they follow the decode rows'), 16-byte aligned or
# not from step to step.
_SEGMENT_TABLES = ["seg_starts_ptr", "seg_lens_ptr", "seg_slots_ptr"]


@cached_launch
@triton.jit(do_not_specialize=["num_segs", "num_splits", "k_blocks_per_split"],
            do_not_specialize_on_alignment=_SEGMENT_TABLES)
def _sgmv_shrink_kernel(
    x_ptr, pool_ptr, z_ptr, partials_ptr, arrivals_ptr,
    seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, ranks_ptr, a_offsets_ptr,
    in_dim, max_rank, num_rank_blocks, num_segs, num_splits, k_blocks_per_split,
    stride_x, stride_zt, stride_zm, stride_rank, stride_off_s, stride_off_m,
    mod0, mod1, mod2,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # Module and rank block vary fastest: programs reading the same x tile run together, so
    # the 2nd and 3rd module's reads of it hit L2. Axis 2 splits K (``split_k``).
    mi = tl.program_id(0) // num_rank_blocks
    first_row = (tl.program_id(0) % num_rank_blocks) * BLOCK_R
    module = tl.where(mi == 0, mod0, tl.where(mi == 1, mod1, mod2))
    seg, first_tok, seg_len, slot, rank = _segment_adapter(
        seg_lens_ptr, seg_slots_ptr, ranks_ptr, stride_rank, module, num_segs,
        tl.program_id(1), BLOCK_M, BLOCK_G)
    # Tiles past the segment's end or the adapter's rank do nothing (z was zero-filled).
    if (first_tok < seg_len) & (first_row < rank):
        tok = first_tok + tl.arange(0, BLOCK_M)
        tok_live = tok < seg_len
        token = (tl.load(seg_starts_ptr + seg) + tok).to(tl.int64)
        rows = first_row + tl.arange(0, BLOCK_R)
        live = rows < rank
        offs = tl.load(a_offsets_ptr + slot * stride_off_s + module * stride_off_m + rows,
                       mask=live, other=0)
        kb_lo = tl.program_id(2) * k_blocks_per_split
        kb_hi = tl.minimum(kb_lo + k_blocks_per_split, tl.cdiv(in_dim, BLOCK_K))
        if tl.sum((offs % VEC != 0).to(tl.int32), axis=0) == 0:
            acc = _x_times_rows_t(x_ptr, token, tok_live, stride_x, pool_ptr, offs, live,
                                  in_dim, kb_lo, kb_hi, BLOCK_M, BLOCK_R, BLOCK_K, VEC, True,
                                  PRECISION, UPCAST)
        else:
            acc = _x_times_rows_t(x_ptr, token, tok_live, stride_x, pool_ptr, offs, live,
                                  in_dim, kb_lo, kb_hi, BLOCK_M, BLOCK_R, BLOCK_K, VEC, False,
                                  PRECISION, UPCAST)
        z_ptrs = z_ptr + token[:, None] * stride_zt + mi * stride_zm + rows[None, :]
        z_live = tok_live[:, None] & (rows < max_rank)[None, :]
        if num_splits == 1:
            tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=z_live)
        else:
            is_last, total = sum_of_splits(acc, partials_ptr, arrivals_ptr, num_splits,
                                           BLOCK_M, BLOCK_R)
            if is_last:
                tl.store(z_ptrs, total.to(z_ptr.dtype.element_ty), mask=z_live)


@triton.jit
def _z_times_rows_tile(
    z_ptr, token, tok_live, stride_zt, offs_ptr, pool_ptr, rank, cols, col_live,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    VEC: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] fp32: z[token, :rank] @ B^T[:rank, cols] (z_ptr at this module)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_R):
        rows = j0 + tl.arange(0, BLOCK_R)
        live = rows < rank
        zt = tl.load(z_ptr + token[:, None] * stride_zt + rows[None, :],
                     mask=tok_live[:, None] & live[None, :], other=0.0)
        bt = _b_rows(offs_ptr, pool_ptr, rows, live, cols, col_live, VEC, ALIGNED)
        if UPCAST:
            zt, bt = zt.to(tl.float32), bt.to(tl.float32)
        acc = tl.dot(zt, bt, acc, input_precision=PRECISION)
    return acc


@cached_launch
@triton.jit(do_not_specialize=["num_segs"], do_not_specialize_on_alignment=_SEGMENT_TABLES)
def _sgmv_expand_kernel(
    y_ptr, z_ptr, pool_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, ranks_ptr,
    b_offsets_ptr, scalings_ptr,
    num_col_blocks, num_segs,
    stride_y, stride_zt, stride_zm, stride_rank, stride_off_s, stride_off_m,
    mod0, mod1, mod2, start0, start1, start2, dim0, dim1, dim2,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # Module and column block vary fastest: programs sharing a z tile run together.
    mi = tl.program_id(0) // num_col_blocks
    first_col = (tl.program_id(0) % num_col_blocks) * BLOCK_N
    module = tl.where(mi == 0, mod0, tl.where(mi == 1, mod1, mod2))
    out_dim = tl.where(mi == 0, dim0, tl.where(mi == 1, dim1, dim2))
    cols = first_col + tl.arange(0, BLOCK_N)
    col_live = cols < out_dim
    seg, first_tok, seg_len, slot, rank = _segment_adapter(
        seg_lens_ptr, seg_slots_ptr, ranks_ptr, stride_rank, module, num_segs,
        tl.program_id(1), BLOCK_M, BLOCK_G)
    if (first_tok < seg_len) & (rank > 0) & (first_col < out_dim):
        tok = first_tok + tl.arange(0, BLOCK_M)
        tok_live = tok < seg_len
        token = (tl.load(seg_starts_ptr + seg) + tok).to(tl.int64)
        offs_ptr = b_offsets_ptr + slot * stride_off_s + module * stride_off_m
        z_mod = z_ptr + mi * stride_zm
        if misaligned_rows(offs_ptr, rank, VEC, BLOCK_R) == 0:
            delta = _z_times_rows_tile(z_mod, token, tok_live, stride_zt, offs_ptr, pool_ptr,
                                       rank, cols, col_live, BLOCK_M, BLOCK_R, BLOCK_N, VEC,
                                       True, PRECISION, UPCAST)
        else:
            delta = _z_times_rows_tile(z_mod, token, tok_live, stride_zt, offs_ptr, pool_ptr,
                                       rank, cols, col_live, BLOCK_M, BLOCK_R, BLOCK_N, VEC,
                                       False, PRECISION, UPCAST)
        scale = tl.load(scalings_ptr + slot)
        out_start = tl.where(mi == 0, start0, tl.where(mi == 1, start1, start2))
        y_ptrs = y_ptr + token[:, None] * stride_y + out_start + cols[None, :]
        live = tok_live[:, None] & col_live[None, :]
        y = tl.load(y_ptrs, mask=live, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta * scale).to(y_ptr.dtype.element_ty),
                 mask=live)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


_BLOCK_G = 128  # segment lengths scanned per step of segment_tile's loop


def _num_tiles(num_tokens: int, num_segs: int, block_m: int) -> int:
    """Enough tiles for any segments of ``num_tokens`` tokens in all: sum_g cdiv(len_g, M)
    <= T / M + G. Programs past the batch's real tile count exit at once."""
    return cdiv(num_tokens, block_m) + num_segs


def _tiles(dtype: torch.dtype, max_seg_len: int, max_rank: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_R). tl.dot needs >= 16 rows: short segments (decode tokens, short
    prompts) waste fewer lanes with a small tile, long prompts reuse each gathered weight tile
    over more tokens. fp32 dots run exactly on CUDA cores from registers, so smaller tiles."""
    cap = 32 if dtype == torch.float32 else 64
    return min(cap, max(16, next_pow2(max_seg_len))), min(cap, max(16, next_pow2(max_rank)))


class SgmvShrink:
    """``lora_shrink_prefill`` prepared once for a step and called once per layer.

    The constructor takes a layer's x and pool and the step's ``LoraArgs``, checks the call
    and derives the tiles, the grid and the kernel's scalar arguments; ``__call__(x, pool)``
    checks only that this layer's tensors match the prepared ones (shape, strides, dtype,
    device) and launches: a step makes 32-64 shrink calls with the same tables.

    The returned z is this object's buffer, zero-filled once: each call writes the same
    positions (the tables fix them), so positions no adapter writes stay zero, and each call
    overwrites what the last returned. Use it before the next call.

    Small grids split K (``split_k``); their partial tiles park in ``workspace`` when given (an
    engine's one buffer, shared by its launches), else in buffers of this object's own.
    """

    def __init__(
        self,
        x: torch.Tensor,
        pool: torch.Tensor,
        args: LoraArgs,
        modules: Sequence[int],
        *,
        tiles: dict[str, int] | None = None,
        workspace: SplitKWorkspace | None = None,
    ) -> None:
        call = check_shrink(x, pool, args, modules)
        args.require_segments()
        num_segs = args.num_segments
        self._x, self._pool = TensorLayout.of(x), TensorLayout.of(pool)
        self.z = torch.zeros(call.num_tokens, len(call.modules), call.max_rank, dtype=x.dtype,
                             device=x.device)
        self._grid = None
        self.splits = 1
        if num_segs == 0 or call.max_rank == 0 or call.num_tokens == 0:
            return
        block_m, block_r = _tiles(x.dtype, args.max_seg_len, call.max_rank)
        cfg = dict(BLOCK_M=block_m, BLOCK_R=block_r, num_warps=4, num_stages=3,
                   BLOCK_K=min(32 if x.dtype == torch.float32 else 64,
                               max(16, next_pow2(call.in_dim))))
        cfg.update(tiles or {})
        forced_splits = cfg.pop("split_k", None)
        rank_blocks = cdiv(call.max_rank, cfg["BLOCK_R"])
        grid = (len(call.modules) * rank_blocks,
                _num_tiles(call.num_tokens, num_segs, cfg["BLOCK_M"]))
        # Small grids split K (split_k.py), parking tiles in ``workspace`` if given.
        self.splits, per_split, partials, arrivals = plan_splits(
            grid[0] * grid[1], cdiv(call.in_dim, cfg["BLOCK_K"]),
            cfg["BLOCK_M"] * cfg["BLOCK_R"], x.device, forced_splits, workspace)
        self._grid = (*grid, self.splits)
        z, ranks, a_offsets = self.z, args.ranks, args.a_offsets
        self._args = (
            partials, arrivals,
            args.seg_starts, args.seg_lens, args.seg_slots, ranks, a_offsets,
            call.in_dim, call.max_rank, rank_blocks, num_segs, self.splits, per_split,
            x.stride(0), z.stride(0), z.stride(1), ranks.stride(0),
            a_offsets.stride(0), a_offsets.stride(1),
            *pad3(call.modules),
        )
        self._kwargs = dict(
            VEC=vector_elems(x.dtype), PRECISION=dot_precision(x.dtype),
            UPCAST=dot_upcast(x.dtype), BLOCK_G=_BLOCK_G, **cfg)

    def __call__(self, x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        self._x.check("x", x)
        self._pool.check("pool", pool)
        if self._grid is not None:
            _sgmv_shrink_kernel[self._grid](x, pool, self.z, *self._args, **self._kwargs)
        return self.z


def lora_shrink_prefill(
    x: torch.Tensor,
    pool: torch.Tensor,
    args: LoraArgs,
    modules: Sequence[int],
    *,
    tiles: dict[str, int] | None = None,
) -> torch.Tensor:
    """z[i, mi, j] = sum_k x[i, k] * A_{g(i), modules[mi]}[j, k]  for i in segment g, j < rank.

    x: [T, in_dim]; ``args``: the batch's tables with its segments (``max_seg_len``, a host
    int, sizes the grid). Returns z: [T, len(modules), R] in x's dtype; rows of tokens in no
    segment and columns j >= rank are zero. ``tiles`` overrides BLOCK_M / BLOCK_R / BLOCK_K /
    num_warps / num_stages and the number of K splits, ``split_k`` (for tests and benchmark
    sweeps). One call of a fresh ``SgmvShrink``.
    """
    return SgmvShrink(x, pool, args, modules, tiles=tiles)(x, pool)


class SgmvExpand:
    """``lora_expand_prefill`` prepared once for a step and called once per layer, as
    ``SgmvShrink``: ``__call__(y, z, pool)`` checks that the layer's tensors match the prepared
    ones and launches."""

    def __init__(
        self,
        y: torch.Tensor,
        z: torch.Tensor,
        pool: torch.Tensor,
        args: LoraArgs,
        modules: Sequence[int],
        out_starts: Sequence[int],
        out_dims: Sequence[int],
        *,
        tiles: dict[str, int] | None = None,
    ) -> None:
        call = check_expand(y, z, pool, args, modules, out_starts, out_dims)
        args.require_segments()
        num_segs = args.num_segments
        self._y, self._z, self._pool = TensorLayout.of(y), TensorLayout.of(z), TensorLayout.of(pool)
        self._grid = None
        if num_segs == 0 or call.max_rank == 0 or call.num_tokens == 0:
            return
        block_m, block_r = _tiles(y.dtype, args.max_seg_len, call.max_rank)
        cfg = dict(BLOCK_M=block_m, BLOCK_R=block_r, num_warps=4, num_stages=3,
                   BLOCK_N=min(64 if y.dtype == torch.float32 else 128,
                               max(16, next_pow2(max(call.out_dims)))))
        cfg.update(tiles or {})
        col_blocks = cdiv(max(call.out_dims), cfg["BLOCK_N"])
        self._grid = (len(call.modules) * col_blocks,
                      _num_tiles(call.num_tokens, num_segs, cfg["BLOCK_M"]))
        ranks, b_offsets = args.ranks, args.b_offsets
        self._args = (
            args.seg_starts, args.seg_lens, args.seg_slots, ranks, b_offsets, args.scalings,
            col_blocks, num_segs,
            y.stride(0), z.stride(0), z.stride(1), ranks.stride(0),
            b_offsets.stride(0), b_offsets.stride(1),
            *pad3(call.modules), *pad3(call.out_starts), *pad3(call.out_dims),
        )
        self._kwargs = dict(
            VEC=vector_elems(y.dtype), PRECISION=dot_precision(y.dtype),
            UPCAST=dot_upcast(y.dtype), BLOCK_G=_BLOCK_G, **cfg)

    def __call__(self, y: torch.Tensor, z: torch.Tensor, pool: torch.Tensor) -> None:
        self._y.check("y", y)
        self._z.check("z", z)
        self._pool.check("pool", pool)
        if self._grid is not None:
            _sgmv_expand_kernel[self._grid](y, z, pool, *self._args, **self._kwargs)


def lora_expand_prefill(
    y: torch.Tensor,
    z: torch.Tensor,
    pool: torch.Tensor,
    args: LoraArgs,
    modules: Sequence[int],
    out_starts: Sequence[int],
    out_dims: Sequence[int],
    *,
    tiles: dict[str, int] | None = None,
) -> None:
    """y[i, out_starts[mi] + n] += scalings[s_g] * sum_{j < rank} z[i, mi, j] * B^T_{s_g, m}[j, n].

    For every token i of segment g (slot s_g); other rows of y are untouched.
    y: [T, total_out] updated in place; z from ``lora_shrink_prefill``. fp32 accumulation, one
    rounding into y. ``tiles`` overrides BLOCK_M / BLOCK_R / BLOCK_N / num_warps / num_stages.
    One call of a fresh ``SgmvExpand``.
    """
    SgmvExpand(y, z, pool, args, modules, out_starts, out_dims, tiles=tiles)(y, z, pool)
