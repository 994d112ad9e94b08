"""The compute ops the model calls, behind one interface: torch references or Triton kernels.

``TorchOps`` is the reference and the CPU path; ``TritonOps`` (``ops_triton.py``) runs the
Triton-lang kernels of ``slora_kernels``. Both take the per-step metadata of ``batch.py``.
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

from .batch import AttentionBatch, LoraBatch


class TorchOps:
    """Reference ops in plain torch (gather + matmul); exact in fp32, used on CPU."""

    name = "torch"

    def lora_shrink(
        self, x: torch.Tensor, pool: torch.Tensor, lora: LoraBatch, modules: Sequence[int]
    ) -> torch.Tensor:
        """[T, in] -> [T, len(modules), max_rank]; rows of base-model tokens are zero."""
        return lora_shrink_ref(
            x, pool, lora.token_slots, lora.ranks, lora.a_offsets, modules, lora.scratch
        )

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
        """y[:, module columns] += scaling * z @ B^T, in place."""
        lora_expand_ref(
            y, z, pool, lora.token_slots, lora.ranks, lora.b_offsets, lora.scalings,
            modules, out_starts, out_dims, lora.scratch,
        )

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
        """residual <- x + residual (in place); returns rms_norm(residual)."""
        residual.add_(x)
        return self.rms_norm(residual, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, h, d], k: [T, kvh, d], cos/sin: [T, d] (HF layout: halves rotated)."""
        cos, sin = cos[:, None, :], sin[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class BmmLora:
    """LoRA as padded gather + ``torch.bmm`` (the S-LoRA paper's "bmm" ablation), wrapped
    around another ops object whose attention and norms it keeps."""

    global_slots = False  # it gathers every slot of the tables: dense batch slots only

    def __init__(self, inner: TorchOps) -> None:
        self.inner = inner
        self.name = f"{inner.name}+bmm"

    def __getattr__(self, attr: str):
        return getattr(self.inner, attr)

    def lora_shrink(self, x, pool, lora: LoraBatch, modules):
        from slora_kernels.lora_bmm import lora_shrink_bmm

        return lora_shrink_bmm(x, pool, lora.token_slots, lora.ranks, lora.a_offsets, modules)

    def lora_expand(self, y, z, pool, lora: LoraBatch, modules, out_starts, out_dims):
        from slora_kernels.lora_bmm import lora_expand_bmm

        lora_expand_bmm(y, z, pool, lora.token_slots, lora.ranks, lora.b_offsets, lora.scalings,
                        modules, out_starts, out_dims)


def make_ops(kernel_backend: str, lora_ops: str | None = None) -> TorchOps:
    if kernel_backend == "torch":
        ops: TorchOps = TorchOps()
    elif kernel_backend == "triton":
        from .ops_triton import TritonOps

        ops = TritonOps()
    else:
        raise ValueError(f"kernel_backend must be 'torch' or 'triton', got {kernel_backend!r}")
    return BmmLora(ops) if lora_ops == "bmm" else ops  # type: ignore[return-value]
