"""Decode LoRA (BGMV / S-LoRA's MBGMV): one token per row, each row its own adapter and rank.

Shrink ``z = x A^T`` and expand ``y += scale * z B^T`` for a batch in which every token may use
a different adapter of a different rank (or none), reading A rows and B^T rows straight out of
the unified page pool through per-row element offsets (``slora_backend.layout``).

Work per program is one token x one module x one block of rank rows (shrink) or output columns
(expand). On Hopper the expand is a programmatic dependent launch (PDL) of the shrink: its
programs start while the shrink still runs, read their slot, rank, row offsets and first block
of B^T rows, and only then wait for z: at small ranks the pair's fixed latency, not its bytes,
is most of its time (docs/kernels.md).

A program loops only to its own adapter's rank, so a rank-8 row costs a rank-8 read however
large the batch's largest rank is; a base-model row (slot -1) loads its slot and stops.
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
    check_tensor,
    next_pow2,
    pad3,
    pdl_supported,
    vector_elems,
)
from ._launch import cached_launch
from ._tl_helpers import add_scaled_row, misaligned_rows, token_module_columns
from .lora_args import LoraArgs, check_expand, check_shrink

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rows_times_x(
    x_row, pool_ptr, offs, live, in_dim,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
):
    """[BLOCK_R] fp32: sum_k pool[offs[j] + k] * x[k]; rows that are not ``live`` give 0."""
    if ALIGNED:
        # An identity here (every offset is a multiple of VEC), but written so the compiler can
        # see the divisibility and emit 16-byte loads (tl.multiple_of on a loaded value is lost).
        offs = (offs // VEC) * VEC
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    # Iterating over block indices (not k0 = 0, BLOCK_K, ...) keeps k0's divisibility known to
    # the compiler, which it needs to emit 16-byte loads.
    for kb in range(0, tl.cdiv(in_dim, BLOCK_K)):
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_live = k < in_dim
        xv = tl.load(x_row + k, mask=k_live, other=0.0).to(tl.float32)
        a = tl.load(pool_ptr + offs[:, None] + k[None, :],
                    mask=live[:, None] & k_live[None, :], other=0.0)
        acc += a.to(tl.float32) * xv[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _shrink_token(
    x_ptr, pool_ptr, z_ptr, token, slot, mi, module, first_row, ranks_ptr, a_offsets_ptr,
    in_dim, max_rank, stride_x, stride_zt, stride_zm, stride_rank, stride_off_s, stride_off_m,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
):
    """z[token, mi, rows] for one token whose adapter is in ``slot`` (-1: none), rows
    ``first_row`` .. + BLOCK_R, with 16-byte loads when every row offset allows them. The decode
    shrink kernel's body."""
    rows = first_row + tl.arange(0, BLOCK_R)
    adapter = slot >= 0
    rank = tl.load(ranks_ptr + slot * stride_rank + module, mask=adapter, other=0)
    # The row offsets depend on the slot only: loaded beside the rank, not after it, so the
    # chain of dependent reads before the first A row is slot -> offsets, not slot -> rank ->
    # offsets (each a DRAM round trip when the tables are cold).
    offs_ptr = a_offsets_ptr + slot * stride_off_s + module * stride_off_m
    offs = tl.load(offs_ptr + rows, mask=rows < tl.where(adapter, max_rank, 0), other=0)
    out = tl.zeros([BLOCK_R], dtype=tl.float32)
    # Base rows, untargeted modules and row blocks past this adapter's rank read no weights and
    # only write their zeros (z is fully defined, as in the reference).
    if first_row < rank:
        live = rows < rank
        offs = tl.where(live, offs, 0)
        x_row = x_ptr + token.to(tl.int64) * stride_x
        if tl.sum((offs % VEC != 0).to(tl.int32), axis=0) == 0:
            out = _rows_times_x(x_row, pool_ptr, offs, live, in_dim, BLOCK_R, BLOCK_K, VEC, True)
        else:
            out = _rows_times_x(x_row, pool_ptr, offs, live, in_dim, BLOCK_R, BLOCK_K, VEC,
                                False)
    z_row = z_ptr + token.to(tl.int64) * stride_zt + mi * stride_zm
    tl.store(z_row + rows, out.to(z_ptr.dtype.element_ty), mask=rows < max_rank)


@cached_launch
@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, pool_ptr, z_ptr, token_slots_ptr, ranks_ptr, a_offsets_ptr,
    in_dim, max_rank,
    stride_x, stride_zt, stride_zm, stride_rank, stride_off_s, stride_off_m,
    mod0, mod1, mod2,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # the expand's programs may launch now; they wait for this grid before reading z
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0)
    mi = tl.program_id(1)
    slot = tl.load(token_slots_ptr + token)
    module = tl.where(mi == 0, mod0, tl.where(mi == 1, mod1, mod2))
    _shrink_token(x_ptr, pool_ptr, z_ptr, token, slot, mi, module, tl.program_id(2) * BLOCK_R,
                  ranks_ptr, a_offsets_ptr, in_dim, max_rank, stride_x, stride_zt, stride_zm,
                  stride_rank, stride_off_s, stride_off_m, BLOCK_R, BLOCK_K, VEC)


@triton.jit
def _b_rows(offs_ptr, pool_ptr, rows, live, cols, col_live, VEC: tl.constexpr,
            ALIGNED: tl.constexpr):
    """[len(rows), len(cols)]: the B^T rows ``rows`` (offsets at ``offs_ptr``) over the columns
    ``cols``; dead rows and columns give 0. ALIGNED: every offset is a multiple of VEC, written
    so the compiler sees it (16-byte loads)."""
    offs = tl.load(offs_ptr + rows, mask=live, other=0)
    if ALIGNED:
        offs = (offs // VEC) * VEC
    return tl.load(pool_ptr + offs[:, None] + cols[None, :],
                   mask=live[:, None] & col_live[None, :], other=0.0)


@triton.jit
def _z_times_rows(
    z_row, offs_ptr, pool_ptr, rank, cols, col_live,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
    WAIT_FOR_Z: tl.constexpr,
):
    """[BLOCK_N] fp32: sum_{j < rank} z[j] * pool[offs[j] + n] over the columns ``cols``.

    The first block of rows is loaded before z: with WAIT_FOR_Z (a dependent launch after the
    kernel that writes z) the wait for that kernel comes in between, so those loads overlap it.
    """
    rows = tl.arange(0, BLOCK_R)
    live = rows < rank
    bt = _b_rows(offs_ptr, pool_ptr, rows, live, cols, col_live, VEC, ALIGNED)
    if WAIT_FOR_Z:
        tl.extra.cuda.gdc_wait()
    zv = tl.load(z_row + rows, mask=live, other=0.0).to(tl.float32)
    acc = bt.to(tl.float32) * zv[:, None]
    for j0 in range(BLOCK_R, rank, BLOCK_R):
        rows = j0 + tl.arange(0, BLOCK_R)
        live = rows < rank
        zv = tl.load(z_row + rows, mask=live, other=0.0).to(tl.float32)
        bt = _b_rows(offs_ptr, pool_ptr, rows, live, cols, col_live, VEC, ALIGNED)
        acc += bt.to(tl.float32) * zv[:, None]
    return tl.sum(acc, axis=0)


@triton.jit
def _expand_row(
    y_ptr, token, stride_y, z_row, offs_ptr, pool_ptr, rank, cols, col_live, mi,
    start0, start1, start2, scalings_ptr, slot,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr, WAIT_FOR_Z: tl.constexpr,
):
    """y[token, start_mi + cols] += scalings[slot] * z_row[:rank] @ B^T[:rank, cols] (B^T's
    rows at ``offs_ptr``), with 16-byte loads when every row offset allows them."""
    if misaligned_rows(offs_ptr, rank, VEC, BLOCK_R) == 0:
        delta = _z_times_rows(z_row, offs_ptr, pool_ptr, rank, cols, col_live,
                              BLOCK_R, BLOCK_N, VEC, True, WAIT_FOR_Z)
    else:
        delta = _z_times_rows(z_row, offs_ptr, pool_ptr, rank, cols, col_live,
                              BLOCK_R, BLOCK_N, VEC, False, WAIT_FOR_Z)
    add_scaled_row(y_ptr, token, stride_y, mi, start0, start1, start2, cols, col_live, delta,
                   scalings_ptr, slot)


@cached_launch
@triton.jit
def _bgmv_expand_kernel(
    y_ptr, z_ptr, pool_ptr, token_slots_ptr, ranks_ptr, b_offsets_ptr, scalings_ptr,
    stride_y, stride_zt, stride_zm, stride_rank, stride_off_s, stride_off_m,
    mod0, mod1, mod2, start0, start1, start2, dim0, dim1, dim2,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr, PDL: tl.constexpr,
):
    # With PDL, everything before _z_times_rows' wait reads only what the engine wrote before
    # the shrink (tables, weights); z, and y (read after the wait), may not be read earlier.
    if PDL:  # a kernel after this one (with SLORA_PDL_CHAIN) waits for it before reading
        tl.extra.cuda.gdc_launch_dependents()
    token, mi, first_col, slot, module, out_dim, rank = token_module_columns(
        token_slots_ptr, ranks_ptr, stride_rank, mod0, mod1, mod2, dim0, dim1, dim2, BLOCK_N)
    if (rank > 0) & (first_col < out_dim):
        cols = first_col + tl.arange(0, BLOCK_N)
        col_live = cols < out_dim
        z_row = z_ptr + token.to(tl.int64) * stride_zt + mi * stride_zm
        offs_ptr = b_offsets_ptr + slot * stride_off_s + module * stride_off_m
        _expand_row(y_ptr, token, stride_y, z_row, offs_ptr, pool_ptr, rank, cols, col_live, mi,
                    start0, start1, start2, scalings_ptr, slot, BLOCK_R, BLOCK_N, VEC, PDL)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


class BgmvShrink:
    """``lora_shrink_decode`` prepared once for a step and called once per layer (as
    ``lora_prefill.SgmvShrink``): ``__call__(x, pool)`` checks that the layer's tensors match
    the prepared ones and launches. z is this object's buffer (``out``, if given: a
    [T, len(modules), R] view to write into), overwritten by each call."""

    def __init__(
        self,
        x: torch.Tensor,
        pool: torch.Tensor,
        args: LoraArgs,
        modules: Sequence[int],
        *,
        out: torch.Tensor | None = None,
        tiles: dict[str, int] | None = None,
        pdl: bool | None = None,
    ) -> None:
        call = check_shrink(x, pool, args, modules)
        token_slots = args.rows_for(call.num_tokens)
        z_shape = (call.num_tokens, len(call.modules), call.max_rank)
        if out is None:
            out = torch.empty(z_shape, dtype=x.dtype, device=x.device)
        check_tensor("out", out, dtypes=(x.dtype,), shape=z_shape, device=x.device,
                     inner_contiguous=True)
        self.z = out
        self._x, self._pool = TensorLayout.of(x), TensorLayout.of(pool)
        self._grid = None
        if call.num_tokens == 0 or call.max_rank == 0 or args.num_slots == 0:
            out.zero_()  # (no adapter in this batch: no token uses LoRA)
            return
        # Two rank rows per program, long K tiles: a decode batch is small, so HBM needs many
        # programs with loads in flight more than wide ones (a rank-8 batch of 64 tokens gives
        # 768 programs instead of 192). In the H200 tile sweep (docs/benchmarks.md) 2 x 1024
        # was within 3% of the best tile at every batch (32/64/128) and rank set.
        cfg = dict(BLOCK_R=min(2, next_pow2(call.max_rank)),
                   BLOCK_K=min(1024, next_pow2(call.in_dim)), num_warps=4)
        cfg.update(tiles or {})
        self._grid = (call.num_tokens, len(call.modules), cdiv(call.max_rank, cfg["BLOCK_R"]))
        ranks, a_offsets = args.ranks, args.a_offsets
        self._args = (
            token_slots, ranks, a_offsets, call.in_dim, call.max_rank,
            x.stride(0), out.stride(0), out.stride(1), ranks.stride(0),
            a_offsets.stride(0), a_offsets.stride(1), *pad3(call.modules),
        )
        pdl = pdl_supported(x.device) if pdl is None else pdl
        self._kwargs = dict(VEC=vector_elems(x.dtype), PDL=pdl, **cfg)

    def __call__(self, x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        self._x.check("x", x)
        self._pool.check("pool", pool)
        if self._grid is not None:
            _bgmv_shrink_kernel[self._grid](x, pool, self.z, *self._args, **self._kwargs)
        return self.z


class BgmvExpand:
    """``lora_expand_decode`` prepared once for a step and called once per layer:
    ``__call__(y, z, pool)`` checks that the layer's tensors match the prepared ones and
    launches."""

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
        pdl: bool | None = None,
    ) -> None:
        call = check_expand(y, z, pool, args, modules, out_starts, out_dims)
        token_slots = args.rows_for(call.num_tokens)
        self._y, self._z, self._pool = TensorLayout.of(y), TensorLayout.of(z), TensorLayout.of(pool)
        self._grid = None
        if call.num_tokens == 0 or call.max_rank == 0 or args.num_slots == 0:
            return
        # 4 rank rows x 1024 columns: best or within 2% of it in the H200 sweep at batch 32-128.
        cfg = dict(BLOCK_R=min(4, next_pow2(call.max_rank)),
                   BLOCK_N=min(1024, next_pow2(max(call.out_dims))), num_warps=4)
        cfg.update(tiles or {})
        self._grid = (call.num_tokens, len(call.modules),
                      cdiv(max(call.out_dims), cfg["BLOCK_N"]))
        ranks, b_offsets = args.ranks, args.b_offsets
        self._args = (
            token_slots, ranks, b_offsets, args.scalings,
            y.stride(0), z.stride(0), z.stride(1), ranks.stride(0),
            b_offsets.stride(0), b_offsets.stride(1),
            *pad3(call.modules), *pad3(call.out_starts), *pad3(call.out_dims),
        )
        pdl = pdl_supported(y.device) if pdl is None else pdl
        self._kwargs = dict(VEC=vector_elems(y.dtype), PDL=pdl, launch_pdl=pdl, **cfg)

    def __call__(self, y: torch.Tensor, z: torch.Tensor, pool: torch.Tensor) -> None:
        self._y.check("y", y)
        self._z.check("z", z)
        self._pool.check("pool", pool)
        if self._grid is not None:
            _bgmv_expand_kernel[self._grid](y, z, pool, *self._args, **self._kwargs)


def lora_shrink_decode(
    x: torch.Tensor,
    pool: torch.Tensor,
    args: LoraArgs,
    modules: Sequence[int],
    *,
    tiles: dict[str, int] | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """z[i, mi, j] = sum_k x[i, k] * A_{s_i, modules[mi]}[j, k]  for j < rank(s_i, m), else 0.

    x: [T, in_dim] (rows may be strided); pool: one layer's flat buffer, x's dtype; ``args``:
    the batch's tables with ``token_slots`` [T] (s_i; -1 = base model). Returns z:
    [T, len(modules), R] in x's dtype, accumulated in fp32. One launch covers up to three
    modules that share x (q/k/v, gate/up). ``tiles`` overrides BLOCK_R / BLOCK_K / num_warps
    (for benchmark sweeps). ``pdl`` (default: on Hopper and newer) lets the next kernel,
    ``lora_expand_decode``, launch before this one ends. One call of a fresh ``BgmvShrink``.
    """
    return BgmvShrink(x, pool, args, modules, tiles=tiles, pdl=pdl)(x, pool)


def lora_expand_decode(
    y: torch.Tensor,
    z: torch.Tensor,
    pool: torch.Tensor,
    args: LoraArgs,
    modules: Sequence[int],
    out_starts: Sequence[int],
    out_dims: Sequence[int],
    *,
    tiles: dict[str, int] | None = None,
    pdl: bool | None = None,
) -> None:
    """y[i, out_starts[mi] + n] += scalings[s_i] * sum_{j < rank} z[i, mi, j] * B^T_{s_i, m}[j, n].

    y: [T, total_out] updated in place (rows may be strided); z: [T, len(modules), R] from
    ``lora_shrink_decode``. Rows with slot -1 and modules of rank 0 leave y untouched.
    Accumulates in fp32, rounds once into y. ``tiles`` overrides BLOCK_R / BLOCK_N /
    num_warps. ``pdl`` (default: on Hopper and newer) launches this kernel as a programmatic
    dependent launch of the kernel before it in the stream, which must be the shrink that wrote
    z or any kernel launched without PDL. One call of a fresh ``BgmvExpand``.
    """
    BgmvExpand(y, z, pool, args, modules, out_starts, out_dims, tiles=tiles, pdl=pdl)(y, z, pool)
