"""Kernel benchmark on the GPU: Llama-2-7B dimensions (H 4096, I 11008, 32 heads of 128), fp16.

Each Triton kernel is timed against its torch baseline (padded gather + bmm for LoRA and decode
attention, the reference functions for the elementwise ops) and against its bandwidth bound:
the bytes it must move (every input read once, every output written once) / 4.27e12 B/s, the
HBM read bandwidth measured on this H200. Times are medians over CUDA events with L2 flushed
before each repetition and the host kept ahead of the GPU (see ``time_us``): kernel time.
``triton_eager_us`` is ``triton.testing.do_bench`` of the same call, where Python launch
overhead shows when it exceeds the GPU work. Every kernel's output is checked against the
baseline before it is timed.

    python benchmarks/bench_kernels.py --out results.json [--quick]

Prints markdown tables and writes every row (with tile sweeps at the target configurations)
to the JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import traceback
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import torch
import triton
from slora_kernels.attention_reference import write_kv_ref
from slora_kernels.lora_args import LoraArgs
from slora_kernels.lora_bmm import lora_expand_bmm, lora_shrink_bmm
from slora_kernels.lora_decode import (
    BgmvExpand,
    BgmvShrink,
    lora_expand_decode,
    lora_shrink_decode,
)
from slora_kernels.lora_prefill import lora_expand_prefill, lora_shrink_prefill
from slora_kernels.norm_rope import add_rms_norm, rms_norm, rotary, silu_and_mul
from slora_kernels.norm_rope_reference import (
    add_rms_norm_ref,
    rms_norm_ref,
    rotary_ref,
    silu_and_mul_ref,
)
from slora_kernels.paged_attention import paged_attention, write_kv

from benchmarks.lora_bmm_segments import lora_expand_bmm_segments, lora_shrink_bmm_segments
from slora_backend.batch import LORA_MODULES
from slora_backend.layout import PoolLayout

HBM_BYTES_PER_S = 4.27e12
DT = torch.float16
DEV = "cuda"
SPEC = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                       head_dim=128)
H, I = SPEC.hidden_size, SPEC.intermediate_size
QKV = ((0, 1, 2), (0, H, 2 * H), (H, H, H))  # modules, out_starts, out_dims (MHA: kv_dim = H)
MIXED = (8, 16, 32, 64)  # S-LoRA's S2 rank set, round robin
TARGET_B, CTX, LONG_CTX, PREFILL_LEN = 64, 1024, 4096, 512  # the target configurations
HEADS, HEAD_DIM = SPEC.num_heads, SPEC.head_dim
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


# ------------------------------------------------------------------ adapters in the page pool


class Adapters:
    """``n`` adapters (ranks round robin from ``ranks``) packed by PoolLayout onto shuffled pages
    of one layer's pool buffer, which otherwise holds random "KV" data."""

    def __init__(self, n: int, ranks: tuple[int, ...], gen: torch.Generator) -> None:
        layout = PoolLayout(SPEC, block_tokens=16)  # type: ignore[arg-type]
        self.ranks_host = [ranks[s % len(ranks)] for s in range(n)]
        plans = {r: layout.plan_adapter({m: r for m in LORA_MODULES}) for r in set(ranks)}
        total = sum(plans[r].num_pages for r in self.ranks_host)
        page_of = torch.randperm(total, generator=gen)
        max_rank = max(self.ranks_host)
        a_off = torch.zeros(n, 7, max_rank, dtype=torch.int64)
        b_off = torch.zeros_like(a_off)
        cursor = 0
        for s, r in enumerate(self.ranks_host):
            plan = plans[r]
            pages = page_of[cursor:cursor + plan.num_pages]
            cursor += plan.num_pages
            for row in plan.rows:
                table = a_off if row.kind == "a" else b_off
                table[s, LORA_MODULES.index(row.module), row.index] = (
                    int(pages[row.page]) * layout.page_size + row.offset)
        self.pool = (torch.randn(total * layout.page_size, device=DEV, dtype=DT) * 0.02)
        self.ranks = torch.tensor([[r] * 7 for r in self.ranks_host], dtype=torch.int32,
                                  device=DEV)
        self.a_off, self.b_off = a_off.to(DEV), b_off.to(DEV)
        self.scalings = torch.full((n,), 2.0, device=DEV)
        self.dims = [layout.module_dims[m] for m in LORA_MODULES]

    def args(self, token_slots: torch.Tensor | None = None,
             segments: tuple[torch.Tensor, ...] | None = None, max_seg_len: int = 0) -> LoraArgs:
        """These adapters' tables, with per-token slots and/or (starts, lens, slots) segments."""
        seg_starts, seg_lens, seg_slots = segments or (None, None, None)
        return LoraArgs(self.ranks, self.a_off, self.b_off, self.scalings,
                        token_slots=token_slots, seg_starts=seg_starts, seg_lens=seg_lens,
                        seg_slots=seg_slots, max_seg_len=max_seg_len)

    def weight_bytes(self, slots: list[int], modules: tuple[int, ...]) -> float:
        """Bytes of the A and B^T rows of ``modules`` for each distinct slot."""
        return sum(self.ranks_host[s] * sum(self.dims[m]) * 2 for s in set(slots) for m in modules)


# ------------------------------------------------------------------ LoRA


def _decode_cases(batches: list[int], gen: torch.Generator):
    """(rank set name, B, adapters, slots, x, y) for each rank set and batch: B tokens over B
    distinct adapters, q/k/v outputs."""
    for rank_name, ranks in (("r8", (8,)), ("r64", (64,)), ("mixed", MIXED)):
        for b in batches:
            ad = Adapters(b, ranks, gen)
            slots = torch.arange(b, dtype=torch.int32, device=DEV)
            x = torch.randn(b, H, device=DEV, dtype=DT)
            y = torch.randn(b, sum(QKV[2]), device=DEV, dtype=DT)
            yield rank_name, b, ad, slots, x, y


def bench_lora_decode(batches: list[int], sweep: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    mods, starts, dims = QKV
    for rank_name, b, ad, slots, x, y in _decode_cases(batches, gen):
        # one-token segments: starts, lens, slots
        args = ad.args(slots, (slots, torch.ones_like(slots), slots), max_seg_len=1)

        def triton_fn(tiles_s=None, tiles_e=None, pdl=None) -> torch.Tensor:
            z = lora_shrink_decode(x, ad.pool, args, mods, tiles=tiles_s, pdl=pdl)
            lora_expand_decode(y, z, ad.pool, args, mods, starts, dims, tiles=tiles_e, pdl=pdl)
            return z

        def sgmv_fn() -> None:
            z = lora_shrink_prefill(x, ad.pool, args, mods)
            lora_expand_prefill(y, z, ad.pool, args, mods, starts, dims)

        def torch_fn() -> torch.Tensor:
            z = lora_shrink_bmm(x, ad.pool, args, mods)
            lora_expand_bmm(y, z, ad.pool, args, mods, starts, dims)
            return z

        y0, y_t = check_lora(f"decode lora b{b} {rank_name}", y, triton_fn, torch_fn)
        nbytes = ad.weight_bytes(list(range(b)), mods) + b * (H + 2 * sum(dims)) * 2
        config = f"B={b} {rank_name} qkv, {b} distinct adapters"
        y[:] = y0
        triton_fn(pdl=False)
        check(f"decode lora b{b} {rank_name} without PDL", y - y0, y_t - y0)
        record("lora_decode", config, time_us(triton_fn), time_us(torch_fn), nbytes,
               no_pdl_us=round(time_us(lambda: triton_fn(pdl=False)), 2),
               sgmv_us=round(time_us(sgmv_fn), 2),
               triton_eager_us=round(eager_us(triton_fn), 2))
        if sweep and b == TARGET_B:
            # Defaults: shrink 2 rank rows x 1024, expand 4 rank rows x 1024 columns, 4 warps
            # (from --only decode_tiles); the first row is 8 rank rows x 512 for both.
            for ts, te in (({"BLOCK_R": 8, "BLOCK_K": 512}, {"BLOCK_R": 8, "BLOCK_N": 512}),
                           (None, {"BLOCK_R": 8, "BLOCK_N": 512}),
                           (None, {"BLOCK_R": 8, "BLOCK_N": 256}),
                           (None, {"BLOCK_R": 4, "BLOCK_N": 512}),
                           ({"BLOCK_R": 1, "BLOCK_K": 2048}, None),
                           ({"BLOCK_R": 1, "BLOCK_K": 512}, None),
                           (None, {"BLOCK_R": 8}),
                           (None, {"BLOCK_N": 512})):
                record("sweep_lora_decode", f"{config} shrink {ts} expand {te}",
                       time_us(lambda: triton_fn(ts, te)), None, nbytes)
        del ad
    # One adapter shared by the whole batch: per-token (BGMV) vs segment (SGMV) kernels.
    ad = Adapters(1, (64,), gen)
    for b in batches:
        slots = torch.zeros(b, dtype=torch.int32, device=DEV)
        x = torch.randn(b, H, device=DEV, dtype=DT)
        y = torch.randn(b, sum(dims), device=DEV, dtype=DT)
        seg = tuple(torch.tensor([v], dtype=torch.int32, device=DEV) for v in (0, b, 0))
        args = ad.args(slots, seg, max_seg_len=b)

        def bgmv() -> None:
            z = lora_shrink_decode(x, ad.pool, args, mods)
            lora_expand_decode(y, z, ad.pool, args, mods, starts, dims)

        def sgmv() -> None:
            z = lora_shrink_prefill(x, ad.pool, args, mods)
            lora_expand_prefill(y, z, ad.pool, args, mods, starts, dims)

        nbytes = ad.weight_bytes([0], mods) + b * (H + 2 * sum(dims)) * 2
        record("lora_decode_identical", f"B={b} r64 qkv, 1 shared adapter", time_us(bgmv), None,
               nbytes, sgmv_us=round(time_us(sgmv), 2))


def bench_lora_decode_layers(batches: list[int], sweep: bool, layers: int = 32) -> None:
    """Decode LoRA as a decode step runs it: the q/k/v shrink + expand of ``layers`` layers
    back to back in one CUDA graph (the engine replays decode steps as graphs), launches
    prepared once (``BgmvShrink`` / ``BgmvExpand``, as ``TritonOps`` does per step), each layer
    with its own pool buffer of adapter weights and the step's tables shared by all layers.

    L2 is flushed before each replay and every layer reads weights no earlier layer read, so
    the weights come from HBM; the tables (slots, ranks, row offsets: a few hundred KB) are
    read from HBM by the first layer and from L2 by the rest, as in a real step. The number
    reported is the replay's time / layers, against the same per-layer bound as
    ``bench_lora_decode``; the torch column is the gather + bmm baseline captured the same
    way. ``bench_lora_decode`` times one isolated pair with every table cold."""
    gen = torch.Generator().manual_seed(5)
    mods, starts, dims = QKV
    for rank_name, b, ad, slots, x, y in _decode_cases(batches, gen):
        n_layers = max(2, min(layers, int(24e9 // (ad.pool.numel() * 2))))  # <= ~24 GB
        pools = [ad.pool] + [torch.randn_like(ad.pool) * 0.02 for _ in range(n_layers - 1)]
        args = ad.args(slots)

        def triton_layers(tiles_s=None, tiles_e=None) -> Callable[[], None]:
            shrink = BgmvShrink(x, ad.pool, args, mods, tiles=tiles_s)
            expand = BgmvExpand(y, shrink.z, ad.pool, args, mods, starts, dims, tiles=tiles_e)

            def run() -> None:
                for pool in pools:
                    expand(y, shrink(x, pool), pool)
            return run

        def torch_layers() -> None:
            for pool in pools:
                z = lora_shrink_bmm(x, pool, args, mods)
                lora_expand_bmm(y, z, pool, args, mods, starts, dims)

        y0 = y.clone()
        torch_layers()
        want = y.clone()

        def replay_us(name: str, run: Callable[[], None]) -> float:
            """Capture ``run`` (after an eager run that compiles), check that one replay gives
            the torch baseline's update of y, and time replays."""
            y.copy_(y0)
            run()
            graph = _capture("thread_local mode", run)
            y.copy_(y0)
            graph.replay()
            torch.cuda.synchronize()
            check(f"decode lora layers b{b} {rank_name} {name}", y - y0, want - y0)
            return time_us(graph.replay) / n_layers

        nbytes = ad.weight_bytes(list(range(b)), mods) + b * (H + 2 * sum(dims)) * 2
        config = f"B={b} {rank_name} qkv, {b} distinct adapters, {n_layers} layers"
        record("lora_decode_layers", config, replay_us("triton", triton_layers()),
               replay_us("torch", torch_layers), nbytes, layers=n_layers)
        if sweep and rank_name == "r8" and b in (TARGET_B, 256):
            for ts, te in (({"BLOCK_R": 1, "BLOCK_K": 2048}, None),
                           ({"BLOCK_R": 4}, None), ({"BLOCK_R": 8, "BLOCK_K": 512}, None),
                           (None, {"BLOCK_R": 8}), (None, {"BLOCK_N": 512}),
                           (None, {"BLOCK_N": 2048, "num_warps": 8})):
                record("sweep_lora_decode_layers", f"{config} shrink {ts} expand {te}",
                       replay_us(f"{ts} {te}", triton_layers(ts, te)), None, nbytes)
        del pools, ad


def bench_decode_tiles(batches: list[int]) -> None:
    """Tile sweep of the decode LoRA kernels, shrink and expand timed apart, then the best pair.

    Rank-8 shrink at batch 64 is only 64 x 3 programs of one row block each: too few loads in
    flight for HBM. Smaller row blocks and longer K tiles trade register width for programs."""
    gen = torch.Generator().manual_seed(0)
    mods, starts, dims = QKV
    shrink_tiles = [dict(BLOCK_R=r, BLOCK_K=k, num_warps=w)
                    for r in (1, 2, 4, 8) for k in (512, 1024, 2048) for w in (4, 8)]
    expand_tiles = [dict(BLOCK_R=r, BLOCK_N=n, num_warps=w)
                    for r in (4, 8, 16) for n in (256, 512, 1024) for w in (4, 8)]
    for rank_name, b, ad, slots, x, y in _decode_cases(batches, gen):
        args = ad.args(slots)
        z = lora_shrink_decode(x, ad.pool, args, mods)
        w_a = ad.weight_bytes(list(range(b)), mods) / 2  # A and B^T rows are the same size
        best = {}
        for kind, tiles, nbytes in (("shrink", shrink_tiles, w_a + b * H * 2),
                                    ("expand", expand_tiles, w_a + b * 2 * sum(dims) * 2)):
            times = []
            for t in tiles:
                if kind == "shrink":
                    check(f"shrink {t}", lora_shrink_decode(x, ad.pool, args, mods, tiles=t), z)
                    fn = partial(lora_shrink_decode, x, ad.pool, args, mods, tiles=t)
                else:
                    fn = partial(lora_expand_decode, y, z, ad.pool, args, mods, starts, dims,
                                 tiles=t)
                us = time_us(fn)
                times.append((us, t))
                record(f"tiles_{kind}", f"B={b} {rank_name} {t}", us, None, nbytes)
            best[kind] = min(times, key=lambda p: p[0])[1]

        def pair(ts=None, te=None) -> None:
            zz = lora_shrink_decode(x, ad.pool, args, mods, tiles=ts)
            lora_expand_decode(y, zz, ad.pool, args, mods, starts, dims, tiles=te)

        nbytes = ad.weight_bytes(list(range(b)), mods) + b * (H + 2 * sum(dims)) * 2
        record("tiles_pair", f"B={b} {rank_name} defaults", time_us(pair), None, nbytes)
        record("tiles_pair", f"B={b} {rank_name} best {best['shrink']} {best['expand']}",
               time_us(lambda: pair(best["shrink"], best["expand"])), None, nbytes)
        del ad


def bench_lora_prefill(configs: list[int], sweep: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    mods, starts, dims = QKV
    for rank_name, ranks in (("r8", (8,)), ("r64", (64,)), ("mixed", MIXED)):
        for n in configs:
            lens = ([PREFILL_LEN] if n == 1
                    else torch.randint(8, PREFILL_LEN, (n,), generator=gen).tolist())
            ad = Adapters(n, ranks, gen)
            t = sum(lens)
            starts_t = torch.tensor([sum(lens[:i]) for i in range(n)], dtype=torch.int32,
                                    device=DEV)
            seg = (starts_t, torch.tensor(lens, dtype=torch.int32, device=DEV),
                   torch.arange(n, dtype=torch.int32, device=DEV))
            x = torch.randn(t, H, device=DEV, dtype=DT)
            y = torch.randn(t, sum(dims), device=DEV, dtype=DT)
            args = ad.args(segments=seg, max_seg_len=max(lens))

            def triton_fn(ts=None, te=None) -> torch.Tensor:
                z = lora_shrink_prefill(x, ad.pool, args, mods, tiles=ts)
                lora_expand_prefill(y, z, ad.pool, args, mods, starts, dims, tiles=te)
                return z

            def torch_fn() -> torch.Tensor:
                z = lora_shrink_bmm_segments(x, ad.pool, args, mods)
                lora_expand_bmm_segments(y, z, ad.pool, args, mods, starts, dims)
                return z

            check_lora(f"prefill lora n{n} {rank_name}", y, triton_fn, torch_fn)
            nbytes = ad.weight_bytes(list(range(n)), mods) + t * (H + 2 * sum(dims)) * 2
            config = f"{n} seqs, {t} tokens, {rank_name} qkv, distinct adapters"
            record("lora_prefill", config, time_us(triton_fn), time_us(torch_fn), nbytes)
            if sweep and rank_name == "r64" and n == configs[-1]:
                for ts, te in (({"num_stages": 4}, {"num_stages": 2}),
                               ({"num_warps": 8}, {"num_warps": 8})):
                    record("sweep_lora_prefill", f"{config} shrink {ts} expand {te}",
                           time_us(lambda: triton_fn(ts, te)), None, nbytes)
            del ad


def bench_lora_mixed_step(decode_rows: int = 250, prompts: int = 8) -> None:
    """A mixed step's LoRA calls (S1, rank 8): ``decode_rows`` decode rows over as many
    adapters, then ``prompts`` prompts of 8-511 tokens, each its own adapter - as the engine
    runs them (decode kernels for the rows, segment kernels for the prompts, two launches per
    call) and each part alone, for the q/k/v call and the o call."""
    gen = torch.Generator().manual_seed(2)
    lens = torch.randint(8, PREFILL_LEN, (prompts,), generator=gen).tolist()
    d, p = decode_rows, sum(lens)
    ad = Adapters(d + prompts, (8,), gen)
    i32 = partial(torch.tensor, dtype=torch.int32, device=DEV)
    rows = torch.arange(d, dtype=torch.int32, device=DEV)
    seg = (i32([sum(lens[:i]) for i in range(prompts)]), i32(lens),
           torch.arange(d, d + prompts, dtype=torch.int32, device=DEV))
    row_args, prompt_args = ad.args(rows), ad.args(segments=seg, max_seg_len=max(lens))
    for name, (mods, starts, dims) in (("qkv", QKV), ("o", ((3,), (0,), (H,)))):
        x = torch.randn(d + p, H, device=DEV, dtype=DT)
        y = torch.randn(d + p, sum(dims), device=DEV, dtype=DT)

        def decode_part() -> None:
            z = lora_shrink_decode(x[:d], ad.pool, row_args, mods)
            lora_expand_decode(y[:d], z, ad.pool, row_args, mods, starts, dims)

        def prompt_part() -> None:
            z = lora_shrink_prefill(x[d:], ad.pool, prompt_args, mods)
            lora_expand_prefill(y[d:], z, ad.pool, prompt_args, mods, starts, dims)

        def both() -> None:
            decode_part()
            prompt_part()

        nbytes = (ad.weight_bytes(list(range(d + prompts)), mods)
                  + (d + p) * (H + 2 * sum(dims)) * 2)
        for case, fn in (("both (the engine)", both), ("decode rows only", decode_part),
                         ("prompts only", prompt_part)):
            record("lora_mixed_step", f"{d} decode rows + {p} prompt tokens ({prompts} prompts), "
                   f"r8 {name}: {case}", time_us(fn), None, nbytes)


# ------------------------------------------------------------------ attention


def _kv_case(b: int, ctx: int, kv_heads: int, gen: torch.Generator):
    bt = 16
    per_seq = triton.cdiv(ctx, bt)
    pages = torch.randperm(b * per_seq, generator=gen).view(b, per_seq).to(torch.int32).to(DEV)
    kv = torch.randn(b * per_seq, 2, bt, kv_heads, HEAD_DIM, device=DEV, dtype=DT)
    return kv, pages


def attention_decode_torch(q, kv, tables, ctx_lens, max_ctx, scale) -> torch.Tensor:
    """Padded gather + bmm: every sequence's pages gathered to max_ctx, masked past its end."""
    b, heads, d = q.shape
    kvh = kv.shape[3]
    w = triton.cdiv(max_ctx, kv.shape[2])
    g = kv[tables[:, :w].long()]  # [B, W, 2, bt, kvh, d]
    k = g[:, :, 0].reshape(b, -1, kvh, d)[:, :max_ctx].permute(0, 2, 3, 1)  # [B, kvh, d, ctx]
    v = g[:, :, 1].reshape(b, -1, kvh, d)[:, :max_ctx].transpose(1, 2)  # [B, kvh, ctx, d]
    s = (q.view(b, kvh, heads // kvh, d) @ k).float() * scale
    s.masked_fill_(torch.arange(max_ctx, device=q.device) >= ctx_lens[:, None, None, None],
                   float("-inf"))
    return (torch.softmax(s, -1).to(q.dtype) @ v).reshape(b, heads, d)


def bench_attention(batches: list[int], sweep: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    scale = HEAD_DIM ** -0.5
    cases = ([(b, CTX, HEADS) for b in batches]
             + [(TARGET_B, LONG_CTX, HEADS), (TARGET_B, CTX, HEADS // 4)])
    for b, ctx, kvh in cases:
        kv, tables = _kv_case(b, ctx, kvh, gen)
        q = torch.randn(b, HEADS, HEAD_DIM, device=DEV, dtype=DT)
        qs = torch.arange(b + 1, dtype=torch.int32, device=DEV)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)

        def triton_fn(splits=None, tiles=None) -> torch.Tensor:
            return paged_attention(q, kv, tables, qs, lens, scale, 1, ctx, num_splits=splits,
                                   tiles=tiles)

        def torch_fn() -> torch.Tensor:
            return attention_decode_torch(q, kv, tables, lens, ctx, scale)

        check(f"attention b{b} ctx{ctx}", triton_fn(), torch_fn())
        nbytes = b * ctx * 2 * kvh * HEAD_DIM * 2 + 2 * q.numel() * 2
        config = f"decode B={b} ctx={ctx} heads {HEADS}/{kvh}"
        record("attention_decode", config, time_us(triton_fn), time_us(torch_fn), nbytes,
               triton_eager_us=round(eager_us(triton_fn), 2))
        if sweep and ctx == CTX and kvh == HEADS and b in (8, TARGET_B):
            for tiles in ({"num_stages": 3}, {"BLOCK_N": 128}):
                record("sweep_attention", f"{config} {tiles}",
                       time_us(lambda: triton_fn(None, tiles)), None, nbytes)
            for splits in (1, 2, 4):
                record("sweep_attention", f"{config} splits={splits}",
                       time_us(lambda: triton_fn(splits)), None, nbytes)
        del kv
    # Prefill: 8 fresh prompts of 512 tokens, causal (compute-bound: TFLOP/s reported). Pages
    # in order here, so that the same K/V can be viewed contiguously for torch's SDPA.
    b, n = 8, PREFILL_LEN
    kv = torch.randn(b * n // 16, 2, 16, HEADS, HEAD_DIM, device=DEV, dtype=DT)
    tables = torch.arange(b * n // 16, dtype=torch.int32, device=DEV).view(b, n // 16)
    q = torch.randn(b * n, HEADS, HEAD_DIM, device=DEV, dtype=DT)
    qs = torch.arange(0, b * n + 1, n, dtype=torch.int32, device=DEV)
    lens = torch.full((b,), n, dtype=torch.int32, device=DEV)
    k = kv[:, 0].reshape(b, n, HEADS, HEAD_DIM).transpose(1, 2)
    v = kv[:, 1].reshape(b, n, HEADS, HEAD_DIM).transpose(1, 2)

    def sdpa() -> torch.Tensor:
        qq = q.view(b, n, HEADS, -1).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(qq, k, v, is_causal=True,
                                                                scale=scale)

    def prefill() -> torch.Tensor:
        return paged_attention(q, kv, tables, qs, lens, scale, n, n)

    check("attention prefill", prefill(), sdpa().transpose(1, 2).reshape(b * n, HEADS, -1))
    t = time_us(prefill)
    flops = 4 * b * HEADS * HEAD_DIM * n * n / 2
    record("attention_prefill", f"prefill {b}x{n} causal, vs SDPA on contiguous K/V", t,
           time_us(sdpa), 4 * q.numel() * 2, tflops=round(flops / t / 1e6, 1))


# ------------------------------------------------------------------ elementwise


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


GRAPH_ROWS: list[dict] = []


def _capture(recipe: str, run: Callable[[], None]) -> torch.cuda.CUDAGraph:
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
    kv, tables = _kv_case(8, CTX, HEADS, gen)
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
                graph = _capture(recipe, run)
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


def markdown(rows: list[dict]) -> str:
    out = []
    for table in dict.fromkeys(r["table"] for r in rows):
        out.append(f"\n### {table}\n")
        sub = [r for r in rows if r["table"] == table]
        extra = [k for k in sub[0] if k not in ("table", "config", "triton_us", "torch_us",
                                                  "speedup", "bound_us", "pct_of_bound")]
        out.append("| config | triton us | torch us | speedup | bound us | % of bound |"
                   + "".join(f" {k} |" for k in extra))
        out.append("|---|---:|---:|---:|---:|---:|" + "---:|" * len(extra))
        for r in sub:
            cells = [r["config"], r["triton_us"], r["torch_us"] or "-", r["speedup"] or "-",
                     r["bound_us"], r["pct_of_bound"], *(r.get(k, "-") for k in extra)]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_kernels.json")
    parser.add_argument("--quick", action="store_true", help="fewer sizes, no tile sweeps")
    parser.add_argument("--only", default="lora_decode,lora_prefill,attention,elementwise")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    batches = [1, 64] if args.quick else [1, 8, 32, 64, 128, 256]
    sweep = not args.quick
    sections = {
        "lora_decode": lambda: bench_lora_decode(batches, sweep),
        "lora_prefill": lambda: bench_lora_prefill([1, 8] if args.quick else [1, 8, 32, 64], sweep),
        "attention": lambda: bench_attention(batches, sweep),
        "elementwise": lambda: bench_elementwise([64, 256] if args.quick else [64, 256, 4096]),
        "graph_check": bench_graph_check,
        "lora_mixed_step": bench_lora_mixed_step,
        "decode_tiles": lambda: bench_decode_tiles([32, 64, 128]),
        "lora_decode_layers": lambda: bench_lora_decode_layers(batches, sweep),
    }
    failed = []
    for name in args.only.split(","):
        try:
            sections[name]()
        except Exception:  # report the other sections even if one breaks
            traceback.print_exc()
            failed.append(name)
        torch.cuda.empty_cache()
    env = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(),
               torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               hbm_bytes_per_s=HBM_BYTES_PER_S, dtype="fp16")
    with open(args.out, "w") as f:
        json.dump(dict(env=env, rows=ROWS, graph_check=GRAPH_ROWS, failed=failed), f, indent=1)
    print(json.dumps(env))
    print(markdown(ROWS))
    if failed:
        raise SystemExit(f"sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
