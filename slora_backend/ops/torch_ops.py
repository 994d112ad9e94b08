"""``TorchOps``: the ops of ``Ops`` in plain torch, by the references of ``slora_kernels``.

The reference semantics and the CPU path (exact in fp32). Two concessions to speed keep the
semantics: per-step memoisation of the adapter row offsets in ``LoraBatch.scratch`` (they are
the same in every layer) and decode attention for all sequences at once
(``paged_decode_attention_batched``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from slora_kernels.attention_reference import (
    paged_attention_ref,
    paged_decode_attention_batched,
    write_kv_ref,
)
from slora_kernels.lora_reference import lora_expand_ref, lora_shrink_ref

from ..batch import AttentionBatch, LoraBatch
from .base import Ops


class TorchOps(Ops):
    """Reference ops (gather + matmul). Their LoRA tables are the step's dense slots, and the
    references read host copies of them (``tolist``): no CUDA graphs."""

    name = "torch"
    global_slots = False
    graph_capturable = False

    def lora_shrink(
        self, x: torch.Tensor, pool: torch.Tensor, lora: LoraBatch, modules: Sequence[int]
    ) -> torch.Tensor:
        return lora_shrink_ref(x, pool, lora.kernel_args, modules, lora.scratch)

    def lora_expand(
        self,
        y: torch.Tensor,
        z: torch.Tensor,
        pool: torch.Tensor,
        lora: LoraBatch,
        modules: Sequence[int],
        out_starts: Sequence[int],
        out_dims: Sequence[int],
    ) -> None:
        lora_expand_ref(y, z, pool, lora.kernel_args, modules, out_starts, out_dims, lora.scratch)

    def write_kv(
        self, kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionBatch
    ) -> None:
        write_kv_ref(kv_pages, k, v, attn.kv_slots)

    def attention(
        self, q: torch.Tensor, kv_pages: torch.Tensor, attn: AttentionBatch, scale: float
    ) -> torch.Tensor:
        if attn.is_decode:
            return paged_decode_attention_batched(
                q, kv_pages, attn.block_tables, attn.context_lens, scale
            )
        return paged_attention_ref(
            q, kv_pages, attn.block_tables, attn.query_starts_host, attn.context_lens_host, scale
        )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        residual.add_(x)
        return self.rms_norm(residual, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos[:, None, :], sin[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
