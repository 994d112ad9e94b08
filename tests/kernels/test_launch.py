"""``CachedLaunch``: a launch with the specialization of an earlier one calls the compiled
kernel's launcher directly; any difference Triton specializes on goes through Triton again.

Runs without a GPU: the kernel is a real ``JITFunction`` (never compiled), Triton's own launch
path and the CUDA stream lookup are replaced by recorders.
"""

from __future__ import annotations

import pytest
import torch
from slora_kernels._launch import CachedLaunch
from triton import language as tl
from triton.runtime.jit import JITFunction


def _kernel(x_ptr, table_ptr, n, count, flag, BLOCK: tl.constexpr):
    pass


class _Compiled:
    """Stands in for Triton's CompiledKernel: records launches."""

    def __init__(self) -> None:
        self.launches: list[tuple] = []
        self.function, self.packed_metadata = "fn", "meta"

    def run(self, *args) -> None:
        self.launches.append(args)


@pytest.fixture
def launch(monkeypatch):
    """(CachedLaunch, the compiled kernels Triton's path returned, in order)."""
    kernel = JITFunction(_kernel, do_not_specialize=["count"],
                         do_not_specialize_on_alignment=["table_ptr"])
    compiled: list[_Compiled] = []

    def triton_run(self, *args, grid, warmup, **kwargs):
        compiled.append(_Compiled())
        return compiled[-1]

    monkeypatch.setattr(JITFunction, "run", triton_run)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    return CachedLaunch(kernel), compiled


def _args(x: torch.Tensor, table: torch.Tensor, n: int = 32, count: int = 5) -> tuple:
    return (x, table, n, count, True)


def test_same_specialization_reuses_the_compiled_kernel(launch) -> None:
    cached, compiled = launch
    x, table = torch.zeros(64, dtype=torch.float16), torch.zeros(8, dtype=torch.int32)
    cached[(4,)](*_args(x, table), BLOCK=16, num_warps=4)
    assert len(compiled) == 1 and compiled[0].launches == []  # the first: Triton's own path
    other = torch.zeros(64, dtype=torch.float16)  # another pointer, also 16-byte aligned
    cached[(4, 2)](*_args(other, table, n=48, count=7), BLOCK=16, num_warps=4)
    assert len(compiled) == 1
    (launched,) = compiled[0].launches
    # grid padded to 3D, the current stream, no metadata or hooks, then every parameter
    assert launched[:9] == (4, 2, 1, 1234, "fn", "meta", None, None, None)
    assert launched[9] is other and launched[10:] == (table, 48, 7, True, 16)


@pytest.mark.parametrize("change", [
    "misaligned pointer", "dtype", "int divisible by 16", "int == 1", "constexpr",
    "launch option", "bool", "int64 value",
])
def test_a_new_specialization_goes_through_triton(launch, change: str) -> None:
    cached, compiled = launch
    x, table = torch.zeros(64, dtype=torch.float16), torch.zeros(8, dtype=torch.int32)
    args, kwargs = list(_args(x, table)), {"BLOCK": 16, "num_warps": 4}
    cached[(1,)](*args, **kwargs)
    if change == "misaligned pointer":
        args[0] = x[1:]  # 2 bytes past an aligned address
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.bfloat16)
    elif change == "int divisible by 16":
        args[2] = 33
    elif change == "int == 1":
        args[2] = 1
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    elif change == "launch option":
        kwargs["num_warps"] = 8
    elif change == "bool":
        args[4] = False
    elif change == "int64 value":
        args[3] = 2**40  # not keyable: Triton's path every time
    cached[(1,)](*args, **kwargs)
    assert len(compiled) == 2 and compiled[0].launches == [] and compiled[1].launches == []


def test_unspecialized_arguments_do_not_split_the_cache(launch) -> None:
    cached, compiled = launch
    x, table = torch.zeros(64, dtype=torch.float16), torch.zeros(64, dtype=torch.int32)
    cached[(1,)](*_args(x, table, count=16), BLOCK=16)
    # count is do_not_specialize; table is exempt from alignment specialization
    cached[(1,)](*_args(x, table[1:], count=1), BLOCK=16)
    assert len(compiled) == 1 and len(compiled[0].launches) == 1


def test_a_launch_hook_or_a_missing_argument_takes_tritons_path(launch, monkeypatch) -> None:
    from triton import knobs

    cached, compiled = launch
    x, table = torch.zeros(64, dtype=torch.float16), torch.zeros(8, dtype=torch.int32)
    cached[(1,)](*_args(x, table), BLOCK=16)
    cached[(1,)](*_args(x, table)[:4], flag=True, BLOCK=16)  # by keyword: same key
    assert len(compiled) == 1 and len(compiled[0].launches) == 1
    cached[(1,)](*_args(x, table)[:4], BLOCK=16)  # flag missing: Triton's binder decides
    hook = knobs.runtime.launch_enter_hook
    monkeypatch.setattr(hook, "calls", [lambda metadata: None])
    cached[(1,)](*_args(x, table), BLOCK=16)
    assert len(compiled) == 3 and len(compiled[0].launches) == 1


def test_a_grid_function_takes_tritons_path(launch) -> None:
    cached, compiled = launch
    x, table = torch.zeros(64, dtype=torch.float16), torch.zeros(8, dtype=torch.int32)
    for _ in range(2):
        cached[lambda meta: (4,)](*_args(x, table), BLOCK=16)
    assert len(compiled) == 2 and all(c.launches == [] for c in compiled)
