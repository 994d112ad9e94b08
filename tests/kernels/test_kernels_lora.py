"""LoRA shrink/expand kernels (decode BGMV, prefill SGMV) against ``lora_reference``.

Matrix: dtype x rank (each of 8..128 and mixed in one batch) x kernel kind, then model shape
(MHA, GQA, odd sizes) x adapter popularity (distinct, uniform, skewed, identical, base rows
mixed in) over all four fused module groups; adapters always sit on shuffled pool pages.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    DTYPES,
    MODULE_GROUPS,
    POPULARITIES,
    SHAPES,
    TOLERANCES,
    adapter_ranks,
    assign_adapters,
    build_adapter_pool,
    lora_batch,
    module_dims,
)
from slora_kernels import split_k
from slora_kernels.lora_args import LoraArgs
from slora_kernels.lora_bmm import lora_expand_bmm, lora_shrink_bmm
from slora_kernels.lora_decode import BgmvShrink, lora_expand_decode, lora_shrink_decode
from slora_kernels.lora_prefill import (
    SgmvExpand,
    SgmvShrink,
    lora_expand_prefill,
    lora_shrink_prefill,
)
from slora_kernels.lora_reference import lora_expand_ref, lora_shrink_ref

from benchmarks.lora_bmm_segments import lora_expand_bmm_segments, lora_shrink_bmm_segments
from slora_backend.batch import LoraBatch
from slora_backend.ops import TorchOps, triton_ops

DECODE_SEQS = 6
PREFILL_LENS = (5, 1, 12, 3)  # one prompt per sequence, laid end to end


def _make_case(shape_name: str, dtype: torch.dtype, rank: int | str, popularity: str,
               kind: str, device: torch.device, seed: int, decode_seqs: int = DECODE_SEQS):
    gen = torch.Generator().manual_seed(seed)
    lens = [1] * decode_seqs if kind == "decode" else list(PREFILL_LENS)
    seq_adapters = assign_adapters(popularity, len(lens), gen)
    num_adapters = max(max(seq_adapters) + 1, 1)
    adapters = build_adapter_pool(
        SHAPES[shape_name], dtype, [adapter_ranks(rank, a) for a in range(num_adapters)],
        device, gen,
    )
    token_slots = [a for a, n in zip(seq_adapters, lens) for _ in range(n)]
    lora = lora_batch(token_slots, adapters, kind == "decode", device)
    return adapters, lora, gen


def _shrink(kind: str, x, pool, lora: LoraBatch, mods):
    if kind == "decode":
        return lora_shrink_decode(x, pool, lora.kernel_args, mods)
    return lora_shrink_prefill(x, pool, lora.kernel_args, mods)


def _expand(kind: str, y, z, pool, lora: LoraBatch, mods, starts, dims):
    if kind == "decode":
        lora_expand_decode(y, z, pool, lora.kernel_args, mods, starts, dims)
    else:
        lora_expand_prefill(y, z, pool, lora.kernel_args, mods, starts, dims)


def _check_group(kind: str, shape_name: str, mods: tuple[int, ...], pool: torch.Tensor,
                 lora: LoraBatch, dtype: torch.dtype, gen: torch.Generator,
                 device: torch.device) -> None:
    dims = module_dims(SHAPES[shape_name])
    in_dim = dims[mods[0]][0]
    out_dims = [dims[m][1] for m in mods]
    starts = [sum(out_dims[:i]) for i in range(len(mods))]
    num_tokens = lora.token_slots.shape[0]
    tol = TOLERANCES[dtype]
    # x and y are column slices of wider buffers: row strides differ from their widths.
    x = torch.randn(num_tokens, in_dim + 5, generator=gen)[:, 2:2 + in_dim].to(dtype).to(device)
    z_ref = lora_shrink_ref(x, pool, lora.kernel_args, mods)
    z = _shrink(kind, x, pool, lora, mods)
    torch.testing.assert_close(z, z_ref, **tol)

    y_wide = torch.randn(num_tokens, sum(out_dims) + 3, generator=gen).to(dtype).to(device)
    y0 = y_wide[:, 1:1 + sum(out_dims)]
    y_ref = y0.clone()
    lora_expand_ref(y_ref, z_ref, pool, lora.kernel_args, mods, starts, out_dims)
    y = y0.clone()
    y_kernel = y_wide.clone()
    y_view = y_kernel[:, 1:1 + sum(out_dims)]
    _expand(kind, y_view, z_ref, pool, lora, mods, starts, out_dims)
    torch.testing.assert_close(y_view, y_ref, **tol)
    # Columns outside the slice and base-model rows are not touched at all.
    assert torch.equal(y_kernel[:, 0], y_wide[:, 0])
    assert torch.equal(y_kernel[:, -2:], y_wide[:, -2:])
    base = lora.token_slots < 0
    assert torch.equal(y_view[base], y[base])


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("rank", [8, 16, 32, 64, 128, "mixed"], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_lora_rank_dtype(dtype_name: str, rank: int | str, kind: str, device) -> None:
    dtype = DTYPES[dtype_name]
    adapters, lora, gen = _make_case("llama2", dtype, rank, "base_mixed", kind, device, seed=1)
    _check_group(kind, "llama2", MODULE_GROUPS["qkv"], adapters.pool, lora, dtype, gen, device)


@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_lora_shape_popularity(shape_name: str, popularity: str, device) -> None:
    # Each case covers one dtype (rotating) and both kernel kinds; the four module groups are
    # split between the kinds, swapping every other case, so each (shape, kind, group) is hit.
    index = list(SHAPES).index(shape_name) * len(POPULARITIES) + POPULARITIES.index(popularity)
    dtype = list(DTYPES.values())[index % len(DTYPES)]
    pairs = (("qkv", "down"), ("gate_up", "o"))
    for k, kind in enumerate(("decode", "prefill")):
        adapters, lora, gen = _make_case(shape_name, dtype, "mixed", popularity, kind, device,
                                         seed=100 + index)
        for group in pairs[(k + index) % 2]:
            _check_group(kind, shape_name, MODULE_GROUPS[group], adapters.pool, lora, dtype, gen,
                         device)


def test_prefill_kernels_on_a_mixed_step(device) -> None:
    """A mixed step: two prompts among 140 one-token segments (more than one chunk of the
    kernels' segment scan) of distinct adapters, base tokens between them; the tiles are
    numbered across segments, so the grid is about T / BLOCK_M + G, not G x max_seg_len."""
    gen = torch.Generator().manual_seed(7)
    num_adapters = 142
    adapters = build_adapter_pool(SHAPES["odd"], torch.float32,
                                  [{"q_proj": 8, "v_proj": 8} for _ in range(num_adapters)],
                                  device, gen)
    token_slots = [0] * 37 + [-1, -1]
    for a in range(1, num_adapters - 1):
        token_slots += [a, -1] if a % 5 == 0 else [a]
    token_slots += [num_adapters - 1] * 21
    lora = lora_batch(token_slots, adapters, False, device)
    assert lora.seg_lens.shape[0] == num_adapters and lora.max_seg_len == 37
    _check_group("prefill", "odd", MODULE_GROUPS["qkv"], adapters.pool, lora, torch.float32, gen,
                 device)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_segment_shrink_split_over_k_equals_the_reference(dtype_name: str, device) -> None:
    """Split-K (forced here; on CUDA small grids split by themselves): each split parks its
    partial tile and the last to arrive sums them, for q/k/v (K = 128: 8 blocks of 16) and down
    (K = 344: 22 blocks, a last split shorter than the others), ranks mixed in one batch; the
    arrival counts are back at 0, so the same prepared launch runs again."""
    dtype = DTYPES[dtype_name]
    adapters, lora, gen = _make_case("llama2", dtype, "mixed", "distinct", "prefill", device, 11)
    dims = module_dims(SHAPES["llama2"])
    for group in ("qkv", "down"):
        mods = MODULE_GROUPS[group]
        x = torch.randn(lora.token_slots.shape[0], dims[mods[0]][0], generator=gen)
        x = x.to(dtype).to(device)
        z_ref = lora_shrink_ref(x, adapters.pool, lora.kernel_args, mods)
        for splits in (2, 3):
            shrink = SgmvShrink(x, adapters.pool, lora.kernel_args, mods,
                                tiles={"split_k": splits, "BLOCK_K": 16})
            assert shrink.splits == splits
            first = shrink(x, adapters.pool).clone()
            torch.testing.assert_close(first, z_ref, **TOLERANCES[dtype])
            arrivals = shrink._args[1]
            assert arrivals.numel() > 1 and int(arrivals.abs().sum()) == 0
            assert torch.equal(shrink(x, adapters.pool), first)


def test_k_splits_only_where_asked_or_the_grid_is_small() -> None:
    """On a 132-SM GPU a grid of fewer than 4 programs per SM splits K = 4096 (64 blocks) into
    runs of 8 blocks, a larger grid does not; off CUDA (no SM count) nothing splits unless
    asked; a forced count is capped at the K blocks and leaves no split empty (7 blocks in 3
    splits: 3 + 3 + 1)."""
    k_splits = split_k.k_splits
    assert k_splits(114, 64, 132, None) == (8, 8)  # one 128-token prompt in a 384-token step
    assert k_splits(527, 64, 132, None) == (8, 8)
    assert k_splits(528, 64, 132, None) == (1, 64)
    assert k_splits(6, 64, None, None) == (1, 64)
    assert k_splits(4, 7, None, 3) == (3, 3)
    assert k_splits(4, 4, 132, 8) == (4, 1)
    assert k_splits(4, 6, None, 4) == (3, 2)


def test_a_shared_workspace_caps_the_splits_and_is_reused(device) -> None:
    """Launches given one workspace park their tiles in its buffers: a launch splits at most as
    many ways as they hold (none if fewer than two, or if it has more programs than arrival
    counts, or with a workspace of no room) and gives the reference's z; launches after it use
    the same buffers."""
    adapters, lora, gen = _make_case("llama2", torch.float32, 8, "distinct", "prefill", device, 12)
    x = torch.randn(lora.token_slots.shape[0], 128, generator=gen).to(device)
    z_ref = lora_shrink_ref(x, adapters.pool, lora.kernel_args, (0, 1, 2))
    tiles = {"split_k": 4, "BLOCK_K": 16, "BLOCK_M": 16, "BLOCK_R": 16}
    probe = SgmvShrink(x, adapters.pool, lora.kernel_args, (0, 1, 2), tiles=tiles)
    programs = probe._grid[0] * probe._grid[1]
    # (the last: no room at all, the engine's workspace when split_k_shrink is off)
    for elements, counters, want in ((programs * 256 * 4, 64, 4), (programs * 256 * 3, 64, 3),
                                     (programs * 256, 64, 1), (programs * 256 * 4, 2, 1),
                                     (0, 0, 1)):
        workspace = split_k.SplitKWorkspace(elements, counters)
        shrink = SgmvShrink(x, adapters.pool, lora.kernel_args, (0, 1, 2), tiles=tiles,
                            workspace=workspace)
        assert shrink.splits == want
        torch.testing.assert_close(shrink(x, adapters.pool), z_ref, **TOLERANCES[torch.float32])
        again = SgmvShrink(x, adapters.pool, lora.kernel_args, (0, 1, 2), tiles=tiles,
                           workspace=workspace)
        assert again._args[0] is shrink._args[0] and again._args[1] is shrink._args[1]
        torch.testing.assert_close(again(x, adapters.pool), z_ref, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("rank", [64, "mixed"], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_ops_split_a_mixed_step_in_every_dtype(dtype_name: str, rank: int | str, device) -> None:
    """A mixed step (decode rows of distinct adapters, one shared with a prompt, base rows
    between; then prompts): TritonOps runs the rows on the decode kernels into z's and y's
    first rows and the prompts on the segment kernels; z and y equal the reference over the
    whole batch, in two layers of the step (the second reuses the first's launches)."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(21)
    adapters = build_adapter_pool(SHAPES["llama2"], dtype,
                                  [adapter_ranks(rank, a) for a in range(8)], device, gen)
    rows = [3, -1, 0, 5, 5, -1, 7, 2, 6]
    token_slots = rows + [2] * 23 + [-1] * 4 + [4] * 17 + [1] * 3
    lora = lora_batch(token_slots, adapters, False, device, decode_tokens=len(rows))
    assert triton_ops._mixed_split(lora) is not None
    mods, starts, dims = (0, 1, 2), (0, 128, 256), (128, 128, 128)
    ops = triton_ops.TritonOps()
    for _ in range(2):
        x = torch.randn(len(token_slots), 128, generator=gen).to(dtype).to(device)
        z = ops.lora_shrink(x, adapters.pool, lora, mods)
        z_ref = lora_shrink_ref(x, adapters.pool, lora.kernel_args, mods)
        torch.testing.assert_close(z, z_ref, **TOLERANCES[dtype])
        y = torch.randn(x.shape[0], 384, generator=gen).to(dtype).to(device)
        y_ref = y.clone()
        ops.lora_expand(y, z_ref.clone(), adapters.pool, lora, mods, starts, dims)
        lora_expand_ref(y_ref, z_ref, adapters.pool, lora.kernel_args, mods, starts, dims)
        torch.testing.assert_close(y, y_ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_lora_without_adapters(kind: str, device) -> None:
    """Every token on the base model: z is zero and y is left exactly as it was."""
    adapters, _, gen = _make_case("llama2", torch.float32, 8, "distinct", kind, device, seed=3)
    n = DECODE_SEQS if kind == "decode" else sum(PREFILL_LENS)
    lora = lora_batch([-1] * n, adapters, kind == "decode", device)
    x = torch.randn(n, 128, generator=gen).to(device)
    z = _shrink(kind, x, adapters.pool, lora, (0, 1, 2))
    assert z.shape == (n, 3, 8) and torch.count_nonzero(z) == 0
    y = torch.randn(n, 384, generator=gen).to(device)
    y0 = y.clone()
    _expand(kind, y, torch.randn(n, 3, 8, generator=gen).to(device), adapters.pool, lora,
            (0, 1, 2), (0, 128, 256), (128, 128, 128))
    assert torch.equal(y, y0)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_bmm_baseline_matches_reference(kind: str, device) -> None:
    """The benchmark's torch baseline computes the reference's function."""
    dtype = torch.float32
    adapters, lora, gen = _make_case("llama3", dtype, "mixed", "base_mixed", kind, device, seed=5)
    mods, dims = (4, 5), (896, 896)
    x = torch.randn(lora.token_slots.shape[0], 256, generator=gen).to(device)
    z_ref = lora_shrink_ref(x, adapters.pool, lora.kernel_args, mods)
    y = torch.randn(x.shape[0], sum(dims), generator=gen).to(device)
    y_ref = y.clone()
    lora_expand_ref(y_ref, z_ref, adapters.pool, lora.kernel_args, mods, (0, 896), dims)
    if kind == "decode":
        z = lora_shrink_bmm(x, adapters.pool, lora.kernel_args, mods)
        lora_expand_bmm(y, z_ref, adapters.pool, lora.kernel_args, mods, (0, 896), dims)
    else:
        z = lora_shrink_bmm_segments(x, adapters.pool, lora.kernel_args, mods)
        lora_expand_bmm_segments(y, z_ref, adapters.pool, lora.kernel_args, mods, (0, 896), dims)
    torch.testing.assert_close(z, z_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(y, y_ref, **TOLERANCES[dtype])


@pytest.mark.parametrize(("popularity", "kind", "num_seqs", "segments"), [
    ("distinct", "decode", 6, False),  # per-token kernels
    ("identical", "decode", 6, False),  # a short shared run: still per token
    ("identical", "decode", 50, True),  # one adapter for 50 tokens: the segment kernels
    ("skewed", "prefill", 4, True),
])
def test_ops_lora_path_matches_torch(popularity: str, kind: str, num_seqs: int, segments: bool,
                                     device) -> None:
    """TritonOps picks the kernel kind from the batch and computes what TorchOps computes."""
    adapters, lora, gen = _make_case("smollm2", torch.float32, "mixed", popularity, kind, device,
                                     seed=9, decode_seqs=num_seqs)
    assert triton_ops._use_segments(lora, lora.token_slots.shape[0]) == segments
    _check_ops_agree(adapters.pool, lora, gen, device)


def _check_ops_agree(pool, lora: LoraBatch, gen, device) -> None:
    """TorchOps and TritonOps give the same z and y for q/k/v of a smollm2-shaped layer, in two
    layers of one step: the second layer (new x, y and pool buffer) reuses the launches the
    first prepared, and the z buffer they return."""
    mods, starts, dims = (0, 1, 2), (0, 192, 256), (192, 64, 64)
    pools = (pool, torch.randn(pool.shape, generator=gen).to(device) * 0.05)
    layers = [(torch.randn(lora.token_slots.shape[0], 192, generator=gen).to(device),
               torch.randn(lora.token_slots.shape[0], 320, generator=gen).to(device), p)
              for p in pools]
    results = []
    for ops in (TorchOps(), triton_ops.TritonOps()):
        out = []
        for x, y0, layer_pool in layers:
            z = ops.lora_shrink(x, layer_pool, lora, mods)
            y = y0.clone()
            ops.lora_expand(y, z, layer_pool, lora, mods, starts, dims)
            out += [z.clone(), y]
        results.append(out)
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("decode", ["distinct", "shared", "base"])
def test_ops_on_a_mixed_step_split_decode_rows_from_prompts(decode: str, device) -> None:
    """A mixed step (decode rows first, then prompts; one prompt shares its adapter with a
    decode row, so only the split keeps their segments apart): TritonOps runs the decode rows
    with the decode kernels and the prompts with the segment kernels - unless the decode rows
    share adapters as much as a segment-kernel decode batch, or use none - and computes what
    TorchOps computes."""
    gen = torch.Generator().manual_seed(11)
    adapters = build_adapter_pool(SHAPES["smollm2"], torch.float32,
                                  [adapter_ranks("mixed", a) for a in range(6)], device, gen)
    rows = {"distinct": [0, 1, -1, 2, 3, 3, 4, 5], "shared": [2] * 50, "base": [-1] * 5}[decode]
    prompts = [5] * 19 + [-1] * 7 + [1] * 33
    lora = lora_batch(rows + prompts, adapters, False, device, decode_tokens=len(rows))
    split = triton_ops._mixed_split(lora)
    assert (split is None) == (decode != "distinct")
    if split is not None:
        assert split.token_slots.shape[0] == len(rows) and split.seg_lens.tolist() == [19, 33]
    _check_ops_agree(adapters.pool, lora, gen, device)


def _args(lora: LoraBatch, **changed) -> LoraArgs:
    """The batch's LoraArgs with some tables replaced."""
    fields = dict(ranks=lora.ranks, a_offsets=lora.a_offsets, b_offsets=lora.b_offsets,
                  scalings=lora.scalings, token_slots=lora.token_slots,
                  seg_starts=lora.seg_starts, seg_lens=lora.seg_lens, seg_slots=lora.seg_slots,
                  max_seg_len=lora.max_seg_len)
    fields.update(changed)
    return LoraArgs(**fields)


def test_lora_launchers_reject_bad_arguments(device) -> None:
    adapters, lora, gen = _make_case("llama2", torch.float16, 8, "distinct", "decode", device, 7)
    pool, args = adapters.pool, lora.kernel_args
    x = torch.randn(DECODE_SEQS, 128).half().to(device)
    with pytest.raises(ValueError, match="pool has dtype"):
        lora_shrink_decode(x, pool.float(), args, (0,))
    with pytest.raises(ValueError, match="x must have stride 1"):
        lora_shrink_decode(x.t().contiguous().t(), pool, args, (0,))
    with pytest.raises(ValueError, match="modules must list 1 to 3"):
        lora_shrink_decode(x, pool, args, (0, 1, 2, 3))
    with pytest.raises(ValueError, match="distinct indices"):
        lora_shrink_decode(x, pool, args, (0, 7))
    with pytest.raises(ValueError, match="token_slots has dtype"):
        lora_shrink_decode(x, pool, _args(lora, token_slots=lora.token_slots.long()), (0,))
    with pytest.raises(ValueError, match="token_slots has 6 entries, expected 5"):
        lora_shrink_decode(x[:5], pool, args, (0,))
    with pytest.raises(ValueError, match="a_offsets has dtype"):
        lora_shrink_decode(x, pool, _args(lora, a_offsets=lora.a_offsets.int()), (0,))
    with pytest.raises(ValueError, match="b_offsets has shape .* they must match"):
        _args(lora, b_offsets=lora.b_offsets[:, :, :4])
    z = lora_shrink_decode(x, pool, args, (0, 1))
    y = torch.zeros(DECODE_SEQS, 256).half().to(device)
    with pytest.raises(ValueError, match="does not fit"):
        lora_expand_decode(y, z, pool, args, (0, 1), (0, 200), (128, 128))
    with pytest.raises(ValueError, match="one entry per module"):
        lora_expand_decode(y, z, pool, args, (0, 1), (0,), (128,))
    with pytest.raises(ValueError, match="z has size"):
        lora_expand_decode(y, z[:, :1], pool, args, (0, 1), (0, 128), (128, 128))
    with pytest.raises(ValueError, match="scalings has dtype"):
        lora_expand_decode(y, z, pool, _args(lora, scalings=lora.scalings.half()), (0, 1),
                           (0, 128), (128, 128))
    with pytest.raises(ValueError, match="max_seg_len"):
        lora_shrink_prefill(x, pool, _args(lora, max_seg_len=0), (0,))
    with pytest.raises(ValueError, match="no segment tables"):
        lora_shrink_prefill(x, pool, _args(lora, seg_starts=None, seg_lens=None, seg_slots=None),
                            (0,))


def test_a_prepared_launch_rejects_tensors_of_another_layout(device) -> None:
    """A step's prepared launches check each layer's tensors against the first layer's."""
    adapters, lora, gen = _make_case("llama2", torch.float16, 8, "distinct", "prefill", device, 7)
    pool, tokens, args = adapters.pool, lora.token_slots.shape[0], lora.kernel_args
    x = torch.randn(tokens, 128).half().to(device)
    shrink = SgmvShrink(x, pool, args, (0, 1))
    z = shrink(x, pool)
    with pytest.raises(ValueError, match=r"x has shape \[.*; this launch was prepared for"):
        shrink(x[1:], pool)
    with pytest.raises(ValueError, match="pool has shape"):
        shrink(x, pool[:-8])
    y = torch.zeros(tokens, 256).half().to(device)
    expand = SgmvExpand(y, z, pool, args, (0, 1), (0, 128), (128, 128))
    with pytest.raises(ValueError, match="y has shape .* torch.float32"):
        expand(y.float(), z, pool)
    rows = BgmvShrink(x, pool, args, (0,))
    with pytest.raises(ValueError, match="x has shape"):
        rows(x.t().contiguous().t(), pool)  # same shape, other strides


def test_tables_are_checked_once_when_built_and_bad_ones_always_fail(device) -> None:
    """A step's tables are checked once, when its LoraArgs is built, not in every layer; a
    failing table fails every time it is given, and a wrong one of the same kind is caught."""
    from slora_kernels import lora_args

    adapters, lora, gen = _make_case("llama2", torch.float16, 8, "distinct", "decode", device, 8)
    x = torch.randn(DECODE_SEQS, 128).half().to(device)
    checked = []
    original = lora_args.check_tensor
    lora_args.check_tensor = lambda name, *a, **k: (checked.append(name), original(name, *a, **k))[1]
    try:
        args = _args(lora)
        for _ in range(3):
            lora_shrink_decode(x, adapters.pool, args, (0,))
    finally:
        lora_args.check_tensor = original
    assert checked.count("a_offsets") == 1 and checked.count("ranks") == 1
    assert checked.count("x") == 3 and checked.count("pool") == 3  # per-layer tensors: each call
    bad = lora.a_offsets.int()
    for _ in range(2):
        with pytest.raises(ValueError, match="a_offsets has dtype"):
            lora_shrink_decode(x, adapters.pool, _args(lora, a_offsets=bad), (0,))
    narrow = lora.ranks[:, :3].contiguous()  # same kind of tensor, wrong shape
    with pytest.raises(ValueError, match="a_offsets has size"):
        lora_shrink_decode(x, adapters.pool, _args(lora, ranks=narrow), (0,))


def test_tables_on_another_device_than_x_are_refused(device) -> None:
    adapters, lora, gen = _make_case("llama2", torch.float32, 8, "distinct", "decode", device, 9)
    meta = LoraArgs(*(t.to("meta") for t in (lora.ranks, lora.a_offsets, lora.b_offsets,
                                              lora.scalings)),
                    token_slots=lora.token_slots.to("meta"))
    x = torch.randn(DECODE_SEQS, 128).to(device)
    with pytest.raises(ValueError, match="the LoRA tables on meta"):
        lora_shrink_decode(x, adapters.pool, meta, (0,))
