"""Torch references for the heterogeneous-batch LoRA ops (the semantics the kernels must match).

The adapter weights live in one layer's flattened page-pool buffer ``pool`` (1-D); ``args``
(``lora_args.LoraArgs``) says where: row j of module m's A (length ``in_dim``) of slot s starts
at ``a_offsets[s, m, j]``, row j of B^T (length ``out_dim``) at ``b_offsets[s, m, j]``, and
``token_slots[i]`` is token i's slot, or -1 for the base model. ``modules`` lists which of the 7
module indices a call covers (q/k/v share one input, so one shrink serves all three).

These references are also the engine's CPU path, so they gather each used adapter once and run
one matmul per (adapter, module) rather than looping over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .lora_args import LoraArgs


def _memo(cache: dict | None, key: tuple, make):
    """``make()``, remembered in ``cache`` under ``key`` when a cache is given.

    The engine passes one dict per step: offsets are the same in every layer, so index tensors
    and host copies are built once per step instead of once per layer.
    """
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _rows(
    pool: torch.Tensor, offsets: torch.Tensor, length: int, cache: dict | None, key: tuple
) -> torch.Tensor:
    """Gather rows ``pool[offsets[j] : offsets[j] + length]`` into a ``[len(offsets), length]`` matrix."""
    # Slicing + stack beats one advanced-index gather by ~50x on CPU for rows this long.
    starts = _memo(cache, key, offsets.tolist)
    return torch.stack([pool[o : o + length] for o in starts])


def _slot_rows(token_slots: torch.Tensor, cache: dict | None) -> list[tuple[int, torch.Tensor]]:
    def make() -> list[tuple[int, torch.Tensor]]:
        slots = token_slots.to(torch.int64)
        used = torch.unique(slots[slots >= 0]).tolist()
        return [(s, (slots == s).nonzero().squeeze(1)) for s in used]

    return _memo(cache, ("slot_rows",), make)


def lora_shrink_ref(
    x: torch.Tensor,
    pool: torch.Tensor,
    args: LoraArgs,
    modules: Sequence[int],
    cache: dict | None = None,
) -> torch.Tensor:
    """z[i, mi, j] = sum_k x[i, k] * A_{s_i, modules[mi]}[j, k]  for j < rank, else 0.

    x: [T, in_dim]; returns z: [T, len(modules), max_rank] in x's dtype (fp32 accumulation).
    """
    num_tokens, in_dim = x.shape
    token_slots, a_offsets = args.rows_for(num_tokens), args.a_offsets
    z = torch.zeros(num_tokens, len(modules), args.max_rank, dtype=x.dtype, device=x.device)
    ranks_host = _memo(cache, ("ranks",), args.ranks.tolist)
    for slot, rows in _slot_rows(token_slots, cache):
        xs = x[rows].float()
        for mi, m in enumerate(modules):
            r = ranks_host[slot][m]
            if r == 0:
                continue
            a = _rows(pool, a_offsets[slot, m, :r], in_dim, cache, ("a", slot, m)).float()
            z[rows, mi, :r] = (xs @ a.T).to(x.dtype)
    return z


def lora_expand_ref(
    y: torch.Tensor,
    z: torch.Tensor,
    pool: torch.Tensor,
    args: LoraArgs,
    modules: Sequence[int],
    out_starts: Sequence[int],
    out_dims: Sequence[int],
    cache: dict | None = None,
) -> None:
    """y[i, out_starts[mi] + n] += scalings[s_i] * sum_{j<rank} z[i, mi, j] * B^T_{s_i, modules[mi]}[j, n].

    y: [T, total_out] updated in place; z: [T, len(modules), max_rank] from ``lora_shrink_ref``.
    """
    token_slots, b_offsets = args.rows_for(y.shape[0]), args.b_offsets
    ranks_host = _memo(cache, ("ranks",), args.ranks.tolist)
    scalings_host = _memo(cache, ("scalings",), args.scalings.tolist)
    for slot, rows in _slot_rows(token_slots, cache):
        for mi, m in enumerate(modules):
            r = ranks_host[slot][m]
            if r == 0:
                continue
            bt = _rows(pool, b_offsets[slot, m, :r], out_dims[mi], cache, ("b", slot, m)).float()
            delta = (z[rows, mi, :r].float() @ bt) * scalings_host[slot]
            cols = slice(out_starts[mi], out_starts[mi] + out_dims[mi])
            y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)
