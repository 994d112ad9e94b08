"""Padded gather + bmm: the fair torch baseline for the LoRA kernels (S-LoRA's "bmm" ablation).

Everything stays on the device with no host sync and no Python loop over adapters: each batch
slot's A (or B^T) rows are gathered out of the pool once, padded to the batch's max rank, then
expanded per token (decode) or per segment (prefill, tokens padded to ``max_seg_len``) and
multiplied with ``torch.bmm``. Same semantics as ``lora_reference`` (tested against it); what
it costs over the kernels is the padding and the copies, which is what the benchmark measures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _gather_rows(
    pool: torch.Tensor, offsets: torch.Tensor, row_len: int
) -> torch.Tensor:
    """out[..., :] = pool[o : o + row_len] for every offset o: shape [*offsets.shape, row_len]."""
    # Row p of this view is pool[p : p + row_len] (overlapping rows, no copy).
    rows = pool.as_strided((pool.numel() - row_len + 1, row_len), (1, 1))
    return rows.index_select(0, offsets.reshape(-1)).view(*offsets.shape, row_len)


def _modules_of(t: torch.Tensor, modules: Sequence[int]) -> torch.Tensor:
    """t[:, modules] without a host-to-device copy of an index tensor (a hidden sync)."""
    return torch.stack([t[:, m] for m in modules], dim=1)


def _live_ranks(ranks: torch.Tensor, modules: Sequence[int], max_rank: int) -> torch.Tensor:
    """[S, len(modules), R] bool: row j of module m is inside slot s's rank."""
    return torch.arange(max_rank, device=ranks.device) < _modules_of(ranks, modules)[..., None]


def lora_shrink_bmm(
    x: torch.Tensor, pool: torch.Tensor, token_slots: torch.Tensor, ranks: torch.Tensor,
    a_offsets: torch.Tensor, modules: Sequence[int],
) -> torch.Tensor:
    """z[i, mi, j] = sum_k x[i, k] * A_{s_i, modules[mi]}[j, k]  (j < rank, else 0), per token."""
    mods = list(modules)
    num_tokens, in_dim = x.shape
    max_rank = a_offsets.shape[2]
    a = _gather_rows(pool, _modules_of(a_offsets, mods), in_dim)  # [S, M, R, in]
    slot = token_slots.long().clamp(min=0)
    a_tok = a[slot].view(num_tokens, len(mods) * max_rank, in_dim)
    z = torch.bmm(a_tok, x.unsqueeze(2)).view(num_tokens, len(mods), max_rank)
    live = _live_ranks(ranks, mods, max_rank)[slot] & (token_slots >= 0)[:, None, None]
    return z * live


def lora_expand_bmm(
    y: torch.Tensor, z: torch.Tensor, pool: torch.Tensor, token_slots: torch.Tensor,
    ranks: torch.Tensor, b_offsets: torch.Tensor, scalings: torch.Tensor,
    modules: Sequence[int], out_starts: Sequence[int], out_dims: Sequence[int],
) -> None:
    """y[i, out_starts[mi] + n] += scale[s_i] * sum_{j < rank} z[i, mi, j] * B^T_{s_i, m}[j, n]."""
    mods = list(modules)
    max_rank = b_offsets.shape[2]
    slot = token_slots.long().clamp(min=0)
    live = _live_ranks(ranks, mods, max_rank)[slot] & (token_slots >= 0)[:, None, None]
    zs = (z * live) * scalings[slot].to(z.dtype)[:, None, None]
    for mi, (m, start, dim) in enumerate(zip(mods, out_starts, out_dims)):
        bt = _gather_rows(pool, b_offsets[:, m], dim)[slot]  # [T, R, out]
        y[:, start:start + dim] += torch.bmm(zs[:, mi].unsqueeze(1), bt).squeeze(1)


def _segment_rows(
    seg_starts: torch.Tensor, seg_lens: torch.Tensor, max_seg_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token index of each padded segment position [G, L], and whether it is a real token."""
    pos = torch.arange(max_seg_len, device=seg_starts.device)
    valid = pos[None, :] < seg_lens[:, None]
    return torch.where(valid, seg_starts[:, None].long() + pos, 0), valid


def lora_shrink_bmm_segments(
    x: torch.Tensor, pool: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
    seg_slots: torch.Tensor, ranks: torch.Tensor, a_offsets: torch.Tensor,
    modules: Sequence[int], max_seg_len: int,
) -> torch.Tensor:
    """The prefill form: segments padded to ``max_seg_len`` tokens, one bmm over segments."""
    mods = list(modules)
    num_tokens, in_dim = x.shape
    max_rank = a_offsets.shape[2]
    idx, valid = _segment_rows(seg_starts, seg_lens, max_seg_len)
    slot = seg_slots.long()
    a = _gather_rows(pool, _modules_of(a_offsets, mods), in_dim)[slot]  # [G, M, R, in]
    xp = x[idx] * valid[..., None].to(x.dtype)  # [G, L, in]
    zp = torch.bmm(xp, a.view(len(slot), -1, in_dim).transpose(1, 2))  # [G, L, M*R]
    zp = zp.view(len(slot), max_seg_len, len(mods), max_rank)
    zp = zp * _live_ranks(ranks, mods, max_rank)[slot][:, None] * valid[..., None, None]
    z = torch.zeros(num_tokens, len(mods), max_rank, dtype=x.dtype, device=x.device)
    z.index_add_(0, idx.reshape(-1), zp.reshape(-1, len(mods), max_rank))
    return z


def lora_expand_bmm_segments(
    y: torch.Tensor, z: torch.Tensor, pool: torch.Tensor, seg_starts: torch.Tensor,
    seg_lens: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor,
    b_offsets: torch.Tensor, scalings: torch.Tensor, modules: Sequence[int],
    out_starts: Sequence[int], out_dims: Sequence[int], max_seg_len: int,
) -> None:
    """The prefill form of ``lora_expand_bmm``: one bmm per module over padded segments."""
    mods = list(modules)
    max_rank = b_offsets.shape[2]
    idx, valid = _segment_rows(seg_starts, seg_lens, max_seg_len)
    slot = seg_slots.long()
    live = _live_ranks(ranks, mods, max_rank)[slot]  # [G, M, R]
    zp = z[idx] * (valid[..., None, None] & live[:, None]).to(z.dtype)  # [G, L, M, R]
    zp = zp * scalings[slot].to(z.dtype)[:, None, None, None]
    for mi, (m, start, dim) in enumerate(zip(mods, out_starts, out_dims)):
        bt = _gather_rows(pool, b_offsets[:, m], dim)[slot]  # [G, R, out]
        delta = torch.bmm(zp[:, :, mi], bt)  # [G, L, out]; padded rows are exactly zero
        y[:, start:start + dim].index_add_(0, idx.reshape(-1), delta.reshape(-1, dim))
