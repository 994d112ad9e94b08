"""Every resident adapter's rows of a step's LoRA tables (``LoraBatch``), kept in host tensors.

An adapter's row - where each row of its A and B^T starts in a layer's pool, its rank per
module, its scaling, the modules it targets - depends only on its pages, so it is written once
when the adapter becomes resident, and a step gathers the rows of its adapters with one
``index_select`` per table. Stacking one small tensor per adapter instead cost 1.2 ms per decode
step of 256 adapters on the CI machine (1.6 ms on the H200's host, 6% of the step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapter_cache import ResidentAdapter
from .adapter_store import AdapterEntry
from .batch import LORA_MODULES, MODULE_INDEX


@dataclass(frozen=True)
class GatheredRows:
    """A step's tables, one row per batch slot (see ``LoraBatch``)."""

    a_offsets: torch.Tensor  # int64 [n, 7, max_rank]
    b_offsets: torch.Tensor  # int64 [n, 7, max_rank]
    ranks: torch.Tensor  # int32 [n, 7]
    scalings: torch.Tensor  # float32 [n]
    max_rank: int
    targets: frozenset[int]  # module indices some slot has LoRA on


@dataclass(frozen=True)
class _PlanRows:
    """One table's entries of an adapter plan: entry (module[i], index[i]) holds the pool
    offset of the row in the adapter's page ``page[i]`` at ``offset[i]``."""

    module: torch.Tensor
    index: torch.Tensor
    page: torch.Tensor
    offset: torch.Tensor


class LoraTables:
    """Host tables with one row per adapter that has been resident (rows are reused when an
    adapter comes back, and freed by ``forget``); ``width`` rank columns, the largest rank seen
    (columns past an adapter's rank are 0 and never read)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._row: dict[str, tuple[int, ResidentAdapter]] = {}  # name -> row, placement it holds
        # A plan is a function of the adapter's ranks (PoolLayout.plan_adapter): its entries are
        # worked out once per rank set. Writing them one element at a time cost ~0.5 ms per
        # adapter (Llama-2-7B, rank 8 on q/k/v/o), ~4 ms in an S1 step that admits new adapters.
        self._plan_rows: dict[tuple, tuple[_PlanRows, _PlanRows]] = {}
        self._free: list[int] = []
        m = len(LORA_MODULES)
        self.a = torch.zeros(0, m, 1, dtype=torch.int64)
        self.b = torch.zeros(0, m, 1, dtype=torch.int64)
        self.ranks = torch.zeros(0, m, dtype=torch.int32)
        self.scalings = torch.zeros(0, dtype=torch.float32)
        self._max_rank: list[int] = []
        self._targets: list[int] = []  # bit i set: module i is a target

    @property
    def width(self) -> int:
        return int(self.a.shape[2])

    def gather(self, adapters: list[tuple[ResidentAdapter, AdapterEntry]]) -> GatheredRows:
        """The rows of ``adapters`` in order (slot i = adapters[i]), writing any row whose
        adapter is new or has moved to other pages since."""
        index = [self._row_of(resident, entry) for resident, entry in adapters]
        max_rank = max(self._max_rank[i] for i in index)
        targets = 0
        for i in index:
            targets |= self._targets[i]
        rows = torch.tensor(index, dtype=torch.int64)
        return GatheredRows(
            a_offsets=self.a[:, :, :max_rank].index_select(0, rows),
            b_offsets=self.b[:, :, :max_rank].index_select(0, rows),
            ranks=self.ranks.index_select(0, rows),
            scalings=self.scalings.index_select(0, rows),
            max_rank=max_rank,
            targets=frozenset(m for m in range(len(LORA_MODULES)) if targets >> m & 1),
        )

    def forget(self, name: str) -> None:
        """Free ``name``'s row (the adapter was unloaded)."""
        held = self._row.pop(name, None)
        if held is not None:
            self._free.append(held[0])

    def _row_of(self, resident: ResidentAdapter, entry: AdapterEntry) -> int:
        held = self._row.get(resident.name)
        if held is not None and held[1] is resident:  # a new placement is a new object
            return held[0]
        row = held[0] if held is not None else self._new_row()
        self._write(row, resident, entry)
        self._row[resident.name] = (row, resident)
        return row

    def _new_row(self) -> int:
        if self._free:
            return self._free.pop()
        row = self.a.shape[0]
        grow = max(16, row)  # doubling: amortised O(1) per adapter
        self._free += range(row + grow - 1, row, -1)  # the new rows past this one, lowest last
        self.a = F.pad(self.a, (0, 0, 0, 0, 0, grow))
        self.b = F.pad(self.b, (0, 0, 0, 0, 0, grow))
        self.ranks = F.pad(self.ranks, (0, 0, 0, grow))
        self.scalings = F.pad(self.scalings, (0, grow))
        self._max_rank += [0] * grow
        self._targets += [0] * grow
        return row

    def _write(self, row: int, resident: ResidentAdapter, entry: AdapterEntry) -> None:
        extra = entry.rank - self.width
        if extra > 0:
            self.a = F.pad(self.a, (0, extra))
            self.b = F.pad(self.b, (0, extra))
        pages = torch.tensor(resident.pages, dtype=torch.int64)
        for table, rows in zip((self.a, self.b), self._rows_of_plan(entry)):
            table[row] = 0
            table[row, rows.module, rows.index] = pages[rows.page] * self.page_size + rows.offset
        self.ranks[row] = torch.tensor([entry.ranks.get(m, 0) for m in LORA_MODULES],
                                       dtype=torch.int32)
        self.scalings[row] = entry.scaling
        self._max_rank[row] = entry.rank
        self._targets[row] = sum(1 << m for m in entry.targets)

    def _rows_of_plan(self, entry: AdapterEntry) -> tuple[_PlanRows, _PlanRows]:
        key = tuple(entry.ranks.items())
        cached = self._plan_rows.get(key)
        if cached is None:
            def rows(kind: str) -> _PlanRows:
                mine = [r for r in entry.plan.rows if r.kind == kind]
                return _PlanRows(*(torch.tensor(v, dtype=torch.int64) for v in (
                    [MODULE_INDEX[r.module] for r in mine], [r.index for r in mine],
                    [r.page for r in mine], [r.offset for r in mine])))

            cached = self._plan_rows[key] = (rows("a"), rows("b"))
        return cached
