"""Compile the kernels for sm_90 (Hopper) on a machine without a GPU, through the real launchers.

The interpreter runs kernels as Python and accepts code the compiler rejects (a non-constexpr
global, say), so CI also compiles them: each launcher is called with CPU tensors of Llama-2-7B
shapes, and its kernel launch is replaced by ``triton.compile`` for sm_90 plus a ``ptxas -v``
pass, which reports registers and spills. Run as a script (``test_kernels_compile.py`` does):
the interpreter must be off in this process. Prints one line per kernel variant; exits 1 on a
compile error or a register spill in a 16-bit variant.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
         torch.int32: "i32", torch.int64: "i64"}
RESULTS: list[tuple[str, str, int, int]] = []  # (kernel, variant, registers, spill bytes)


def _compile(self: JITFunction, *args, grid, warmup, **kwargs) -> None:
    """Stands in for JITFunction.run: specialise like the runtime does, compile, run ptxas."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(self.arg_names, self.params)):
        value = bound[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int) and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    dtype = next(TYPES[v.dtype] for v in bound.values() if isinstance(v, torch.Tensor))
    variant = ",".join([dtype] + [f"{k}={v}" for k, v in constexprs.items() if k.isupper()])
    variant += f",warps={options.get('num_warps', 4)}"
    src = ASTSource(fn=self, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                            capture_output=True, text=True)
    if report.returncode:
        raise RuntimeError(f"ptxas failed on {self.fn.__name__}: {report.stderr}")
    report = report.stderr
    os.unlink(f.name)
    regs = max(int(r) for r in re.findall(r"Used (\d+) registers", report))
    spill = max(int(s) for s in re.findall(r"(\d+) bytes spill stores", report))
    RESULTS.append((self.fn.__name__, variant, regs, spill))


def _launch_all() -> None:
    from slora_kernels import lora_args, norm_rope, paged_attention
    from slora_kernels.lora_args import LoraArgs
    from slora_kernels.lora_decode import lora_expand_decode, lora_shrink_decode
    from slora_kernels.lora_prefill import lora_expand_prefill, lora_shrink_prefill

    for module in (lora_args, norm_rope, paged_attention):
        module.check_device = lambda name, t: None  # CPU tensors stand for CUDA ones here
    h, i, t, s, r = 4096, 11008, 64, 4, 64
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        pool = torch.empty(1 << 20, dtype=dtype)
        ranks = torch.zeros(s, 7, dtype=torch.int32)
        off = torch.zeros(s, 7, r, dtype=torch.int64)
        slots = torch.zeros(t, dtype=torch.int32)
        x = torch.empty(t, h, dtype=dtype)
        y = torch.empty(t, 2 * i, dtype=dtype)
        qkv = ((0, 1, 2), (0, h, 2 * h), (h, h, h))
        seg = torch.zeros(4, dtype=torch.int32)
        args = LoraArgs(ranks, off, off, torch.ones(s), token_slots=slots, seg_starts=seg,
                        seg_lens=seg, seg_slots=seg, max_seg_len=64)
        z = lora_shrink_prefill(x, pool, args, qkv[0])
        lora_shrink_prefill(x, pool, args, qkv[0], tiles={"split_k": 8})  # (the split path)
        lora_expand_prefill(y, z, pool, args, *qkv)
        q = torch.empty(t, 32, 128, dtype=dtype)
        kv = torch.empty(8, 2, 16, 8, 128, dtype=dtype)
        tables = torch.zeros(t, 64, dtype=torch.int32)
        starts = torch.zeros(t + 1, dtype=torch.int32)
        lens = torch.zeros(t, dtype=torch.int32)
        for max_q, splits in ((1, 1), (1, 4), (64, None)):
            paged_attention.paged_attention(q, kv, tables, starts, lens, 0.1, max_q, 1024,
                                            num_splits=splits)
        if dtype != torch.float16:
            continue
        for pdl in (False, True):
            z = lora_shrink_decode(x, pool, args, qkv[0], pdl=pdl)
            lora_expand_decode(y, z, pool, args, *qkv, pdl=pdl)
            # the elementwise chain (SLORA_PDL_CHAIN) with and without its dependent launches
            paged_attention.write_kv(kv, q[:, :8], q[:, :8], torch.zeros(t, dtype=torch.int64),
                                     pdl=pdl)
            norm_rope.rms_norm(x, torch.empty(h, dtype=dtype), 1e-5, pdl=pdl)
            norm_rope.add_rms_norm(x, x, torch.empty(h, dtype=dtype), 1e-5, pdl=pdl)
            norm_rope.silu_and_mul(y, pdl=pdl)
            norm_rope.rotary(q, q[:, :8], q[:, 0], q[:, 0], pdl=pdl)
            paged_attention.paged_attention(q, kv, tables, starts, lens, 0.1, 1, 1024,
                                            num_splits=4, pdl=pdl)
        lora_expand_decode(y, z[:, :2], pool, args, (4, 5), (0, i), (i, i))


def main() -> int:
    JITFunction.run = _compile
    _launch_all()
    bad = 0
    for name, variant, regs, spill in RESULTS:
        spills_matter = "PRECISION=ieee" not in variant  # exact fp32 dots: test-only path
        flag = "SPILLS" if spill and spills_matter else ""
        bad += bool(flag)
        print(f"{name:26s} regs={regs:3d} spill={spill:4d} {variant} {flag}")
    print(f"{len(RESULTS)} kernel variants compiled for sm_90")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
