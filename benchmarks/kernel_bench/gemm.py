"""Base-model GEMM rows: the decode step's ``F.linear`` shapes (fused q/k/v, o, fused gate/up,
down, LM head) at batch M, by the BLAS back ends torch offers, against their bound.

The engine leaves its base matmuls to torch, which calls cuBLAS. A decode step at batch 64
spends ~3.9 ms in them against 3.1 ms of weight bytes (docs/benchmarks.md, "Decode step vs
bandwidth bound"): this section asks whether another of torch's own back ends does better
before any GEMM is hand-written. Back ends: "cublas" (torch's default), "cublaslt"
(``torch.backends.cuda.preferred_blas_library``) and "tunableop" (PyTorch TunableOp: every
cuBLAS / cuBLASLt algorithm for the shape is timed once and the fastest kept). The bound of a
row is the larger of its bytes at the HBM bandwidth and its FLOPs at the measured matmul rate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .shapes import DEV, DT, H, I
from .timing import ROWS, check, time_us

MATMUL_FLOP_PER_S = 788e12  # fp16 dense, measured on the H200 (benchmarks/roofline.py)
HBM_BYTES_PER_S = 4.27e12
VOCAB = 32000

# (name, out features N, in features K): Llama-2-7B's linear layers as the engine fuses them.
SHAPES = (("qkv", 3 * H, H), ("o", H, H), ("gate_up", 2 * I, H), ("down", H, I),
          ("lm_head", VOCAB, H))


@contextmanager
def blas_backend(name: str) -> Iterator[None]:
    """Run the body with torch's BLAS back end ``name``; restore the default afterwards."""
    tunable = torch.cuda.tunable
    if name == "cublaslt":
        torch.backends.cuda.preferred_blas_library("cublaslt")
    elif name == "tunableop":
        tunable.enable(True)
        tunable.tuning_enable(True)
        tunable.set_max_tuning_duration(200)  # ms per shape
    elif name != "cublas":
        raise ValueError(f"unknown BLAS back end {name!r}")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")
        if name == "tunableop":
            tunable.tuning_enable(False)
            tunable.enable(False)


def gemm_bound_us(m: int, n: int, k: int) -> float:
    nbytes = 2 * (n * k + m * (n + k))
    return 1e6 * max(nbytes / HBM_BYTES_PER_S, 2 * m * n * k / MATMUL_FLOP_PER_S)


def bench_gemm(batches: list[int], backends: tuple[str, ...] = ("cublas", "cublaslt", "tunableop")
               ) -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device=DEV, dtype=DT, generator=gen) * k ** -0.5
        for m in batches:
            x = torch.randn(m, k, device=DEV, dtype=DT, generator=gen)
            want = F.linear(x, w)
            times: dict[str, float] = {}
            for backend in backends:
                with blas_backend(backend):
                    run: Callable[[], torch.Tensor] = lambda: F.linear(x, w)  # noqa: E731
                    check(f"{name} M={m} {backend}", run(), want, tol=1e-2)
                    times[backend] = time_us(run)
            bound = gemm_bound_us(m, n, k)
            ROWS.append(dict(table="base GEMMs (F.linear) by BLAS back end",
                             config=f"{name} M={m} N={n} K={k}", bound_us=round(bound, 2),
                             **{f"{b}_us": round(t, 2) for b, t in times.items()},
                             **{f"{b}_pct": round(100 * bound / t, 1) for b, t in times.items()}))
