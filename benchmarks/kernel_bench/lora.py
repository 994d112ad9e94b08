"""LoRA kernel rows: decode (BGMV) against a padded gather + bmm, a step's 32 layers of decode
LoRA, the decode tile sweep, prefill (SGMV) against per-segment bmm, a mixed step, and the
segment shrink with K split against unsplit."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from slora_kernels.lora_bmm import lora_expand_bmm, lora_shrink_bmm
from slora_kernels.lora_decode import (
    BgmvExpand,
    BgmvShrink,
    lora_expand_decode,
    lora_shrink_decode,
)
from slora_kernels.lora_prefill import SgmvShrink, lora_expand_prefill, lora_shrink_prefill
from slora_kernels.lora_reference import lora_shrink_ref

from benchmarks.lora_bmm_segments import lora_expand_bmm_segments, lora_shrink_bmm_segments

from .shapes import (
    DEV,
    DT,
    MIXED,
    PREFILL_LEN,
    QKV,
    TARGET_B,
    Adapters,
    H,
)
from .timing import capture_graph, check, check_lora, eager_us, record, time_us


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
            graph = capture_graph("thread_local mode", run)
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


def bench_lora_split_k() -> None:
    """The segment shrink alone, K split as the launcher decides (``split_k.py``) against not
    split (``split_k=1``), for prompts as a mixed step meets them: one of 128 or 500 tokens, or
    8 of 8-511, each its own adapter, rank 8 and 64, the q/k/v call (K = 4096, 3 modules) and
    the o call (1 module). The "torch" column is the unsplit launch."""
    gen = torch.Generator().manual_seed(3)
    i32 = partial(torch.tensor, dtype=torch.int32, device=DEV)
    for prompt_name, lens in (("1 x 128", [128]), ("1 x 500", [500]),
                              ("8 x 8-511", torch.randint(8, PREFILL_LEN, (8,), generator=gen)
                               .tolist())):
        seg = (i32([sum(lens[:i]) for i in range(len(lens))]), i32(lens),
               torch.arange(len(lens), dtype=torch.int32, device=DEV))
        for rank_name, ranks in (("r8", (8,)), ("r64", (64,))):
            ad = Adapters(len(lens), ranks, gen)
            token_slots = torch.repeat_interleave(
                torch.arange(len(lens), dtype=torch.int32), torch.tensor(lens)).to(DEV)
            args = ad.args(token_slots, segments=seg, max_seg_len=max(lens))
            x = torch.randn(sum(lens), H, device=DEV, dtype=DT)
            for name, mods in (("qkv", QKV[0]), ("o", (3,))):
                split = SgmvShrink(x, ad.pool, args, mods)
                whole = SgmvShrink(x, ad.pool, args, mods, tiles={"split_k": 1})
                want = lora_shrink_ref(x, ad.pool, args, mods)
                check(f"split shrink {prompt_name} {rank_name} {name}", split(x, ad.pool), want)
                check(f"unsplit shrink {prompt_name} {rank_name} {name}", whole(x, ad.pool), want)
                # (A only: half of weight_bytes, whose modules here read and write H wide)
                nbytes = ad.weight_bytes(list(range(len(lens))), mods) // 2 + x.numel() * 2
                record("lora_split_k", f"{prompt_name} tokens, {rank_name} {name}: "
                       f"{split.splits} splits vs 1", time_us(lambda: split(x, ad.pool)),
                       time_us(lambda: whole(x, ad.pool)), nbytes, splits=split.splits)
            del ad
