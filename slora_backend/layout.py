"""Unified page layout: how KV blocks and adapter rows share one page pool.

A page is ``page_size`` elements in *every* layer's buffer (``pool[layer]`` is
``[num_pages, page_size]``), so one page index names the same slot in all layers and one free
list serves KV cache and adapter weights alike.

- KV: a page holds ``block_tokens`` tokens of K and V of one layer:
  ``page_size = block_tokens * 2 * num_kv_heads * head_dim``.
- Adapters: an adapter's rows (A rows of length ``in_dim`` and B^T rows of length ``out_dim``,
  per target module) are packed into pages first-fit-decreasing. Rows never straddle a page, so
  ``page_size`` must be at least the longest row; ``block_tokens`` is raised until it is.

Packing depends only on the adapter's ranks per module, not on which pages it gets, so the plan
is computed once per adapter and turned into element offsets when pages are assigned.
"""

from __future__ import annotations

from dataclasses import dataclass

from .batch import LORA_MODULES
from .model_spec import ModelSpec


@dataclass(frozen=True)
class PlannedRow:
    """Row ``index`` of a module's A (kind "a") or B^T (kind "b"), placed in the adapter's
    ``page``-th page at element ``offset``."""

    module: str
    kind: str
    index: int
    length: int
    page: int
    offset: int


@dataclass(frozen=True)
class AdapterRows:
    """The rows of one module of one adapter that a pool holds: ``a_rows`` rows of A of
    ``a_length`` elements and ``b_rows`` rows of B^T of ``b_length`` elements."""

    a_rows: int
    a_length: int
    b_rows: int
    b_length: int


@dataclass(frozen=True)
class AdapterPlan:
    """Page plan of one adapter: its page count and every row's place, ordered by (page,
    offset).

    Rows fill each page from offset 0 without gaps, and host memory keeps an adapter's rows
    concatenated in ``rows`` order: page p's content is one slice of the host rows
    (``page_fill[p]`` elements after those of pages 0 .. p - 1), so making an adapter resident
    is one plain copy per page.
    """

    num_pages: int
    rows: tuple[PlannedRow, ...]
    page_fill: tuple[int, ...]  # elements used in each page (per layer)

    @property
    def used_elements(self) -> int:
        """Elements holding weights (per layer)."""
        return sum(self.page_fill)


class PoolLayout:
    """Page geometry for one model: page size, KV block size, and adapter row packing."""

    def __init__(self, spec: ModelSpec, block_tokens: int = 16) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.spec = spec
        kv_token = 2 * self.kv_heads * spec.head_dim
        longest_row = max(max(shape.a_length, shape.b_length)
                          for shape in (self.row_shape(m, 1) for m in self.module_dims))
        while block_tokens * kv_token < longest_row:
            block_tokens *= 2
        self.block_tokens = block_tokens
        self.page_size = block_tokens * kv_token

    @property
    def kv_heads(self) -> int:
        """KV heads whose cache one pool holds (all of them; a tensor-parallel shard holds fewer)."""
        return self.spec.num_kv_heads

    def row_shape(self, module: str, rank: int) -> AdapterRows:
        """How many rows of A and B^T a rank-``rank`` adapter keeps of ``module`` in one pool, and
        their lengths: all ``rank`` rows of the full A (``in_dim``) and B^T (``out_dim``)."""
        in_dim, out_dim = self.module_dims[module]
        return AdapterRows(rank, in_dim, rank, out_dim)

    @property
    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_dim, out_dim) of every LoRA-able module."""
        s = self.spec
        q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        return {
            "q_proj": (s.hidden_size, q_dim),
            "k_proj": (s.hidden_size, kv_dim),
            "v_proj": (s.hidden_size, kv_dim),
            "o_proj": (q_dim, s.hidden_size),
            "gate_proj": (s.hidden_size, s.intermediate_size),
            "up_proj": (s.hidden_size, s.intermediate_size),
            "down_proj": (s.intermediate_size, s.hidden_size),
        }

    def kv_pages(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens of KV cache."""
        return -(-num_tokens // self.block_tokens)

    def plan_adapter(self, ranks: dict[str, int]) -> AdapterPlan:
        """Pack an adapter's rows (``ranks``: module -> rank) into as few pages as first-fit allows."""
        rows: list[tuple[int, str, str, int]] = []  # (length, module, "a"/"b", row index)
        for module, rank in ranks.items():
            shape = self.row_shape(module, rank)
            rows += [(shape.a_length, module, "a", j) for j in range(shape.a_rows)]
            rows += [(shape.b_length, module, "b", j) for j in range(shape.b_rows)]
        rows.sort(key=lambda r: (-r[0], LORA_MODULES.index(r[1]), r[2], r[3]))
        fill: list[int] = []  # elements used in each page so far
        placed: list[PlannedRow] = []
        for length, module, kind, j in rows:
            for page, used in enumerate(fill):
                if used + length <= self.page_size:
                    break
            else:
                page = len(fill)
                fill.append(0)
            placed.append(PlannedRow(module, kind, j, length, page, fill[page]))
            fill[page] += length
        placed.sort(key=lambda r: (r.page, r.offset))
        return AdapterPlan(len(fill), tuple(placed), tuple(fill))
