"""The ops interface: capability flags decide graphs and table layout, ``make_ops`` refuses
unknown names, every implementation defines every op itself (no inherited fallback)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from slora_backend.ops import BmmLora, Ops, TorchOps, make_ops
from slora_backend.ops.triton_ops import TritonOps

OP_NAMES = sorted(name for name, f in inspect.getmembers(Ops, inspect.isfunction)
                  if getattr(f, "__isabstractmethod__", False))


def test_the_interface_lists_every_op_the_model_calls():
    assert OP_NAMES == ["add_rms_norm", "attention", "lora_expand", "lora_shrink", "rms_norm",
                        "rotary", "silu_and_mul", "write_kv"]


@pytest.mark.parametrize("cls", [TorchOps, TritonOps, BmmLora])
def test_each_implementation_defines_every_op_itself(cls):
    for name in OP_NAMES:
        assert name in vars(cls), f"{cls.__name__}.{name} is inherited, not defined"


@pytest.mark.parametrize(("backend", "lora_ops", "cls", "graphs", "global_slots"), [
    ("torch", None, TorchOps, False, False),
    ("triton", None, TritonOps, True, True),
    ("torch", "bmm", BmmLora, False, False),
    ("triton", "bmm", BmmLora, False, False),
])
def test_make_ops_gives_the_backend_and_its_capabilities(backend, lora_ops, cls, graphs,
                                                         global_slots):
    ops = make_ops(backend, lora_ops)
    assert type(ops) is cls and isinstance(ops, Ops)
    assert ops.graph_capturable is graphs and ops.global_slots is global_slots
    if lora_ops == "bmm":
        assert type(ops.inner) is (TritonOps if backend == "triton" else TorchOps)


def test_make_ops_refuses_unknown_names():
    with pytest.raises(ValueError, match="kernel_backend must be 'torch' or 'triton', got 'cuda'"):
        make_ops("cuda")
    with pytest.raises(ValueError, match="lora_ops must be None or 'bmm', got 'mbgmv'"):
        make_ops("torch", "mbgmv")


def test_bmm_delegates_what_is_not_lora_to_the_ops_it_wraps():
    calls = []

    class Recorder(TorchOps):
        def rms_norm(self, x, weight, eps):
            calls.append("rms_norm")
            return x

    ops = BmmLora(Recorder())
    ops.rms_norm("x", None, 1e-5)
    assert calls == ["rms_norm"] and ops.name == "torch+bmm"


def test_the_torch_ops_do_not_import_the_triton_ones():
    code = ("import sys; import slora_backend.ops as o; o.make_ops('torch'); "
            "print('slora_backend.ops.triton_ops' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
