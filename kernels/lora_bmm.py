"""Padded gather + bmm: S-LoRA's "bmm" ablation (``lora_ops="bmm"``) and the torch baseline
of the LoRA kernels' benchmark.

Everything stays on the device with no host sync and no Python loop over adapters: each slot's
A (or B^T) rows are gathered out of the pool once, padded to the batch's max rank, expanded per
token and multiplied with ``torch.bmm``. Same semantics as ``lora_reference`` (tested against
it); what it costs over the kernels is the padding and the copies. The per-segment form, which
only the benchmark uses, is ``benchmarks/lora_bmm_segments.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .lora_args import LoraArgs


def gather_rows(
    pool: torch.Tensor, offsets: torch.Tensor, row_len: int
) -> torch.Tensor:
    """out[..., :] = pool[o : o + row_len] for every offset o: shape [*offsets.shape, row_len]."""
    # Row p of this view is pool[p : p + row_len] (overlapping rows, no copy).
    rows = pool.as_strided((pool.numel() - row_len + 1, row_len), (1, 1))
    return rows.index_select(0, offsets.reshape(-1)).view(*offsets.shape, row_len)


def modules_of(t: torch.Tensor, modules: Sequence[int]) -> torch.Tensor:
    """t[:, modules] without a host-to-device copy of an index tensor (a hidden sync)."""
    return torch.stack([t[:, m] for m in modules], dim=1)


def live_ranks(ranks: torch.Tensor, modules: Sequence[int], max_rank: int) -> torch.Tensor:
    """[S, len(modules), R] bool: row j of module m is inside slot s's rank."""
    return torch.arange(max_rank, device=ranks.device) < modules_of(ranks, modules)[..., None]


def lora_shrink_bmm(
    x: torch.Tensor, pool: torch.Tensor, args: LoraArgs, modules: Sequence[int],
) -> torch.Tensor:
    """z[i, mi, j] = sum_k x[i, k] * A_{s_i, modules[mi]}[j, k]  (j < rank, else 0), per token."""
    mods = list(modules)
    num_tokens, in_dim = x.shape
    token_slots, max_rank = args.rows_for(num_tokens), args.max_rank
    a = gather_rows(pool, modules_of(args.a_offsets, mods), in_dim)  # [S, M, R, in]
    slot = token_slots.long().clamp(min=0)
    a_tok = a[slot].view(num_tokens, len(mods) * max_rank, in_dim)
    z = torch.bmm(a_tok, x.unsqueeze(2)).view(num_tokens, len(mods), max_rank)
    live = live_ranks(args.ranks, mods, max_rank)[slot] & (token_slots >= 0)[:, None, None]
    return z * live


def lora_expand_bmm(
    y: torch.Tensor, z: torch.Tensor, pool: torch.Tensor, args: LoraArgs,
    modules: Sequence[int], out_starts: Sequence[int], out_dims: Sequence[int],
) -> None:
    """y[i, out_starts[mi] + n] += scale[s_i] * sum_{j < rank} z[i, mi, j] * B^T_{s_i, m}[j, n]."""
    mods = list(modules)
    token_slots, max_rank = args.rows_for(y.shape[0]), args.max_rank
    slot = token_slots.long().clamp(min=0)
    live = live_ranks(args.ranks, mods, max_rank)[slot] & (token_slots >= 0)[:, None, None]
    zs = (z * live) * args.scalings[slot].to(z.dtype)[:, None, None]
    for mi, (m, start, dim) in enumerate(zip(mods, out_starts, out_dims)):
        bt = gather_rows(pool, args.b_offsets[:, m], dim)[slot]  # [T, R, out]
        y[:, start:start + dim] += torch.bmm(zs[:, mi].unsqueeze(1), bt).squeeze(1)
