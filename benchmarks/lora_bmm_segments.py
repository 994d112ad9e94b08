"""The prefill (per-segment) form of the gather + bmm LoRA baseline (``slora_kernels.lora_bmm``):
the torch column of ``bench_kernels``' prefill tables. Segments are padded to ``max_seg_len``
tokens and multiplied with one ``torch.bmm`` over segments; same semantics as
``lora_reference`` (``tests/kernels/test_kernels_lora.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from slora_kernels.lora_args import LoraArgs
from slora_kernels.lora_bmm import gather_rows, live_ranks, modules_of


def _segment_rows(
    seg_starts: torch.Tensor, seg_lens: torch.Tensor, max_seg_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token index of each padded segment position [G, L], and whether it is a real token."""
    pos = torch.arange(max_seg_len, device=seg_starts.device)
    valid = pos[None, :] < seg_lens[:, None]
    return torch.where(valid, seg_starts[:, None].long() + pos, 0), valid


def lora_shrink_bmm_segments(
    x: torch.Tensor, pool: torch.Tensor, args: LoraArgs, modules: Sequence[int],
) -> torch.Tensor:
    """``lora_shrink_bmm`` over segments padded to ``max_seg_len`` tokens, one bmm over them."""
    args.require_segments()
    mods, max_seg_len, ranks = list(modules), args.max_seg_len, args.ranks
    num_tokens, in_dim = x.shape
    max_rank = args.max_rank
    idx, valid = _segment_rows(args.seg_starts, args.seg_lens, max_seg_len)
    slot = args.seg_slots.long()
    a = gather_rows(pool, modules_of(args.a_offsets, mods), in_dim)[slot]  # [G, M, R, in]
    xp = x[idx] * valid[..., None].to(x.dtype)  # [G, L, in]
    zp = torch.bmm(xp, a.view(len(slot), -1, in_dim).transpose(1, 2))  # [G, L, M*R]
    zp = zp.view(len(slot), max_seg_len, len(mods), max_rank)
    zp = zp * live_ranks(ranks, mods, max_rank)[slot][:, None] * valid[..., None, None]
    z = torch.zeros(num_tokens, len(mods), max_rank, dtype=x.dtype, device=x.device)
    z.index_add_(0, idx.reshape(-1), zp.reshape(-1, len(mods), max_rank))
    return z


def lora_expand_bmm_segments(
    y: torch.Tensor, z: torch.Tensor, pool: torch.Tensor, args: LoraArgs,
    modules: Sequence[int], out_starts: Sequence[int], out_dims: Sequence[int],
) -> None:
    """``lora_expand_bmm`` over padded segments: one bmm per module."""
    args.require_segments()
    mods, max_seg_len = list(modules), args.max_seg_len
    max_rank = args.max_rank
    idx, valid = _segment_rows(args.seg_starts, args.seg_lens, max_seg_len)
    slot = args.seg_slots.long()
    live = live_ranks(args.ranks, mods, max_rank)[slot]  # [G, M, R]
    zp = z[idx] * (valid[..., None, None] & live[:, None]).to(z.dtype)  # [G, L, M, R]
    zp = zp * args.scalings[slot].to(z.dtype)[:, None, None, None]
    for mi, (m, start, dim) in enumerate(zip(mods, out_starts, out_dims)):
        bt = gather_rows(pool, args.b_offsets[:, m], dim)[slot]  # [G, R, out]
        delta = torch.bmm(zp[:, :, mi], bt)  # [G, L, out]; padded rows are exactly zero
        y[:, start:start + dim].index_add_(0, idx.reshape(-1), delta.reshape(-1, dim))
