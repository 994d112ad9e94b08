"""Torch references for the decode-path elementwise ops (the semantics ``norm_rope.py`` matches).

The same arithmetic as ``slora_backend.ops.TorchOps``: fp32 statistics, results in the input's
dtype. ``add_rms_norm_ref`` is the residual-add + norm pair of a decoder layer fused in one op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps))  (fp32 statistics; normalised x rounded first)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + residual;  y = rms_norm(r).  Returns (y, r)."""
    r = x + residual
    return rms_norm_ref(r, weight, eps), r


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """out = silu(gate) * up  for gate_up = [gate | up] along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x' = x * cos + rotate_half(x) * sin  for x in (q, k); rotate_half(x) = [-x2, x1].

    q: [T, heads, d], k: [T, kv_heads, d], cos/sin: [T, d] (Hugging Face layout).
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
