"""Turns a scheduled step into tensors, runs the model over the pool, returns logits.

The only place where requests become tensors. It also owns the pool tensor and copies the
weights of newly resident adapters into their pages.
"""

from __future__ import annotations

from contextlib import nullcontext as _nullcontext

import torch

from .adapter_cache import ResidentAdapter
from .adapter_store import AdapterStore
from .batch import LORA_MODULES, AttentionBatch, LoraBatch
from .cuda_graphs import DecodeGraphs
from .layout import PoolLayout
from .models.llama import ForwardContext, LlamaModel
from .scheduler import ScheduledRequest


class ModelRunner:
    def __init__(
        self, model: LlamaModel, layout: PoolLayout, num_pages: int, ops: object,
        store: AdapterStore, device: torch.device, dtype: torch.dtype,
        graphs_for: tuple[int, int] | None = None,
    ) -> None:
        """``graphs_for``: (max batch, max model length) to replay decode steps from CUDA graphs."""
        self.model = model
        self.layout = layout
        self.ops = ops
        self.store = store
        self.device = device
        spec = layout.spec
        self.pool = torch.zeros(spec.num_layers, num_pages, layout.page_size, dtype=dtype, device=device)
        self.kv_shape = (2, layout.block_tokens, spec.num_kv_heads, spec.head_dim)
        self._offsets: dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = {}
        # Prefetched adapters are copied on a side stream while the current step computes;
        # the next step waits for those copies before it touches the pool.
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._copies_in_flight: list[torch.cuda.Event] = []
        self.graphs = None
        if graphs_for is not None and device.type == "cuda":
            self.graphs = DecodeGraphs(model, ops, self.pool, self.kv_shape, *graphs_for)

    # ---- adapters -----------------------------------------------------------------------------

    def load_adapters(self, pending: list[ResidentAdapter], overlap: bool = False) -> None:
        """Copy host weights of newly resident adapters into their pool pages (one scatter each).

        With ``overlap`` (prefetch) the copies go on the side stream, to overlap the step in flight.
        """
        if not pending:
            return
        side = overlap and self.copy_stream is not None
        if not side:
            self._wait_for_copies()
        with torch.cuda.stream(self.copy_stream) if side else _nullcontext():
            for resident in pending:
                weights = self.store.weights(resident.name)
                index = self._scatter_index(resident)
                src = weights.to(self.device, non_blocking=True)
                self.pool.view(self.pool.shape[0], -1)[:, index] = src
            if side:
                event = torch.cuda.Event()
                event.record(self.copy_stream)
                self._copies_in_flight.append(event)

    def _wait_for_copies(self) -> None:
        """Order the compute stream after every side-stream copy (their pages may be reused)."""
        for event in self._copies_in_flight:
            torch.cuda.current_stream(self.device).wait_event(event)
        self._copies_in_flight.clear()

    def _scatter_index(self, resident: ResidentAdapter) -> torch.Tensor:
        plan = self.store.get(resident.name).plan
        page_size = self.layout.page_size
        starts = torch.tensor(
            [resident.pages[r.page] * page_size + r.offset for r in plan.rows], dtype=torch.int64
        )
        lengths = torch.tensor([r.length for r in plan.rows], dtype=torch.int64)
        # element k of row i lands at starts[i] + k
        base = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
        return (base + torch.arange(int(lengths.sum()))).to(self.device)

    def _adapter_offsets(self, resident: ResidentAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_offsets, b_offsets) as [7, rank] host tensors for a resident adapter, memoised."""
        cached = self._offsets.get(resident.name)
        if cached is not None and cached[0] == tuple(resident.pages):
            return cached[1], cached[2]
        entry = self.store.get(resident.name)
        rank = entry.rank
        a = torch.zeros(len(LORA_MODULES), rank, dtype=torch.int64)
        b = torch.zeros(len(LORA_MODULES), rank, dtype=torch.int64)
        page_size = self.layout.page_size
        for r in entry.plan.rows:
            table = a if r.kind == "a" else b
            table[LORA_MODULES.index(r.module), r.index] = resident.pages[r.page] * page_size + r.offset
        self._offsets[resident.name] = (tuple(resident.pages), a, b)
        return a, b

    # ---- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledRequest], residents: dict[str, ResidentAdapter]
    ) -> torch.Tensor:
        """Run one step. Returns fp32 logits for the requests that sample, in ``scheduled`` order."""
        self._wait_for_copies()
        block_tokens = self.layout.block_tokens
        use_graph = (
            self.graphs is not None
            and all(s.num_new_tokens == 1 and s.samples for s in scheduled)
            and self.graphs.fits(len(scheduled), self._max_rank(scheduled))
        )
        # A graph replay copies host-built metadata into its own static tensors.
        dev = torch.device("cpu") if use_graph else self.device
        # Group tokens of the same adapter together so prefill LoRA sees long segments.
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].request.adapter or "")
        input_ids: list[int] = []
        positions: list[int] = []
        kv_slots: list[int] = []
        query_starts = [0]
        context_lens: list[int] = []
        token_slots: list[int] = []
        slot_of: dict[str, int] = {}
        sample_rows_by_index: dict[int, int] = {}
        for i in order:
            s = scheduled[i]
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            input_ids += r.token_slice(start, end)
            positions += range(start, end)
            kv_slots += [r.block_table[p // block_tokens] * block_tokens + p % block_tokens
                         for p in range(start, end)]
            query_starts.append(query_starts[-1] + s.num_new_tokens)
            context_lens.append(end)
            slot = -1 if r.adapter is None else slot_of.setdefault(r.adapter, len(slot_of))
            token_slots += [slot] * s.num_new_tokens
            if s.samples:
                sample_rows_by_index[i] = query_starts[-1] - 1
        sample_rows = [sample_rows_by_index[i] for i in range(len(scheduled)) if i in sample_rows_by_index]

        max_blocks = max(len(scheduled[i].request.block_table) for i in order)
        tables = torch.tensor([bt + [0] * (max_blocks - len(bt))
                               for bt in (scheduled[i].request.block_table for i in order)],
                              dtype=torch.int32)
        q_lens = [scheduled[i].num_new_tokens for i in order]
        attn = AttentionBatch(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            query_starts=torch.tensor(query_starts, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            kv_slots=torch.tensor(kv_slots, dtype=torch.int64, device=dev),
            max_query_len=max(q_lens),
            max_context_len=max(context_lens),
            is_decode=max(q_lens) == 1,
            query_starts_host=query_starts,
            context_lens_host=context_lens,
        )
        lora = (self._lora_batch(slot_of, token_slots, residents, attn.is_decode, dev)
                if slot_of else None)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        if use_graph:
            return self.graphs.run(ids, attn, lora).index_select(0, rows)
        ctx = ForwardContext(self.ops, attn, lora, self.pool, self.kv_shape)
        return self.model(ids, ctx, rows)

    def _max_rank(self, scheduled: list[ScheduledRequest]) -> int:
        return max((self.store.get(s.request.adapter).rank for s in scheduled
                    if s.request.adapter is not None), default=0)

    def _lora_batch(
        self, slot_of: dict[str, int], token_slots: list[int],
        residents: dict[str, ResidentAdapter], is_decode: bool, dev: torch.device,
    ) -> LoraBatch:
        entries = [self.store.get(name) for name in slot_of]
        max_rank = max(e.rank for e in entries)
        n = len(entries)
        a_off = torch.zeros(n, len(LORA_MODULES), max_rank, dtype=torch.int64)
        b_off = torch.zeros(n, len(LORA_MODULES), max_rank, dtype=torch.int64)
        ranks = torch.zeros(n, len(LORA_MODULES), dtype=torch.int32)
        for slot, entry in enumerate(entries):
            a, b = self._adapter_offsets(residents[entry.name])
            a_off[slot, :, : entry.rank] = a
            b_off[slot, :, : entry.rank] = b
            for module, rank in entry.ranks.items():
                ranks[slot, LORA_MODULES.index(module)] = rank
        # Segments: maximal runs of equal slot >= 0 (tokens are already grouped by adapter).
        seg_starts, seg_lens, seg_slots = [], [], []
        for i, slot in enumerate(token_slots):
            if slot < 0:
                continue
            if seg_slots and seg_slots[-1] == slot and seg_starts[-1] + seg_lens[-1] == i:
                seg_lens[-1] += 1
            else:
                seg_starts.append(i)
                seg_lens.append(1)
                seg_slots.append(slot)
        return LoraBatch(
            token_slots=torch.tensor(token_slots, dtype=torch.int32, device=dev),
            ranks=ranks.to(dev),
            scalings=torch.tensor([e.scaling for e in entries], dtype=torch.float32, device=dev),
            a_offsets=a_off.to(dev),
            b_offsets=b_off.to(dev),
            max_rank=max_rank,
            seg_starts=torch.tensor(seg_starts, dtype=torch.int32, device=dev),
            seg_lens=torch.tensor(seg_lens, dtype=torch.int32, device=dev),
            seg_slots=torch.tensor(seg_slots, dtype=torch.int32, device=dev),
            max_seg_len=max(seg_lens),
            is_decode=is_decode,
        )
