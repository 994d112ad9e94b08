"""The compute ops behind one interface (``Ops``, ``base.py``): torch references
(``torch_ops.py``), Triton kernels (``triton_ops.py``), the "bmm" LoRA ablation (``bmm.py``).

``make_ops`` is the one place that turns ``EngineConfig``'s ``kernel_backend`` / ``lora_ops``
into an ops object; everything after it asks the object's capability flags. The Triton
implementation is imported only when asked for (it compiles nothing, but imports triton).
"""

from __future__ import annotations

import torch

from .base import Ops
from .bmm import BmmLora
from .torch_ops import TorchOps

KERNEL_BACKENDS = ("torch", "triton")
LORA_OPS = (None, "bmm")


def make_ops(kernel_backend: str, lora_ops: str | None = None,
             device: torch.device | None = None, split_k: bool = True,
             overlap_shrink: bool = False) -> Ops:
    """The ops of ``kernel_backend`` ("torch" or "triton"), with LoRA by gather + bmm when
    ``lora_ops == "bmm"``; buffers they keep on ``device`` are allocated now (before the
    engine sizes its pool from what memory is left). ``split_k``: the Triton segment shrink
    may split K (``slora_kernels.split_k``); ``overlap_shrink``: on CUDA the Triton LoRA shrink
    runs on a side stream beside its base matmul (``TritonOps.linear_with_lora``)."""
    if kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be 'torch' or 'triton', got {kernel_backend!r}")
    if lora_ops not in LORA_OPS:
        raise ValueError(f"lora_ops must be None or 'bmm', got {lora_ops!r}")
    if kernel_backend == "triton":
        from .triton_ops import TritonOps

        ops: Ops = TritonOps(device, split_k, overlap_shrink)
    else:
        ops = TorchOps()
    return BmmLora(ops) if lora_ops == "bmm" else ops


__all__ = ["BmmLora", "KERNEL_BACKENDS", "LORA_OPS", "Ops", "TorchOps", "make_ops"]
