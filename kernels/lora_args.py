"""Argument checks shared by the decode (BGMV) and prefill (SGMV) LoRA launchers.

The adapter tables follow ``slora_backend.batch.LoraBatch``: ``ranks`` int32 ``[S, M]``,
``a_offsets`` / ``b_offsets`` int64 ``[S, M, R]`` (M = 7 module kinds, R = the batch's max rank),
``scalings`` fp32 ``[S]``; ``pool`` is one layer's flat buffer. The launchers cannot check that
every offset lies inside ``pool`` without a device sync; the model runner guarantees it.

The tables of a step are the same tensor objects in every layer's launches (a 7B model's step
makes 64-256 LoRA launches), so a table set that passed is remembered (``_TableChecks``) and not
re-checked; the per-layer tensors (x, y, z, the layer's pool buffer) are checked every time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._common import FLOAT_DTYPES, check_device, check_modules, check_tensor


@dataclass(frozen=True)
class ShrinkArgs:
    num_tokens: int
    in_dim: int
    max_rank: int  # width of z's last dimension (= a_offsets.shape[2])
    modules: tuple[int, ...]


@dataclass(frozen=True)
class ExpandArgs:
    num_tokens: int
    max_rank: int
    modules: tuple[int, ...]
    out_starts: tuple[int, ...]
    out_dims: tuple[int, ...]


class _TableChecks:
    """The last few table sets that passed their checks, keyed by the tensors' identities (and
    the device they were checked for). Entries hold the tensors, so an id in a key cannot be
    reused by another object while the entry lives. A tensor's dtype, shape, strides and device
    do not change after creation (short of resize_/set_, which nothing applies to these)."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._passed: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()

    def check(self, what: str, tensors: tuple[torch.Tensor, ...], device: torch.device,
              run: Callable[[], None]) -> None:
        key = (what, device, *(id(t) for t in tensors))
        if key in self._passed:
            self._passed.move_to_end(key)
            return
        run()  # raises, naming the problem, if a table is wrong: nothing is remembered then
        self._passed[key] = tensors
        if len(self._passed) > self.size:
            self._passed.popitem(last=False)


_TABLES = _TableChecks()


def _check_tables(
    pool: torch.Tensor, ranks: torch.Tensor, offsets: torch.Tensor, offsets_name: str,
    dtype: torch.dtype, device: torch.device,
) -> None:
    check_tensor("pool", pool, dtypes=(dtype,), ndim=1, device=device, contiguous=True)

    def run() -> None:
        check_tensor("ranks", ranks, dtypes=(torch.int32,), ndim=2, device=device,
                     contiguous=True)
        num_slots, num_kinds = ranks.shape
        # (may be cut to the batch's max rank from wider tables: rows keep their stride)
        check_tensor(offsets_name, offsets, dtypes=(torch.int64,), ndim=3,
                     shape=(num_slots, num_kinds, None), device=device, inner_contiguous=True)

    _TABLES.check(offsets_name, (ranks, offsets), device, run)


def _check_scalings(scalings: torch.Tensor, ranks: torch.Tensor, device: torch.device) -> None:
    _TABLES.check("scalings", (scalings, ranks), device, lambda: check_tensor(
        "scalings", scalings, dtypes=(torch.float32,), ndim=1, shape=(ranks.shape[0],),
        device=device, contiguous=True))


def check_shrink(
    x: torch.Tensor, pool: torch.Tensor, ranks: torch.Tensor, a_offsets: torch.Tensor,
    modules: Sequence[int],
) -> ShrinkArgs:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, inner_contiguous=True)
    check_device("x", x)
    _check_tables(pool, ranks, a_offsets, "a_offsets", x.dtype, x.device)
    mods = check_modules(modules, ranks.shape[1])
    return ShrinkArgs(x.shape[0], x.shape[1], a_offsets.shape[2], mods)


def check_expand(
    y: torch.Tensor, z: torch.Tensor, pool: torch.Tensor, ranks: torch.Tensor,
    b_offsets: torch.Tensor, scalings: torch.Tensor, modules: Sequence[int],
    out_starts: Sequence[int], out_dims: Sequence[int],
) -> ExpandArgs:
    check_tensor("y", y, dtypes=FLOAT_DTYPES, ndim=2, inner_contiguous=True)
    check_device("y", y)
    _check_tables(pool, ranks, b_offsets, "b_offsets", y.dtype, y.device)
    mods = check_modules(modules, ranks.shape[1])
    max_rank = b_offsets.shape[2]
    check_tensor("z", z, dtypes=(y.dtype,), ndim=3, shape=(y.shape[0], len(mods), max_rank),
                 device=y.device, inner_contiguous=True)
    _check_scalings(scalings, ranks, y.device)
    starts, dims = _check_out_slices(y, mods, out_starts, out_dims)
    return ExpandArgs(y.shape[0], max_rank, mods, starts, dims)


def check_fused(
    y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, ranks: torch.Tensor,
    a_offsets: torch.Tensor, b_offsets: torch.Tensor, scalings: torch.Tensor,
    modules: Sequence[int], out_starts: Sequence[int], out_dims: Sequence[int],
) -> tuple[ShrinkArgs, ExpandArgs]:
    """The shrink's checks on x and the expand's on y, for a launch that does both."""
    shrink = check_shrink(x, pool, ranks, a_offsets, modules)
    check_tensor("y", y, dtypes=(x.dtype,), ndim=2, shape=(x.shape[0], None), device=x.device,
                 inner_contiguous=True)
    _check_tables(pool, ranks, b_offsets, "b_offsets", x.dtype, x.device)
    if b_offsets.shape != a_offsets.shape:
        raise ValueError(f"b_offsets has shape {list(b_offsets.shape)}, a_offsets "
                         f"{list(a_offsets.shape)}: they must match")
    _check_scalings(scalings, ranks, x.device)
    starts, dims = _check_out_slices(y, shrink.modules, out_starts, out_dims)
    return shrink, ExpandArgs(y.shape[0], shrink.max_rank, shrink.modules, starts, dims)


def _check_out_slices(
    y: torch.Tensor, mods: tuple[int, ...], out_starts: Sequence[int], out_dims: Sequence[int],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    starts, dims = tuple(int(s) for s in out_starts), tuple(int(d) for d in out_dims)
    if len(starts) != len(mods) or len(dims) != len(mods):
        raise ValueError(
            f"out_starts {list(starts)} and out_dims {list(dims)} must have one entry per module "
            f"({len(mods)})"
        )
    for start, dim in zip(starts, dims):
        if start < 0 or dim < 1 or start + dim > y.shape[1]:
            raise ValueError(
                f"output slice [{start}, {start + dim}) does not fit in y's {y.shape[1]} columns"
            )
    return starts, dims


def check_segments(
    seg_starts: torch.Tensor, seg_lens: torch.Tensor, seg_slots: torch.Tensor,
    max_seg_len: int, device: torch.device,
) -> int:
    """Validate the segment tables (int32 ``[num_segments]`` each); return the segment count."""

    def run() -> None:
        check_tensor("seg_starts", seg_starts, dtypes=(torch.int32,), ndim=1, device=device,
                     contiguous=True)
        n = seg_starts.shape[0]
        for name, t in (("seg_lens", seg_lens), ("seg_slots", seg_slots)):
            check_tensor(name, t, dtypes=(torch.int32,), shape=(n,), ndim=1, device=device,
                         contiguous=True)

    _TABLES.check("segments", (seg_starts, seg_lens, seg_slots), device, run)
    n = seg_starts.shape[0]
    if n > 0 and max_seg_len < 1:
        raise ValueError(f"max_seg_len must be >= 1 when there are segments, got {max_seg_len}")
    return n


def check_token_slots(token_slots: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    _TABLES.check(f"token_slots[{num_tokens}]", (token_slots,), device, lambda: check_tensor(
        "token_slots", token_slots, dtypes=(torch.int32,), ndim=1, shape=(num_tokens,),
        device=device, contiguous=True))
