"""Timing, checking and recording one kernel row: medians over CUDA events with L2 flushed, the
bandwidth bound of the bytes a kernel must move, and the markdown report of the rows."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from .shapes import DEV

HBM_BYTES_PER_S = 4.27e12  # the HBM read bandwidth measured on the H200
ROWS: list[dict] = []

_FLUSH: list[torch.Tensor] = []


def time_us(fn: Callable[[], object], reps: int = 25) -> float:
    """Median GPU time of ``fn`` between CUDA events. Before each repetition a 2 GiB write
    flushes L2 and keeps the GPU busy for ~0.5 ms, long enough for Python to enqueue ``fn``
    behind it, so the number is kernel time, not launch overhead. Every table and weight the
    call reads is cold (``bench_lora_decode_layers`` times decode LoRA as a step runs it)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(1 << 29, dtype=torch.int32, device=DEV))
    fn()  # compile and warm up
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        _FLUSH[0].zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * sorted(start.elapsed_time(end) for start, end in events)[reps // 2]


def eager_us(fn: Callable[[], object]) -> float:
    """Wall time of ``fn`` launched from Python (host overhead included where it is exposed)."""
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 2e-2) -> None:
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6)).item()
    if not err < tol:  # NaN fails too
        raise AssertionError(f"{name}: relative error {err:.3g} vs the torch baseline")


def check_lora(name: str, y: torch.Tensor, triton_fn: Callable[[], torch.Tensor],
               torch_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Triton pair and the torch baseline from the same ``y``; check z and the update
    of y. Returns (y before, y after the Triton pair); ``y`` is left as the baseline made it."""
    y0 = y.clone()
    z_t = triton_fn()
    y_t, y[:] = y.clone(), y0
    z_b = torch_fn()
    check(f"{name} z", z_t, z_b)
    check(f"{name} delta", y_t - y0, y - y0)
    return y0, y_t


def record(table: str, config: str, triton_us: float, torch_us: float | None, bytes_: float,
           **extra: object) -> None:
    bound = bytes_ / HBM_BYTES_PER_S * 1e6
    ROWS.append(dict(table=table, config=config, triton_us=round(triton_us, 2),
                     torch_us=None if torch_us is None else round(torch_us, 2),
                     speedup=None if torch_us is None else round(torch_us / triton_us, 2),
                     bound_us=round(bound, 2), pct_of_bound=round(100 * bound / triton_us, 1),
                     **extra))



def capture_graph(recipe: str, run: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """``run`` captured in a CUDA graph by ``recipe``: "default", "side-stream warm-up" (PyTorch's
    documented recipe) or "thread_local mode" (the capture error mode)."""
    graph = torch.cuda.CUDAGraph()
    if recipe == "side-stream warm-up":  # PyTorch's documented recipe
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(side)
    mode = "thread_local" if recipe == "thread_local mode" else "global"
    with torch.cuda.graph(graph, capture_error_mode=mode):
        run()
    return graph


def markdown(rows: list[dict]) -> str:
    """One markdown table per ``table`` key, its columns the keys of the table's first row."""
    out = []
    for table in dict.fromkeys(r["table"] for r in rows):
        sub = [r for r in rows if r["table"] == table]
        keys = [k for k in sub[0] if k != "table"]
        out += [f"\n### {table}\n", "| " + " | ".join(keys) + " |",
                "|---|" + "---:|" * (len(keys) - 1)]
        for r in sub:
            out.append("| " + " | ".join("-" if r.get(k) is None else str(r[k]) for k in keys)
                       + " |")
    return "\n".join(out)
