"""RMSNorm (+ fused residual add), SiLU-and-mul and RoPE against ``norm_rope_reference``, and
the references against ``TorchOps`` so the two torch paths cannot drift apart."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, SHAPES, TOLERANCES
from slora_kernels.norm_rope import add_rms_norm, rms_norm, rotary, silu_and_mul
from slora_kernels.norm_rope_reference import (
    add_rms_norm_ref,
    rms_norm_ref,
    rotary_ref,
    silu_and_mul_ref,
)

from slora_backend.ops import TorchOps
from slora_backend.ops.triton_ops import TritonOps

HIDDEN = [64, 100, 576]  # SmolLM2's 576 is not a power of two; 100 is odd-sized


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_rms_norm(dtype_name: str, hidden: int, device) -> None:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(hidden)
    x = _randn(gen, 5, hidden + 3, dtype=dtype, device=device)[:, :hidden]  # strided rows
    w = _randn(gen, hidden, dtype=dtype, device=device)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), **TOLERANCES[dtype])

    residual = _randn(gen, 5, hidden, dtype=dtype, device=device)
    y_ref, r_ref = add_rms_norm_ref(x, residual, w, 1e-6)
    y = add_rms_norm(x, residual, w, 1e-6)
    torch.testing.assert_close(residual, r_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(y, y_ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("inter", [64, 150, 1536])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_silu_and_mul(dtype_name: str, inter: int, device) -> None:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(inter)
    gate_up = _randn(gen, 4, 2 * inter + 2, dtype=dtype, device=device)[:, 1:2 * inter + 1]
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up),
                               **TOLERANCES[dtype])


@pytest.mark.parametrize("shape_name", ["llama2", "smollm2", "llama3"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_rotary(dtype_name: str, shape_name: str, device) -> None:
    """q and k are views into one fused qkv output, as the model passes them."""
    dtype = DTYPES[dtype_name]
    s = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(21)
    n, q_dim, kv_dim = 6, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    qkv = _randn(gen, n, q_dim + 2 * kv_dim, dtype=dtype, device=device)
    q = qkv[:, :q_dim].view(n, s.num_heads, s.head_dim)
    k = qkv[:, q_dim:q_dim + kv_dim].view(n, s.num_kv_heads, s.head_dim)
    angles = torch.rand(n, s.head_dim // 2, generator=gen) * 6.3
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype).to(device)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype).to(device)
    q_out, k_out = rotary(q, k, cos, sin)
    q_ref, k_ref = rotary_ref(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(k_out, k_ref, **TOLERANCES[dtype])


def test_references_match_torch_ops(device) -> None:
    """TorchOps (the engine's CPU path) and TritonOps compute the references' functions."""
    gen = torch.Generator().manual_seed(22)
    x = _randn(gen, 3, 64, dtype=torch.float32, device=device)
    w = _randn(gen, 64, dtype=torch.float32, device=device)
    q = _randn(gen, 3, 4, 16, dtype=torch.float32, device=device)
    k = _randn(gen, 3, 2, 16, dtype=torch.float32, device=device)
    cos = _randn(gen, 3, 16, dtype=torch.float32, device=device)
    sin = _randn(gen, 3, 16, dtype=torch.float32, device=device)
    tol = TOLERANCES[torch.float32]
    for ops in (TorchOps(), TritonOps()):
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), **tol)
        torch.testing.assert_close(ops.silu_and_mul(x), silu_and_mul_ref(x), **tol)
        for got, want in zip(ops.rotary(q, k, cos, sin), rotary_ref(q, k, cos, sin)):
            torch.testing.assert_close(got, want, **tol)


def test_elementwise_launchers_reject_bad_arguments(device) -> None:
    x = torch.randn(3, 64).half().to(device)
    with pytest.raises(ValueError, match="weight has dtype"):
        rms_norm(x, torch.ones(64).to(device), 1e-5)
    with pytest.raises(ValueError, match="weight has size"):
        rms_norm(x, torch.ones(32).half().to(device), 1e-5)
    with pytest.raises(ValueError, match="x must have stride 1"):
        rms_norm(x.t().contiguous().t(), torch.ones(64).half().to(device), 1e-5)
    with pytest.raises(ValueError, match="even number of columns"):
        silu_and_mul(x[:, :63])
    q = torch.randn(3, 4, 16).half().to(device)
    cos = torch.randn(3, 16).half().to(device)
    with pytest.raises(ValueError, match="cos has dtype"):
        rotary(q, q[:, :2], cos.float(), cos)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rotary(q[..., :15], q[:, :2, :15], cos[:, :15], cos[:, :15])
    with pytest.raises(ValueError, match="x has dtype"):
        rms_norm(x.long(), torch.ones(64).long().to(device), 1e-5)
