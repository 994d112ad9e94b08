"""Which launchers a CUDA graph can capture and replay (what a decode loop needs to shed the
Python launch overhead), under three capture recipes."""

from __future__ import annotations

import torch
from slora_kernels.lora_decode import (
    lora_expand_decode,
    lora_shrink_decode,
)
from slora_kernels.norm_rope import rms_norm
from slora_kernels.paged_attention import paged_attention

from .attention import kv_case
from .shapes import (
    CTX,
    DEV,
    DT,
    HEAD_DIM,
    HEADS,
    MIXED,
    QKV,
    Adapters,
    H,
)
from .timing import capture_graph

GRAPH_ROWS: list[dict] = []


def bench_graph_check() -> None:
    """Can each launcher be captured in a CUDA graph (what a decode loop needs to shed the
    Python launch overhead)? Capture, load new inputs, replay, compare with an eager run."""
    gen = torch.Generator().manual_seed(3)
    mods, starts, dims = QKV
    ad = Adapters(8, MIXED, gen)
    args = ad.args(torch.arange(8, dtype=torch.int32, device=DEV))
    x = torch.randn(8, H, device=DEV, dtype=DT)
    w = torch.randn(H, device=DEV, dtype=DT)
    y0 = torch.randn(8, sum(dims), device=DEV, dtype=DT)
    kv, tables = kv_case(8, CTX, HEADS, gen)
    q = torch.randn(8, HEADS, HEAD_DIM, device=DEV, dtype=DT)
    qs = torch.arange(9, dtype=torch.int32, device=DEV)
    lens = torch.full((8,), CTX, dtype=torch.int32, device=DEV)
    outs = {"torch op (control)": torch.empty_like(x), "rms_norm": torch.empty_like(x),
            "lora decode qkv": torch.empty_like(y0),
            "attention decode (split)": torch.empty_like(q)}

    def lora() -> None:
        out = outs["lora decode qkv"]
        out.copy_(y0)
        z = lora_shrink_decode(x, ad.pool, args, mods)
        lora_expand_decode(out, z, ad.pool, args, mods, starts, dims)

    runs = {
        "torch op (control)": lambda: outs["torch op (control)"].copy_(x * 2),
        "rms_norm": lambda: outs["rms_norm"].copy_(rms_norm(x, w, 1e-5)),
        "lora decode qkv": lora,
        "attention decode (split)": lambda: outs["attention decode (split)"].copy_(
            paged_attention(q, kv, tables, qs, lens, HEAD_DIM ** -0.5, 1, CTX, num_splits=4)),
    }
    inputs = (x, y0, q)
    for recipe in ("default", "side-stream warm-up", "thread_local mode"):
        for name, run in runs.items():
            try:
                run()
                torch.cuda.synchronize()
                graph = capture_graph(recipe, run)
                for t in inputs:
                    t.copy_(torch.randn(t.shape, generator=gen).to(t))
                outs[name].zero_()
                graph.replay()
                torch.cuda.synchronize()
                got = outs[name].clone()
                run()
                torch.cuda.synchronize()
                ok = torch.equal(got, outs[name]) and bool(got.abs().sum() > 0)
                status = "ok" if ok else "replay differs from eager (kernels not captured)"
            except Exception as e:  # record and go on: the point is to find what works
                status = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            GRAPH_ROWS.append(dict(recipe=recipe, op=name, status=status))
            print(f"graph check | {recipe} | {name} | {status}", flush=True)


# ------------------------------------------------------------------ report
