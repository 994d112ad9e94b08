"""Decode-path elementwise kernels: RMSNorm (optionally fused with the residual add),
SiLU-and-mul, and rotary embedding of q and k in one launch.

Each op is memory-bound: one program per token row (or row chunk) reads its inputs once,
computes in fp32 and writes once in the input's dtype, rounding where the torch reference
rounds. Torch references: ``norm_rope_reference``.

``pdl`` (None: ``pdl_chain``): launch as a programmatic dependent launch of the kernel before;
each program then waits for that kernel before reading anything and lets the next one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, cdiv, check_device, check_tensor, next_pow2, pdl_options
from ._launch import cached_launch

_MAX_ROW = 65536  # widest row a single program holds in registers


def _row_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------


@cached_launch
@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, n_cols, eps,
    stride_x, stride_r, stride_y,
    ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # x and the residual come from the kernels before: wait, then let the next launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=live, other=0.0)
    if ADD_RESIDUAL:
        # r = x + residual, rounded to the model dtype as the unfused add would, and kept.
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=live,
                                         other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=live)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=live)


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> int:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, inner_contiguous=True)
    check_device("x", x)
    n_cols = x.shape[1]
    check_tensor("weight", weight, dtypes=(x.dtype,), ndim=1, shape=(n_cols,), device=x.device,
                 contiguous=True)
    if n_cols > _MAX_ROW:
        raise ValueError(f"rows of {n_cols} elements exceed the kernel's limit of {_MAX_ROW}")
    return n_cols


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool | None = None
             ) -> torch.Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps))  per row; fp32 statistics, x's dtype out.

    x: [T, H] (row stride free); weight: [H] in x's dtype. Returns y: [T, H] contiguous.
    """
    n_cols = _check_norm(x, weight)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return y
    block = next_pow2(n_cols)
    _rms_norm_kernel[(x.shape[0],)](
        x, x, weight, y, n_cols, float(eps), x.stride(0), x.stride(0), y.stride(0),
        ADD_RESIDUAL=False, BLOCK=block, num_warps=_row_warps(block), **pdl_options(pdl, x),
    )
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
    pdl: bool | None = None,
) -> torch.Tensor:
    """residual <- x + residual (in place);  y = rms_norm(residual). Returns y.

    The residual add of a decoder layer fused with the next norm: one read of x and residual,
    one write of each output. x, residual: [T, H] in one dtype.
    """
    n_cols = _check_norm(x, weight)
    check_tensor("residual", residual, dtypes=(x.dtype,), ndim=2, shape=tuple(x.shape),
                 device=x.device, inner_contiguous=True)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return y
    block = next_pow2(n_cols)
    _rms_norm_kernel[(x.shape[0],)](
        x, residual, weight, y, n_cols, float(eps), x.stride(0), residual.stride(0), y.stride(0),
        ADD_RESIDUAL=True, BLOCK=block, num_warps=_row_warps(block), **pdl_options(pdl, x),
    )
    return y


# ---------------------------------------------------------------------------------------------
# SiLU and mul
# ---------------------------------------------------------------------------------------------


@cached_launch
@triton.jit
def _silu_and_mul_kernel(
    gu_ptr, out_ptr, n_cols, stride_gu, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < n_cols
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=live, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=live, other=0.0).to(tl.float32)
    # silu(gate) is rounded to the model dtype before the product, as the torch reference does.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=live)


def silu_and_mul(gate_up: torch.Tensor, *, pdl: bool | None = None) -> torch.Tensor:
    """out[t, n] = silu(gate_up[t, n]) * gate_up[t, I + n]  for n < I = gate_up.shape[1] / 2.

    gate_up: [T, 2I] (row stride free). Returns out: [T, I] contiguous, same dtype.
    """
    check_tensor("gate_up", gate_up, dtypes=FLOAT_DTYPES, ndim=2, inner_contiguous=True)
    check_device("gate_up", gate_up)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must have an even number of columns, got {gate_up.shape[1]}")
    n_cols = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], n_cols, dtype=gate_up.dtype, device=gate_up.device)
    if gate_up.shape[0] == 0 or n_cols == 0:
        return out
    block = min(1024, next_pow2(n_cols))
    _silu_and_mul_kernel[(gate_up.shape[0], cdiv(n_cols, block))](
        gate_up, out, n_cols, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4,
        **pdl_options(pdl, gate_up),
    )
    return out


# ---------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, token, num_heads, stride_xt, stride_xh, c1, c2, s1, s2, j, j_live, half,
    BLOCK_H: tl.constexpr,
):
    """out[h] = [x1 c1 - x2 s1, x2 c2 + x1 s2] for the token's heads (x = [x1 | x2])."""
    h = tl.arange(0, BLOCK_H)
    live = (h < num_heads)[:, None] & j_live[None, :]
    src = x_ptr + token * stride_xt + h[:, None] * stride_xh + j[None, :]
    x1 = tl.load(src, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=live, other=0.0).to(tl.float32)
    dst = out_ptr + (token * num_heads + h[:, None]) * (2 * half) + j[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(dst, (x1 * c1[None, :] - x2 * s1[None, :]).to(dtype), mask=live)
    tl.store(dst + half, (x2 * c2[None, :] + x1 * s2[None, :]).to(dtype), mask=live)


@cached_launch
@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    num_heads, kv_heads, half,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_J: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_J)
    j_live = j < half
    cos = cos_ptr + token * stride_ct + j
    sin = sin_ptr + token * stride_st + j
    c1 = tl.load(cos, mask=j_live, other=0.0).to(tl.float32)
    c2 = tl.load(cos + half, mask=j_live, other=0.0).to(tl.float32)
    s1 = tl.load(sin, mask=j_live, other=0.0).to(tl.float32)
    s2 = tl.load(sin + half, mask=j_live, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, token, num_heads, stride_qt, stride_qh, c1, c2, s1, s2,
                  j, j_live, half, BLOCK_HQ)
    _rotate_heads(k_ptr, k_out_ptr, token, kv_heads, stride_kt, stride_kh, c1, c2, s1, s2,
                  j, j_live, half, BLOCK_HK)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x' = x * cos + rotate_half(x) * sin  for x in (q, k); rotate_half([x1 | x2]) = [-x2 | x1].

    q: [T, heads, d], k: [T, kv_heads, d] (token/head strides free, e.g. slices of a fused qkv
    output); cos, sin: [T, d] in q's dtype (Hugging Face layout). Returns new contiguous
    (q', k'); one launch for both.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3, inner_contiguous=True)
    check_device("q", q)
    num_tokens, num_heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
    check_tensor("k", k, dtypes=(q.dtype,), ndim=3, shape=(num_tokens, None, head_dim),
                 device=q.device, inner_contiguous=True)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dtypes=(q.dtype,), ndim=2, shape=(num_tokens, head_dim),
                     device=q.device, inner_contiguous=True)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, cos, sin, q_out, k_out,
        num_heads, k.shape[1], half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        BLOCK_HQ=next_pow2(num_heads), BLOCK_HK=next_pow2(k.shape[1]),
        BLOCK_J=next_pow2(half), num_warps=4, **pdl_options(pdl, q),
    )
    return q_out, k_out

