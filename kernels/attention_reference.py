"""Torch references for paged attention over the unified pool (the semantics the kernels match).

``kv_pages`` is one layer's pool buffer viewed as ``[num_pages, 2, block_tokens, kv_heads,
head_dim]`` (index 0 = K, 1 = V). Token t of sequence b is at page ``block_tables[b, t //
block_tokens]``, offset ``t % block_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def write_kv_ref(
    kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_slots: torch.Tensor
) -> None:
    """kv_pages[slot // bt, 0, slot % bt] = k[i];  kv_pages[slot // bt, 1, slot % bt] = v[i].
    A negative slot (a padding token) writes nothing: indexed as is, -1 would wrap to the last
    slot of the pool's last page, a page another request's KV or an adapter may hold."""
    block_tokens = kv_pages.shape[2]
    written = kv_slots >= 0
    slots, k, v = kv_slots[written], k[written], v[written]
    pages = torch.div(slots, block_tokens, rounding_mode="floor")
    offsets = slots % block_tokens
    kv_pages[pages, 0, offsets] = k.to(kv_pages.dtype)
    kv_pages[pages, 1, offsets] = v.to(kv_pages.dtype)


def paged_attention_ref(
    q: torch.Tensor,
    kv_pages: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: Sequence[int],
    context_lens: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """out[i] = softmax_j(scale * q[i] . K_b[j], j <= pos_i) @ V_b  (causal, GQA by head groups).

    q: [T, num_heads, head_dim]; the query tokens of sequence b are the last
    ``query_starts[b+1] - query_starts[b]`` of its ``context_lens[b]`` cached tokens.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_tokens, kv_heads = kv_pages.shape[2], kv_pages.shape[3]
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    for b in range(len(context_lens)):
        start, end, ctx = query_starts[b], query_starts[b + 1], context_lens[b]
        if end == start:
            continue
        pages = block_tables[b, : -(-ctx // block_tokens)].to(torch.int64)
        kv = kv_pages[pages]  # [n, 2, bt, kvh, hd]
        k = kv[:, 0].reshape(-1, kv_heads, head_dim)[:ctx].float()
        v = kv[:, 1].reshape(-1, kv_heads, head_dim)[:ctx].float()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [h, ctx, hd]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[start:end].float().transpose(0, 1)  # [h, n_q, hd]
        scores = (qb @ k.transpose(1, 2)) * scale  # [h, n_q, ctx]
        n_q = end - start
        pos = torch.arange(ctx - n_q, ctx, device=q.device)[:, None]
        scores.masked_fill_(torch.arange(ctx, device=q.device)[None, :] > pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = (probs @ v).transpose(0, 1).to(q.dtype)
    return out


def paged_decode_attention_batched(
    q: torch.Tensor, kv_pages: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """out[b] = softmax_j(scale * q[b] . K_b[j], j < context_lens[b]) @ V_b  (one query per sequence).

    The decode case of ``paged_attention_ref`` for all sequences at once: every sequence's pages
    are gathered and padded to the longest context, padding masked. The engine's CPU path uses
    it because a Python loop over sequences costs more than the attention itself there.
    """
    batch, num_heads, head_dim = q.shape
    kv_heads = kv_pages.shape[3]
    kv = kv_pages[block_tables.to(torch.int64)]  # [B, blocks, 2, bt, kvh, hd]
    k = kv[:, :, 0].reshape(batch, -1, kv_heads, head_dim).float()
    v = kv[:, :, 1].reshape(batch, -1, kv_heads, head_dim).float()
    # Query head h reads KV head h // group, as in the reference's repeat_interleave.
    qg = q.float().view(batch, kv_heads, num_heads // kv_heads, head_dim)
    scores = torch.einsum("bkgd,btkd->bkgt", qg, k) * scale
    padding = torch.arange(k.shape[1], device=q.device)[None, :] >= context_lens[:, None]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgt,btkd->bkgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)
