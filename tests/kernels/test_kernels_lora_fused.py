"""The one-launch decode LoRA kernel (``lora_decode_fused``) against the two references in
sequence (``lora_shrink_ref`` then ``lora_expand_ref``): dtype x rank (mixed ranks in one
batch included) with tiles small enough that a program loops over several K chunks, rank blocks
and column blocks; then model shapes x adapter popularity over the four fused module groups
with the default tiles (the CPU interpreter makes small tiles on wide shapes slow)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, MODULE_GROUPS, POPULARITIES, SHAPES, TOLERANCES, module_dims
from slora_kernels.lora_decode_fused import lora_decode_fused
from slora_kernels.lora_reference import lora_expand_ref, lora_shrink_ref
from test_kernels_lora import _make_case

SMALL_TILES = {"BLOCK_R": 4, "BLOCK_K": 64, "BLOCK_N": 64}  # llama2 shape: 2 K chunks, 2+ col blocks


def _check_fused(shape_name, group, adapters, lora, dtype, gen, device, tiles=None) -> None:
    mods = MODULE_GROUPS[group]
    dims = module_dims(SHAPES[shape_name])
    in_dim = dims[mods[0]][0]
    out_dims = [dims[m][1] for m in mods]
    starts = [sum(out_dims[:i]) for i in range(len(mods))]
    num_tokens = lora.token_slots.shape[0]
    # x and y are column slices of wider buffers: row strides differ from their widths.
    x = torch.randn(num_tokens, in_dim + 5, generator=gen)[:, 2:2 + in_dim].to(dtype).to(device)
    y_wide = torch.randn(num_tokens, sum(out_dims) + 3, generator=gen).to(dtype).to(device)
    y0 = y_wide[:, 1:1 + sum(out_dims)]
    pool = adapters.pool
    z_ref = lora_shrink_ref(x, pool, lora.token_slots, lora.ranks, lora.a_offsets, mods)
    y_ref = y0.clone()
    lora_expand_ref(y_ref, z_ref, pool, lora.token_slots, lora.ranks, lora.b_offsets,
                    lora.scalings, mods, starts, out_dims)
    y_kernel = y_wide.clone()
    y_view = y_kernel[:, 1:1 + sum(out_dims)]
    lora_decode_fused(y_view, x, pool, lora.token_slots, lora.ranks, lora.a_offsets,
                      lora.b_offsets, lora.scalings, mods, starts, out_dims, tiles=tiles)
    torch.testing.assert_close(y_view, y_ref, **TOLERANCES[dtype])
    # Columns outside the slice and base-model rows are not touched at all.
    assert torch.equal(y_kernel[:, 0], y_wide[:, 0])
    assert torch.equal(y_kernel[:, -2:], y_wide[:, -2:])
    base = lora.token_slots < 0
    assert torch.equal(y_view[base], y0[base])


@pytest.mark.parametrize("rank", [8, 16, "mixed"], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_fused_rank_dtype(dtype_name: str, rank, device) -> None:
    dtype = DTYPES[dtype_name]
    adapters, lora, gen = _make_case("llama2", dtype, rank, "base_mixed", "decode", device, seed=3)
    _check_fused("llama2", "qkv", adapters, lora, dtype, gen, device, tiles=SMALL_TILES)


@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_fused_shape_popularity(shape_name: str, popularity: str, device) -> None:
    index = list(SHAPES).index(shape_name) * len(POPULARITIES) + POPULARITIES.index(popularity)
    dtype = list(DTYPES.values())[index % len(DTYPES)]
    adapters, lora, gen = _make_case(shape_name, dtype, "mixed", popularity, "decode", device,
                                     seed=200 + index)
    groups = ("qkv", "down") if index % 2 else ("gate_up", "o")
    for group in groups:
        _check_fused(shape_name, group, adapters, lora, dtype, gen, device)


def test_fused_rejects_bad_arguments(device) -> None:
    adapters, lora, gen = _make_case("llama2", torch.float16, 8, "distinct", "decode", device, 7)
    x = torch.randn(lora.token_slots.shape[0], 128).half().to(device)
    y = torch.zeros(x.shape[0], 256).half().to(device)
    tables = (adapters.pool, lora.token_slots, lora.ranks, lora.a_offsets)
    with pytest.raises(ValueError, match="y has dtype"):
        lora_decode_fused(y.float(), x, *tables, lora.b_offsets, lora.scalings, (0, 1),
                          (0, 128), (128, 128))
    with pytest.raises(ValueError, match="b_offsets has shape"):
        lora_decode_fused(y, x, *tables, lora.b_offsets[:, :, :4].contiguous(), lora.scalings,
                          (0, 1), (0, 128), (128, 128))
    with pytest.raises(ValueError, match="does not fit"):
        lora_decode_fused(y, x, *tables, lora.b_offsets, lora.scalings, (0, 1), (0, 200),
                          (128, 128))
