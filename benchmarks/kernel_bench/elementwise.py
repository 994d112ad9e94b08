"""Elementwise rows: RMSNorm (with the residual add), rotary embedding, SiLU-and-mul, KV write,
each against its torch reference."""

from __future__ import annotations

import torch
import triton
from slora_kernels.attention_reference import write_kv_ref
from slora_kernels.norm_rope import add_rms_norm, rms_norm, rotary, silu_and_mul
from slora_kernels.norm_rope_reference import (
    add_rms_norm_ref,
    rms_norm_ref,
    rotary_ref,
    silu_and_mul_ref,
)
from slora_kernels.paged_attention import write_kv

from .shapes import (
    DEV,
    DT,
    HEAD_DIM,
    HEADS,
    H,
    I,
)
from .timing import check, record, time_us


def bench_elementwise(tokens: list[int]) -> None:
    for t in tokens:
        x = torch.randn(t, H, device=DEV, dtype=DT)
        w = torch.randn(H, device=DEV, dtype=DT)
        res = torch.randn(t, H, device=DEV, dtype=DT)
        gu = torch.randn(t, 2 * I, device=DEV, dtype=DT)
        qkv = torch.randn(t, 3 * H, device=DEV, dtype=DT)
        q = qkv[:, :H].view(t, HEADS, HEAD_DIM)
        k = qkv[:, H:2 * H].view(t, HEADS, HEAD_DIM)
        cos = torch.randn(t, HEAD_DIM, device=DEV, dtype=DT)
        sin = torch.randn(t, HEAD_DIM, device=DEV, dtype=DT)
        kv = torch.empty(triton.cdiv(t, 16) + 1, 2, 16, HEADS, HEAD_DIM, device=DEV, dtype=DT)
        slots = torch.randperm(kv.shape[0] * 16, device=DEV)[:t]
        check("rms_norm", rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
        check("silu_and_mul", silu_and_mul(gu), silu_and_mul_ref(gu))
        check("rotary", rotary(q, k, cos, sin)[0], rotary_ref(q, k, cos, sin)[0])
        rows = [
            ("rms_norm", lambda: rms_norm(x, w, 1e-5), lambda: rms_norm_ref(x, w, 1e-5),
             2 * x.numel() * 2),
            ("add_rms_norm", lambda: add_rms_norm(x, res, w, 1e-5),
             lambda: add_rms_norm_ref(x, res, w, 1e-5), 4 * x.numel() * 2),
            ("silu_and_mul", lambda: silu_and_mul(gu), lambda: silu_and_mul_ref(gu),
             1.5 * gu.numel() * 2),
            ("rotary", lambda: rotary(q, k, cos, sin), lambda: rotary_ref(q, k, cos, sin),
             (4 * q.numel() + 2 * cos.numel()) * 2),
            ("write_kv", lambda: write_kv(kv, k, k, slots), lambda: write_kv_ref(kv, k, k, slots),
             4 * k.numel() * 2),
        ]
        for name, tri, ref, nbytes in rows:
            record("elementwise", f"{name} T={t}", time_us(tri), time_us(ref), nbytes)


# ------------------------------------------------------------------ CUDA graphs
