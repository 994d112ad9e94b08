"""Torch references for the heterogeneous-batch LoRA ops (the semantics the kernels must match).

The adapter weights live in one layer's flattened page-pool buffer ``pool`` (1-D). Row j of
module m's A (length ``in_dim``) of batch slot s starts at ``a_offsets[s, m, j]``; row j of
B^T (length ``out_dim``) at ``b_offsets[s, m, j]``. ``token_slots[i]`` is token i's slot, or -1
for the base model. ``modules`` lists which of the 7 module indices a call covers (q/k/v share
one input, so one shrink serves all three).

These references are also the engine's CPU path, so they gather each used adapter once and run
one matmul per (adapter, module) rather than looping over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _rows(pool: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
    """Gather rows ``pool[offsets[j] : offsets[j] + length]`` into a ``[len(offsets), length]`` matrix."""
    idx = offsets.to(torch.int64)[:, None] + torch.arange(length, device=pool.device)
    return pool[idx]


def _slot_rows(token_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    slots = token_slots.to(torch.int64)
    used = torch.unique(slots[slots >= 0]).tolist()
    return [(s, (slots == s).nonzero().squeeze(1)) for s in used]


def lora_shrink_ref(
    x: torch.Tensor,
    pool: torch.Tensor,
    token_slots: torch.Tensor,
    ranks: torch.Tensor,
    a_offsets: torch.Tensor,
    modules: Sequence[int],
) -> torch.Tensor:
    """z[i, mi, j] = sum_k x[i, k] * A_{s_i, modules[mi]}[j, k]  for j < rank, else 0.

    x: [T, in_dim]; returns z: [T, len(modules), max_rank] in x's dtype (fp32 accumulation).
    """
    num_tokens, in_dim = x.shape
    max_rank = a_offsets.shape[2]
    z = torch.zeros(num_tokens, len(modules), max_rank, dtype=x.dtype, device=x.device)
    ranks_host = ranks.tolist()
    for slot, rows in _slot_rows(token_slots):
        xs = x[rows].float()
        for mi, m in enumerate(modules):
            r = ranks_host[slot][m]
            if r == 0:
                continue
            a = _rows(pool, a_offsets[slot, m, :r], in_dim).float()
            z[rows, mi, :r] = (xs @ a.T).to(x.dtype)
    return z


def lora_expand_ref(
    y: torch.Tensor,
    z: torch.Tensor,
    pool: torch.Tensor,
    token_slots: torch.Tensor,
    ranks: torch.Tensor,
    b_offsets: torch.Tensor,
    scalings: torch.Tensor,
    modules: Sequence[int],
    out_starts: Sequence[int],
    out_dims: Sequence[int],
) -> None:
    """y[i, out_starts[mi] + n] += scalings[s_i] * sum_{j<rank} z[i, mi, j] * B^T_{s_i, modules[mi]}[j, n].

    y: [T, total_out] updated in place; z: [T, len(modules), max_rank] from ``lora_shrink_ref``.
    """
    ranks_host = ranks.tolist()
    scalings_host = scalings.tolist()
    for slot, rows in _slot_rows(token_slots):
        for mi, m in enumerate(modules):
            r = ranks_host[slot][m]
            if r == 0:
                continue
            bt = _rows(pool, b_offsets[slot, m, :r], out_dims[mi]).float()
            delta = (z[rows, mi, :r].float() @ bt) * scalings_host[slot]
            cols = slice(out_starts[mi], out_starts[mi] + out_dims[mi])
            y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)
