"""``BmmLora``: S-LoRA's "bmm" ablation (``lora_ops="bmm"``) as an ``Ops``.

LoRA runs as a padded gather + ``torch.bmm`` (``slora_kernels.lora_bmm``); every other op is
the wrapped ops object's, delegated one method at a time so that what comes from where is
visible here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from slora_kernels.lora_bmm import lora_expand_bmm, lora_shrink_bmm

from ..batch import AttentionBatch, LoraBatch
from .base import Ops


class BmmLora(Ops):
    """LoRA by gather + bmm around ``inner``, whose attention, KV writes and norms it keeps."""

    # The gather reads every slot of the tables, so they must hold only the step's adapters
    # (dense slots), not the device tables of every resident adapter.
    global_slots = False
    # The engine runs the ablation eagerly, as it has always been measured.
    graph_capturable = False

    def __init__(self, inner: Ops) -> None:
        self.inner = inner
        self.name = f"{inner.name}+bmm"

    def lora_shrink(
        self, x: torch.Tensor, pool: torch.Tensor, lora: LoraBatch, modules: Sequence[int]
    ) -> torch.Tensor:
        return lora_shrink_bmm(x, pool, lora.kernel_args, modules)

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
        lora_expand_bmm(y, z, pool, lora.kernel_args, modules, out_starts, out_dims)

    # ---- not LoRA: the wrapped ops' -----------------------------------------------------------

    def write_kv(
        self, kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionBatch
    ) -> None:
        self.inner.write_kv(kv_pages, k, v, attn)

    def attention(
        self, q: torch.Tensor, kv_pages: torch.Tensor, attn: AttentionBatch, scale: float
    ) -> torch.Tensor:
        return self.inner.attention(q, kv_pages, attn, scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.inner.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        return self.inner.add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.inner.silu_and_mul(gate_up)

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.rotary(q, k, cos, sin)
