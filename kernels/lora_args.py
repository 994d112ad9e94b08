"""``LoraArgs``: the launch arguments of one LoRA batch, and the launchers' per-call checks.

Every LoRA op (the decode and segment kernels, the torch reference, the gather + bmm baseline)
reads the same tables; they travel as one ``LoraArgs`` built once per batch. Its tables are
checked when it is built, so a step that launches 64-256 LoRA kernels with one ``LoraArgs``
checks them once; each launch checks only its per-layer tensors (x, y, z, the layer's pool
buffer), that they sit on the tables' device, and the per-call module slices.

The launchers cannot check that every offset lies inside ``pool`` without a device sync; the
model runner guarantees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._common import FLOAT_DTYPES, check_device, check_modules, check_tensor


@dataclass(frozen=True, eq=False)
class LoraArgs:
    """Which adapter slot each token (or segment of tokens) uses, and where that adapter's rows
    lie in one layer's flat pool buffer.

    Slot s, module m (0..6, ``slora_backend.batch.LORA_MODULES``): rank ``ranks[s, m]`` (0: m is
    not a target), scaling ``scalings[s]``, row j of A (length in_dim) at element
    ``a_offsets[s, m, j]`` and row j of B^T (length out_dim) at ``b_offsets[s, m, j]`` for
    ``j < ranks[s, m]``. R = ``a_offsets.shape[2]`` (the batch's max rank) is z's width.

    Rows: ``token_slots[i]`` is token i's slot (-1: base model), read by the decode (per-token)
    kernels, the reference and the bmm baseline. Segments: tokens ``seg_starts[g] ..
    seg_starts[g] + seg_lens[g] - 1`` use slot ``seg_slots[g]`` (>= 0), read by the segment
    kernels; ``max_seg_len`` (a host int that sizes their grid) is at least every length. Either
    part may be absent (None) when no op of the batch reads it; a mixed step's split has rows
    for its decode tokens and segments for its prompts.

    Dtypes and layouts (checked at construction, ``ValueError`` naming the field): ``ranks``
    int32 [S, M] contiguous; ``a_offsets`` / ``b_offsets`` int64 [S, M, R] with a contiguous last
    dimension (they may be cut from wider tables); ``scalings`` fp32 [S] contiguous; the rows and
    segment tables int32, 1-D, contiguous; every tensor on one device. Tensors are never resized
    in place, so what was checked stays true.
    """

    ranks: torch.Tensor
    a_offsets: torch.Tensor
    b_offsets: torch.Tensor
    scalings: torch.Tensor
    token_slots: torch.Tensor | None = None
    seg_starts: torch.Tensor | None = None
    seg_lens: torch.Tensor | None = None
    seg_slots: torch.Tensor | None = None
    max_seg_len: int = 0

    def __post_init__(self) -> None:
        device = self.ranks.device
        check_tensor("ranks", self.ranks, dtypes=(torch.int32,), ndim=2, contiguous=True)
        num_slots, num_kinds = self.ranks.shape
        for name in ("a_offsets", "b_offsets"):
            check_tensor(name, getattr(self, name), dtypes=(torch.int64,), ndim=3,
                         shape=(num_slots, num_kinds, None), device=device,
                         inner_contiguous=True)
        if self.b_offsets.shape != self.a_offsets.shape:
            raise ValueError(f"b_offsets has shape {list(self.b_offsets.shape)}, a_offsets "
                             f"{list(self.a_offsets.shape)}: they must match")
        check_tensor("scalings", self.scalings, dtypes=(torch.float32,), ndim=1,
                     shape=(num_slots,), device=device, contiguous=True)
        if self.token_slots is not None:
            check_tensor("token_slots", self.token_slots, dtypes=(torch.int32,), ndim=1,
                         device=device, contiguous=True)
        segment_tables = (self.seg_starts, self.seg_lens, self.seg_slots)
        if any(t is None for t in segment_tables) != all(t is None for t in segment_tables):
            raise ValueError("seg_starts, seg_lens and seg_slots must be given together")
        if self.seg_starts is not None:
            n = self.seg_starts.shape[0] if self.seg_starts.dim() else -1
            for name in ("seg_starts", "seg_lens", "seg_slots"):
                check_tensor(name, getattr(self, name), dtypes=(torch.int32,), ndim=1,
                             shape=(n,), device=device, contiguous=True)
            if n > 0 and self.max_seg_len < 1:
                raise ValueError(
                    f"max_seg_len must be >= 1 when there are segments, got {self.max_seg_len}")

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    @property
    def num_slots(self) -> int:
        return int(self.ranks.shape[0])

    @property
    def max_rank(self) -> int:
        """R: the width of z's last dimension."""
        return int(self.a_offsets.shape[2])

    @property
    def num_segments(self) -> int:
        return 0 if self.seg_starts is None else int(self.seg_starts.shape[0])

    def rows_for(self, num_tokens: int) -> torch.Tensor:
        """``token_slots``, checked to have one entry per token of the call."""
        if self.token_slots is None:
            raise ValueError("these LoraArgs have no token_slots: the per-token kernels, the "
                             "reference and the bmm baseline need them")
        if self.token_slots.shape[0] != num_tokens:
            raise ValueError(f"token_slots has {self.token_slots.shape[0]} entries, expected "
                             f"{num_tokens} (one per token)")
        return self.token_slots

    def require_segments(self) -> None:
        if self.seg_starts is None:
            raise ValueError("these LoraArgs have no segment tables (seg_starts, seg_lens, "
                             "seg_slots): the segment kernels need them")


@dataclass(frozen=True)
class ShrinkCall:
    """One shrink launch's per-call values, checked."""

    num_tokens: int
    in_dim: int
    max_rank: int  # width of z's last dimension (= a_offsets.shape[2])
    modules: tuple[int, ...]


@dataclass(frozen=True)
class ExpandCall:
    """One expand launch's per-call values, checked."""

    num_tokens: int
    max_rank: int
    modules: tuple[int, ...]
    out_starts: tuple[int, ...]
    out_dims: tuple[int, ...]


def _check_on_tables_device(name: str, t: torch.Tensor, args: LoraArgs) -> None:
    if t.device != args.device:
        raise ValueError(f"{name} is on {t.device}, the LoRA tables on {args.device}: they must "
                         "share one device")


def check_shrink(
    x: torch.Tensor, pool: torch.Tensor, args: LoraArgs, modules: Sequence[int],
) -> ShrinkCall:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, inner_contiguous=True)
    check_device("x", x)
    _check_on_tables_device("x", x, args)
    check_tensor("pool", pool, dtypes=(x.dtype,), ndim=1, device=x.device, contiguous=True)
    mods = check_modules(modules, args.ranks.shape[1])
    return ShrinkCall(x.shape[0], x.shape[1], args.max_rank, mods)


def check_expand(
    y: torch.Tensor, z: torch.Tensor, pool: torch.Tensor, args: LoraArgs,
    modules: Sequence[int], out_starts: Sequence[int], out_dims: Sequence[int],
) -> ExpandCall:
    check_tensor("y", y, dtypes=FLOAT_DTYPES, ndim=2, inner_contiguous=True)
    check_device("y", y)
    _check_on_tables_device("y", y, args)
    check_tensor("pool", pool, dtypes=(y.dtype,), ndim=1, device=y.device, contiguous=True)
    mods = check_modules(modules, args.ranks.shape[1])
    check_tensor("z", z, dtypes=(y.dtype,), ndim=3,
                 shape=(y.shape[0], len(mods), args.max_rank), device=y.device,
                 inner_contiguous=True)
    starts, dims = _check_out_slices(y, mods, out_starts, out_dims)
    return ExpandCall(y.shape[0], args.max_rank, mods, starts, dims)


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
