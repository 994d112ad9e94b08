"""Split-K for the segment shrink (``lora_prefill``): how many ways to split K, where the
partial tiles park, and how the last program of a tile sums them.

A step with one short prompt beside hundreds of decode rows gives the shrink a handful of
programs, each looping over all of K (4096 for a 7B model) while most SMs idle (H200, a
128-token prompt beside 256 decode rows: 1.7 ms of a 27 ms step in shrinks). Grids of fewer than
``SPLIT_BELOW`` programs per SM split K into runs of ``K_BLOCKS_PER_SPLIT`` blocks. A launch's
grid counts tiles that exit at once (it is sized for the most tiles its tokens can make), so
small grids are the ones worth splitting. Each split parks its fp32 tile; the last of a tile's
splits to arrive sums them in split order, so the result does not depend on arrival order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, num_sms

SPLIT_BELOW = 4
K_BLOCKS_PER_SPLIT = 8


@triton.jit
def sum_of_splits(acc, partials_ptr, arrivals_ptr, num_splits,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Park this program's partial tile, count it in, and return (is_last, sum of the tile's
    splits: valid in the last to arrive, which also sets the count back to 0 for the next
    launch). Program (i, j, split) parks at tile i + j * num_programs(0)."""
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    cell = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
    parked = partials_ptr + tile.to(tl.int64) * num_splits * BLOCK_M * BLOCK_R + cell
    tl.store(parked + tl.program_id(2) * BLOCK_M * BLOCK_R, acc)
    # One thread counts the arrival: the barrier orders every thread's part of the tile before
    # it, and acq_rel makes all of it visible before the count (release) and every other
    # split's tile visible to the last to arrive (acquire; loaded past L1, .cg).
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel")
    is_last = arrived == num_splits - 1
    total = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    if is_last:
        for split in range(0, num_splits):
            total += tl.load(parked + split * BLOCK_M * BLOCK_R, cache_modifier=".cg")
        tl.atomic_xchg(arrivals_ptr + tile, 0)
    return is_last, total


def k_splits(programs: int, k_blocks: int, sms: int | None,
             forced: int | None) -> tuple[int, int]:
    """(splits, K blocks per split) for a grid of ``programs`` over ``k_blocks`` blocks of K on
    a GPU of ``sms`` SMs: ``forced`` splits if given (tests, sweeps), else none off CUDA
    (``sms`` None: the interpreter runs programs one after another) and none for grids that
    already fill the GPU. No split is left empty."""
    if forced is not None:
        splits = max(1, min(forced, k_blocks))
    elif sms is None or programs >= SPLIT_BELOW * sms:
        splits = 1
    else:
        splits = cdiv(k_blocks, K_BLOCKS_PER_SPLIT)
    per_split = cdiv(k_blocks, splits)
    return cdiv(k_blocks, per_split), per_split


class SplitKWorkspace:
    """Where split shrinks park their tiles and count arrivals: buffers of a fixed size per
    device, shared by the launches of one user whose launches run one after another on one
    stream (an engine's steps; a shrink is not a dependent launch, so it starts once the kernel
    before it has ended). Fixed from first use, so CUDA graphs that captured them stay valid;
    a launch that would need more room splits less. The counts are 0 between launches."""

    def __init__(self, elements: int = 1 << 22, counters: int = 4096) -> None:
        self.elements, self.counters = elements, counters
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._buffers:
            # (at least one element each: a launch that does not split still passes them)
            self._buffers[device] = (
                torch.empty(max(self.elements, 1), dtype=torch.float32, device=device),
                torch.zeros(max(self.counters, 1), dtype=torch.int32, device=device))
        return self._buffers[device]


def plan(programs: int, k_blocks: int, tile_elements: int, device: torch.device,
         forced: int | None, workspace: SplitKWorkspace | None
         ) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(splits, K blocks per split, partials, arrivals) for one launch: the workspace's buffers
    with as many splits as they hold, or without a workspace buffers of the launch's own (one-
    element stand-ins if it does not split: the kernel's argument types never change, which
    would compile another variant)."""
    sms = num_sms(device) if device.type == "cuda" else None
    splits, per_split = k_splits(programs, k_blocks, sms, forced)
    if workspace is not None and splits > 1:
        room = workspace.elements // (programs * tile_elements)
        if programs > workspace.counters or room < 2:
            splits, per_split = 1, k_blocks
        elif room < splits:
            splits, per_split = k_splits(programs, k_blocks, None, room)
    if workspace is not None:
        partials, arrivals = workspace.buffers(device)
    elif splits == 1:
        partials, arrivals = _stand_ins(device)
    else:
        partials = torch.empty(programs * splits * tile_elements, dtype=torch.float32,
                               device=device)
        arrivals = torch.zeros(programs, dtype=torch.int32, device=device)
    return splits, per_split, partials, arrivals


def _stand_ins(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(1, dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device))
