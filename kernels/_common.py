"""Shared launcher helpers: argument checks that raise ``ValueError`` naming the problem, and
small compile-time choices (vector width, dot precision) derived from dtypes.

Launchers check everything a kernel silently relies on (dtype, rank, shape, unit stride of the
innermost dimension, device) because a wrong stride or dtype in a Triton kernel does not fail:
it reads the wrong memory.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints (``triton.cdiv`` is a jit function: slow to call from Python)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    inner_contiguous: bool = False,
    contiguous: bool = False,
) -> torch.Tensor:
    """Validate one launcher argument; raise ``ValueError`` saying what is wrong and with what.

    ``shape`` entries that are ``None`` are not checked. ``inner_contiguous`` asks for stride 1
    in the last dimension (rows may be strided, e.g. a column slice of a fused projection).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of: {allowed}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    if shape is not None:
        for axis, want in enumerate(shape):
            if want is not None and t.shape[axis] != want:
                raise ValueError(
                    f"{name} has size {t.shape[axis]} in dimension {axis} (shape {list(t.shape)}),"
                    f" expected {want}"
                )
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same device as the input)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {list(t.stride())}")
    if inner_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have stride 1 in its last dimension, got strides {list(t.stride())}"
        )
    return t


@dataclass(frozen=True)
class TensorLayout:
    """A tensor's shape, strides, dtype and device: what a prepared launch was derived from
    and what each later call's tensor must match (only its data pointer may differ)."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorLayout:
        return cls(tuple(t.shape), t.stride(), t.dtype, t.device)

    def check(self, name: str, t: torch.Tensor) -> None:
        if (tuple(t.shape) != self.shape or t.stride() != self.strides or t.dtype != self.dtype
                or t.device != self.device):
            raise ValueError(
                f"{name} has shape {list(t.shape)}, strides {list(t.stride())}, {t.dtype} on "
                f"{t.device}; this launch was prepared for shape {list(self.shape)}, strides "
                f"{list(self.strides)}, {self.dtype} on {self.device}")


def check_modules(modules: Sequence[int], num_modules: int, max_fused: int = 3) -> tuple[int, ...]:
    """The LoRA module indices of one fused call: 1..``max_fused`` distinct valid indices."""
    mods = tuple(int(m) for m in modules)
    if not 1 <= len(mods) <= max_fused:
        raise ValueError(f"modules must list 1 to {max_fused} module indices, got {list(mods)}")
    if len(set(mods)) != len(mods) or any(not 0 <= m < num_modules for m in mods):
        raise ValueError(
            f"modules must be distinct indices in [0, {num_modules}), got {list(mods)}"
        )
    return mods


def pad3(values: Sequence[int]) -> tuple[int, int, int]:
    """Pad a per-module list to the 3 scalar kernel arguments (unused entries are never read)."""
    vals = [int(v) for v in values] + [0, 0, 0]
    return vals[0], vals[1], vals[2]


def vector_elems(dtype: torch.dtype) -> int:
    """Elements per 16-byte load: the alignment a row offset needs for full-width loads."""
    return 16 // dtype.itemsize


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"), not tf32, so fp32 runs match the torch
    reference to ~1e-6; 16-bit inputs ignore the setting (bf16 upcast by ``dot_upcast`` is fp32
    and exact too)."""
    return "ieee" if dtype == torch.float32 or dot_upcast(dtype) else "tf32"


def check_device(name: str, t: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter."""
    if t.is_cuda:
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"{name} is on {t.device}: Triton kernels need CUDA tensors, or CPU tensors with "
        "TRITON_INTERPRET=1 set before triton is first imported"
    )


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (grids are sized to fill them)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` may use programmatic dependent launch: CUDA devices of
    compute capability 9.0 (Hopper) and newer, not under the interpreter, unless the
    environment sets ``SLORA_PDL=0``."""
    return (device.type == "cuda" and not interpreting()
            and os.environ.get("SLORA_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device)[0] >= 9)


@functools.cache
def pdl_chain(device: torch.device) -> bool:
    """Whether the step's elementwise kernels (norms, SiLU-and-mul, RoPE, the KV write,
    attention) are programmatic dependent launches of the kernel before them: where
    ``pdl_supported``, and only when the environment sets ``SLORA_PDL_CHAIN=1`` (off by default
    until measured on the H200: docs/kernels.md)."""
    return pdl_supported(device) and os.environ.get("SLORA_PDL_CHAIN", "0") == "1"


def pdl_options(pdl: bool | None, t: torch.Tensor) -> dict[str, bool]:
    """A chain kernel's ``PDL`` constexpr and ``launch_pdl`` option: ``pdl``, or (None)
    ``pdl_chain`` of t's device."""
    on = pdl_chain(t.device) if pdl is None else pdl
    return dict(PDL=on, launch_pdl=on)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether dots must upcast bf16 operands: only under the interpreter (see _tl_helpers.dot)."""
    return dtype == torch.bfloat16 and interpreting()
