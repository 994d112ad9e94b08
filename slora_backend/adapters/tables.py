"""Every resident adapter's rows of the LoRA tables (``LoraBatch``).

An adapter's row - where each row of its A and B^T starts in a layer's pool, its rank per
module, its scaling, the modules it targets - depends only on its pages, so it is written once
per placement. Two keepers:

- ``SlotTables`` (the Triton kernels): device tables with a row per pool page; an adapter's
  row is its first page's, so a step's token slots index the tables directly and a step
  uploads nothing else (no per-step gather of table rows on the host).
- ``LoraTables`` (the torch references and the bmm baseline, which expect dense batch slots):
  host tables, a step gathers the rows of its adapters with one ``index_select`` per table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..batch import LORA_MODULES, MODULE_INDEX
from .gpu_cache import ResidentAdapter
from .host_store import AdapterEntry


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


def _offset_rows(entry: AdapterEntry, pages: list[int], width: int, page_size: int,
             plan_rows: tuple[_PlanRows, _PlanRows]) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's A and B^T offset rows, int64 ``[7, width]`` each (0 past its ranks)."""
    pages_t = torch.tensor(pages, dtype=torch.int64)
    out = []
    for rows in plan_rows:
        row = torch.zeros(len(LORA_MODULES), width, dtype=torch.int64)
        row[rows.module, rows.index] = pages_t[rows.page] * page_size + rows.offset
        out.append(row)
    return out[0], out[1]


def _module_ranks(entry: AdapterEntry) -> list[int]:
    return [entry.ranks.get(m, 0) for m in LORA_MODULES]


class _PlanCache:
    """A plan is a function of the adapter's ranks (PoolLayout.plan_adapter): its table entries
    are worked out once per rank set. Writing them one element at a time cost ~0.5 ms per
    adapter (Llama-2-7B, rank 8 on q/k/v/o), ~4 ms in an S1 step that admits new adapters."""

    def __init__(self) -> None:
        self._rows: dict[tuple, tuple[_PlanRows, _PlanRows]] = {}

    def rows(self, entry: AdapterEntry) -> tuple[_PlanRows, _PlanRows]:
        key = tuple(entry.ranks.items())
        cached = self._rows.get(key)
        if cached is None:
            def rows(kind: str) -> _PlanRows:
                mine = [r for r in entry.plan.rows if r.kind == kind]
                return _PlanRows(*(torch.tensor(v, dtype=torch.int64) for v in (
                    [MODULE_INDEX[r.module] for r in mine], [r.index for r in mine],
                    [r.page for r in mine], [r.offset for r in mine])))

            cached = self._rows[key] = (rows("a"), rows("b"))
        return cached


class SlotTables:
    """Device tables indexed by pool page: a resident adapter's row is its first page's (no two
    resident adapters share a page, so the row is its own while it stays resident), written the
    first time a step uses that placement. ``width`` rank columns, a power of two >= 8 (so every
    CUDA-graph rank bucket fits); an adapter of a larger rank widens the tables into new tensors
    and bumps ``version`` (graphs that captured the old tensors must be dropped)."""

    def __init__(self, num_pages: int, page_size: int, device: torch.device) -> None:
        self.page_size = page_size
        self.device = device
        m = len(LORA_MODULES)
        self.ranks = torch.zeros(num_pages, m, dtype=torch.int32, device=device)
        self.scalings = torch.zeros(num_pages, dtype=torch.float32, device=device)
        self.a = torch.zeros(num_pages, m, 8, dtype=torch.int64, device=device)
        self.b = torch.zeros_like(self.a)
        self.version = 0
        self._placed: dict[int, ResidentAdapter] = {}  # slot -> the placement its row holds
        self._plans = _PlanCache()
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def width(self) -> int:
        return int(self.a.shape[2])

    @staticmethod
    def slot(resident: ResidentAdapter) -> int:
        return resident.pages[0]

    def ensure_width(self, rank: int) -> None:
        width = self.width
        while width < rank:
            width *= 2
        if width == self.width:
            return
        grow = (0, width - self.width)
        self.a, self.b = F.pad(self.a, grow), F.pad(self.b, grow)
        self._views.clear()
        self.version += 1

    def write(self, adapters: list[tuple[ResidentAdapter, AdapterEntry]]) -> None:
        """Write the rows of the placements among ``adapters`` not written yet (one indexed copy
        per table for all of them: a step that admits tens of new adapters makes 4 uploads)."""
        new = [(r, e) for r, e in adapters if self._placed.get(self.slot(r)) is not r]
        if not new:
            return
        self.ensure_width(max(e.rank for _, e in new))
        rows = [_offset_rows(e, r.pages, self.width, self.page_size, self._plans.rows(e))
                for r, e in new]
        index = torch.tensor([self.slot(r) for r, _ in new], dtype=torch.int64)
        ranks = torch.tensor([_module_ranks(e) for _, e in new], dtype=torch.int32)
        scalings = torch.tensor([e.scaling for _, e in new], dtype=torch.float32)
        a, b = torch.stack([a for a, _ in rows]), torch.stack([b for _, b in rows])
        # (copies that do not wait for the step in flight: this one is built while it runs)
        index = index.to(self.device, non_blocking=True)
        for table, values in ((self.a, a), (self.b, b), (self.ranks, ranks),
                              (self.scalings, scalings)):
            table.index_copy_(0, index, values.to(self.device, non_blocking=True))
        for r, _ in new:
            self._placed[self.slot(r)] = r

    def offsets(self, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The A and B^T offset tables cut to ``max_rank`` columns (views, cached per width)."""
        views = self._views.get(max_rank)
        if views is None:
            views = self._views[max_rank] = (self.a[:, :, :max_rank], self.b[:, :, :max_rank])
        return views


class LoraTables:
    """Host tables with one row per adapter that has been resident (rows are reused when an
    adapter comes back, and freed by ``forget``); ``width`` rank columns, the largest rank seen
    (columns past an adapter's rank are 0 and never read)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._row: dict[str, tuple[int, ResidentAdapter]] = {}  # name -> row, placement it holds
        self._plans = _PlanCache()
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
        self.a[row], self.b[row] = _offset_rows(entry, resident.pages, self.width, self.page_size,
                                            self._plans.rows(entry))
        self.ranks[row] = torch.tensor(_module_ranks(entry), dtype=torch.int32)
        self.scalings[row] = entry.scaling
        self._max_rank[row] = entry.rank
        self._targets[row] = sum(1 << m for m in entry.targets)
