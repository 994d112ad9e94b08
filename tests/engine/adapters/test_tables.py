"""LoraTables / SlotTables: each resident adapter's rows written once per placement; gathered
per step (host tables) or indexed in place by the adapter's first page (device tables)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from slora_backend.adapters.gpu_cache import ResidentAdapter
from slora_backend.adapters.tables import LoraTables, SlotTables
from slora_backend.batch import MODULE_INDEX

PAGE = 1000


def _entry(ranks: dict[str, int], scaling: float) -> SimpleNamespace:
    """An adapter entry whose plan puts row j of module m's A at page 0, offset 10 * j (+ 100 *
    module index), B^T rows 500 further on."""
    rows = [SimpleNamespace(kind=kind, module=m, index=j, page=0,
                            offset=100 * MODULE_INDEX[m] + 10 * j + (500 if kind == "b" else 0))
            for m, r in ranks.items() for kind in "ab" for j in range(r)]
    return SimpleNamespace(rank=max(ranks.values()), ranks=ranks, scaling=scaling,
                           targets=frozenset(MODULE_INDEX[m] for m in ranks),
                           plan=SimpleNamespace(rows=rows))


def test_rows_follow_placements_and_ranks():
    tables = LoraTables(PAGE)
    small, big = _entry({"q_proj": 2, "v_proj": 2}, 0.5), _entry({"o_proj": 8, "up_proj": 4}, 2.0)
    a, b = ResidentAdapter("a", [3]), ResidentAdapter("b", [7])
    rows = tables.gather([(a, small)])
    assert rows.max_rank == 2 and rows.targets == {0, 2}
    assert rows.a_offsets[0, 0].tolist() == [3000, 3010] and rows.b_offsets[0, 2].tolist() == [3700, 3710]
    assert rows.ranks[0].tolist() == [2, 0, 2, 0, 0, 0, 0] and rows.scalings.tolist() == [0.5]

    rows = tables.gather([(b, big), (a, small)])  # a wider adapter widens the tables
    assert rows.max_rank == 8 and rows.targets == {0, 2, 3, 5}
    assert rows.a_offsets.shape == (2, 7, 8) and rows.a_offsets.is_contiguous()
    assert rows.a_offsets[0, 3].tolist() == [7300 + 10 * j for j in range(8)]
    assert rows.a_offsets[1, 0].tolist() == [3000, 3010] + [0] * 6  # past its rank: 0
    assert rows.scalings.tolist() == [2.0, 0.5]

    moved = ResidentAdapter("a", [9])  # evicted and made resident again, elsewhere
    rows = tables.gather([(moved, small)])
    assert rows.max_rank == 2 and rows.a_offsets[0, 0].tolist() == [9000, 9010]


def test_rows_are_reused_after_forget_and_tables_grow():
    tables = LoraTables(PAGE)
    entry = _entry({"k_proj": 4}, 1.0)
    residents = [ResidentAdapter(f"x{i}", [i]) for i in range(40)]  # past the first 16 rows
    rows = tables.gather([(r, entry) for r in residents])
    assert [int(v) for v in rows.a_offsets[:, 1, 0]] == [PAGE * i + 100 for i in range(40)]
    capacity = tables.a.shape[0]
    tables.forget("x5")
    again = ResidentAdapter("new", [77])
    rows = tables.gather([(again, entry), (residents[6], entry)])
    assert tables.a.shape[0] == capacity  # the freed row was taken
    assert rows.a_offsets[:, 1, 0].tolist() == [77100, 6100]
    assert torch.equal(rows.ranks[0], rows.ranks[1])


def test_slot_rows_follow_placements_and_widen():
    tables = SlotTables(num_pages=12, page_size=PAGE, device=torch.device("cpu"))
    small, big = _entry({"q_proj": 2, "v_proj": 2}, 0.5), _entry({"o_proj": 16}, 2.0)
    a = ResidentAdapter("a", [3, 4])
    tables.write([(a, small)])
    assert SlotTables.slot(a) == 3 and tables.width == 8 and tables.version == 0
    a_off, b_off = tables.offsets(2)
    assert a_off.shape == (12, 7, 2) and a_off.stride(0) == 7 * 8  # a view of the wide table
    assert a_off[3, 0].tolist() == [3000, 3010] and b_off[3, 2].tolist() == [3700, 3710]
    assert tables.ranks[3].tolist() == [2, 0, 2, 0, 0, 0, 0] and tables.scalings[3] == 0.5
    assert tables.ranks[4].tolist() == [0] * 7  # only the first page's row is the adapter's

    tables.a[3, 0, 0] = -1  # a written placement is not written again
    tables.write([(a, small)])
    assert tables.a[3, 0, 0] == -1

    # "a" evicted; "b" (rank 16) placed on page 3 next to page 9: its row replaces a's,
    # the tables widen to 16 columns (new tensors, a new version) and keep the other rows
    c = ResidentAdapter("c", [7])
    tables.write([(c, small)])
    b = ResidentAdapter("b", [3, 9])
    tables.write([(b, big)])
    assert tables.width == 16 and tables.version == 1
    assert tables.a[3, 3].tolist() == [3300 + 10 * j for j in range(16)]
    assert tables.ranks[3].tolist() == [0, 0, 0, 16, 0, 0, 0] and tables.scalings[3] == 2.0
    assert tables.a[7, 0].tolist() == [7000, 7010] + [0] * 14
    assert tables.offsets(16)[0].data_ptr() == tables.a.data_ptr()


def test_segments_merge_runs_of_one_adapter_but_not_across_the_decode_rows():
    from slora_backend.batch import slot_segments

    # decode rows 0-3 (slots 2, 2, -1, 1), then prompts of 5 (slot 1), 3 (slot 1), 4 (base), 2 (slot 0)
    runs = [(0, 1, 2), (1, 1, 2), (2, 1, -1), (3, 1, 1), (4, 5, 1), (9, 3, 1), (12, 4, -1), (16, 2, 0)]
    assert slot_segments(runs, decode_tokens=4) == ([0, 3, 4, 16], [2, 1, 8, 2], [2, 1, 1, 0], 2)
    assert slot_segments(runs) == ([0, 3, 16], [2, 9, 2], [2, 1, 0], 0)  # no split: 3-11 merge


def test_block_tables_are_padded_with_zeros():
    from slora_backend.batch import padded_block_tables

    tables = padded_block_tables([[4, 9, 2], [], [7], [1, 2, 3, 5]])
    assert tables.dtype == torch.int32
    assert tables.tolist() == [[4, 9, 2, 0], [0, 0, 0, 0], [7, 0, 0, 0], [1, 2, 3, 5]]
    assert padded_block_tables([[]]).shape == (1, 0)
