"""Turns a scheduled step into tensors, runs the model over the pool, returns logits.

The only place where requests become tensors. It also owns the pool tensor and copies the
weights of newly resident adapters into their pages.
"""

from __future__ import annotations

from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass

import torch

from .adapters.gpu_cache import ResidentAdapter
from .adapters.host_store import AdapterStore
from .adapters.tables import LoraTables, SlotTables
from .batch import AttentionBatch, LoraBatch, padded_block_tables, slot_segments
from .cuda_graphs import DecodeGraphs
from .layout import PoolLayout
from .models.llama import ForwardContext, LlamaModel
from .ops import Ops
from .piecewise_graphs import PiecewiseGraphs
from .scheduler import ScheduledRequest
from .step_clock import CopyClock


def _upload(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device``, without waiting for the compute stream: a blocking
    copy would hold the host until the step in flight has finished - the very time it should
    spend building the next step."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)


@dataclass(frozen=True)
class PendingTokens:
    """The tokens a launched step sampled, still on the device: a request whose last token is
    one of them (``Request.num_pending_tokens``) reads it from ``tokens[rows[request_id]]``."""

    tokens: torch.Tensor  # int64 [rows], on the engine's device
    rows: dict[str, int]


class ModelRunner:
    def __init__(
        self, model: LlamaModel, layout: PoolLayout, num_pages: int, ops: Ops,
        store: AdapterStore, device: torch.device, dtype: torch.dtype,
        graphs_for: tuple[int, int] | None = None,
        piecewise_for: tuple[int, int, int] | None = None,
    ) -> None:
        """``graphs_for``: (max batch, max model length) to replay decode steps from CUDA graphs;
        ``piecewise_for``: (max batch, max tokens, token bucket spacing) to replay the other
        steps from piecewise CUDA graphs (attention eager between the pieces)."""
        self.model = model
        self.layout = layout
        self.ops = ops
        self.store = store
        self.device = device
        spec = model.spec  # (a tensor-parallel rank's own shape: its KV heads)
        self.pool = torch.zeros(spec.num_layers, num_pages, layout.page_size, dtype=dtype, device=device)
        self.kv_shape = (2, layout.block_tokens, spec.num_kv_heads, spec.head_dim)
        # Every resident adapter's rows of the LoRA tables: on the device, indexed by the
        # adapter's first page, for ops that take such slots (the Triton kernels); else on the
        # host, a step gathering its adapters' rows into dense batch slots.
        self.slot_tables = (SlotTables(num_pages, layout.page_size, device)
                            if ops.global_slots else None)
        self.lora_tables = LoraTables(layout.page_size) if self.slot_tables is None else None
        # Adapters are copied in on a side stream, overlapping the step in flight; the engine
        # orders each step after the copies of the adapters it reads (AdapterCopier.wait).
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copy_clock = CopyClock()  # the copy stream's seconds in adapter copies
        self.graphs = None
        if graphs_for is not None and device.type == "cuda":
            self.graphs = DecodeGraphs(model, ops, self.pool, self.kv_shape, *graphs_for,
                                       slot_tables=self.slot_tables)
        self.piecewise: PiecewiseGraphs | None = None
        if piecewise_for is not None and device.type == "cuda":
            self.piecewise = PiecewiseGraphs(model, ops, self.pool, self.kv_shape, *piecewise_for,
                                             slot_tables=self.slot_tables)

    # ---- adapters -----------------------------------------------------------------------------

    def copy_adapter(self, resident: ResidentAdapter,
                     after: torch.cuda.Event | None = None) -> torch.cuda.Event | None:
        """Copy the host weights of a newly resident adapter into its pool pages.

        The host rows are in page order (``AdapterPlan``), so each page is one plain copy of a
        slice (an element-wise scatter built and read an int64 index per element: ~4x the
        adapter's bytes of index traffic on the GPU for every load).

        On CUDA the copy goes on the side stream (it may run on a helper thread, see
        ``AdapterCopier``) and the returned event marks its end: the compute stream must wait
        for it before it reads those pages or reuses them. ``after``: a compute-stream event
        the copy must wait for (a step that may still write those pages).
        """
        weights = self.store.weights(resident.name)
        page_fill = self.store.get(resident.name).plan.page_fill
        with torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else _nullcontext():
            if after is not None:
                self.copy_stream.wait_event(after)
            if self.copy_stream is not None and not weights.is_pinned():
                # Stage through pinned memory (torch's caching host allocator: a few blocks,
                # each reused once its copy is done). A copy straight from pageable memory
                # holds the CUDA driver's staging path for its whole 1.5 ms, and the engine
                # thread's own small copies (a step's metadata) queue behind it.
                weights = weights.pin_memory()
            begin = self.copy_clock.begin(self.copy_stream)
            src = weights.to(self.device, non_blocking=True)
            start = 0
            for page, used in zip(resident.pages, page_fill):
                self.pool[:, page, :used].copy_(src[:, start:start + used])
                start += used
            if self.copy_stream is None:
                return None
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.copy_stream)
            self.copy_clock.end(begin, event)
            return event

    def forget_adapter(self, name: str) -> None:
        """``name`` was unloaded: free its row of the host LoRA tables (device slot rows need
        no freeing)."""
        if self.lora_tables is not None:
            self.lora_tables.forget(name)

    # ---- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledRequest], residents: dict[str, ResidentAdapter],
        pending: PendingTokens | None = None,
    ) -> torch.Tensor:
        """Run one step. Returns fp32 logits for the requests that sample, in ``scheduled`` order.
        ``pending``: the tokens of the step launched before this one, which some of this step's
        inputs are (copied on the device: the host has not read them yet)."""
        block_tokens = self.layout.block_tokens
        max_rank = max((self.store.get(name).rank for name in residents), default=0)
        use_graph = (
            self.graphs is not None
            and all(s.num_new_tokens == 1 and s.samples for s in scheduled)
            and self.graphs.fits(len(scheduled), max_rank)
        )
        decode_tokens = sum(1 for s in scheduled if s.num_new_tokens == 1)
        use_pieces = (
            not use_graph and self.piecewise is not None
            and self.piecewise.fits(sum(s.num_new_tokens for s in scheduled), len(scheduled),
                                    len(scheduled) - decode_tokens, max_rank)
        )
        # A graph replay copies host-built metadata into its own static tensors.
        dev = torch.device("cpu") if use_graph else self.device
        # One-token (decode) sequences first, then prompts; within each, tokens of one adapter
        # together so prefill LoRA sees long segments (see LoraBatch.decode_tokens).
        order = sorted(range(len(scheduled)), key=lambda i: (
            scheduled[i].num_new_tokens > 1, scheduled[i].request.adapter or ""))
        input_ids: list[int] = []
        positions: list[int] = []
        kv_slots: list[int] = []
        query_starts = [0]
        context_lens: list[int] = []
        token_slots: list[int] = []
        runs: list[tuple[int, int, int]] = []  # (first token, tokens, slot) per sequence
        slot_of: dict[str, int] = {}
        sample_rows_by_index: dict[int, int] = {}
        patch_at: list[int] = []  # positions of input_ids still being sampled, and their rows
        patch_from: list[int] = []
        for i in order:
            s = scheduled[i]
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            input_ids += r.token_slice(start, end)
            if r.num_pending_tokens and end > r.num_tokens - r.num_pending_tokens:
                # (only the last token can be pending: one step is in flight at a time)
                patch_at.append(len(input_ids) - 1)
                patch_from.append(pending.rows[r.request_id])
            positions += range(start, end)
            kv_slots += [r.block_table[p // block_tokens] * block_tokens + p % block_tokens
                         for p in range(start, end)]
            query_starts.append(query_starts[-1] + s.num_new_tokens)
            context_lens.append(end)
            slot = -1 if r.adapter is None else slot_of.get(r.adapter, -1)
            if slot < 0 and r.adapter is not None:
                slot = slot_of[r.adapter] = (len(slot_of) if self.slot_tables is None
                                             else SlotTables.slot(residents[r.adapter]))
            token_slots += [slot] * s.num_new_tokens
            runs.append((query_starts[-2], s.num_new_tokens, slot))
            if s.samples:
                sample_rows_by_index[i] = query_starts[-1] - 1
        sample_rows = [sample_rows_by_index[i] for i in range(len(scheduled)) if i in sample_rows_by_index]

        tables = padded_block_tables([scheduled[i].request.block_table for i in order])
        q_lens = [scheduled[i].num_new_tokens for i in order]
        attn = AttentionBatch(
            positions=_upload(positions, torch.int64, dev),
            query_starts=_upload(query_starts, torch.int32, dev),
            context_lens=_upload(context_lens, torch.int32, dev),
            block_tables=tables.to(dev, non_blocking=True),
            kv_slots=_upload(kv_slots, torch.int64, dev),
            max_query_len=max(q_lens),
            max_context_len=max(context_lens),
            is_decode=max(q_lens) == 1,
            query_starts_host=query_starts,
            context_lens_host=context_lens,
            decode_seqs=decode_tokens,
        )
        lora = (self._lora_batch(slot_of, token_slots, runs, decode_tokens, residents,
                                 attn.is_decode, dev) if slot_of else None)
        ids = _upload(input_ids, torch.int64, dev)
        rows = _upload(sample_rows, torch.int64, self.device)
        patch = None
        if patch_at:
            at = _upload(patch_at, torch.int64, self.device)
            values = pending.tokens.index_select(0, _upload(patch_from, torch.int64, self.device))

            def patch(device_ids: torch.Tensor) -> None:
                device_ids.index_copy_(0, at, values)
        if use_graph:
            return self.graphs.run(ids, attn, lora, patch).index_select(0, rows)
        if patch is not None:
            patch(ids)
        if use_pieces:
            return self.piecewise.run(ids, attn, lora, rows)
        ctx = ForwardContext(self.ops, attn, lora, self.pool, self.kv_shape)
        return self.model(ids, ctx, rows)

    def _lora_batch(
        self, slot_of: dict[str, int], token_slots: list[int], runs: list[tuple[int, int, int]],
        decode_tokens: int,
        residents: dict[str, ResidentAdapter], is_decode: bool, dev: torch.device,
    ) -> LoraBatch:
        adapters = [(residents[name], self.store.get(name)) for name in slot_of]
        if self.slot_tables is not None:
            tables = self.slot_tables
            tables.write(adapters)  # (new placements only; on the compute stream)
            max_rank = max(entry.rank for _, entry in adapters)
            a_offsets, b_offsets = tables.offsets(max_rank)
            # (device tensors even for a graph step, whose graph reads these very tensors)
            ranks, scalings = tables.ranks, tables.scalings
            targets = frozenset().union(*(entry.targets for _, entry in adapters))
        else:
            rows = self.lora_tables.gather(adapters)
            ranks, scalings, a_offsets, b_offsets = (
                t.to(dev, non_blocking=True)
                for t in (rows.ranks, rows.scalings, rows.a_offsets, rows.b_offsets))
            max_rank, targets = rows.max_rank, rows.targets
        seg_starts, seg_lens, seg_slots, decode_segments = slot_segments(runs, decode_tokens)
        return LoraBatch(
            token_slots=_upload(token_slots, torch.int32, dev),
            ranks=ranks,
            scalings=scalings,
            a_offsets=a_offsets,
            b_offsets=b_offsets,
            max_rank=max_rank,
            seg_starts=_upload(seg_starts, torch.int32, dev),
            seg_lens=_upload(seg_lens, torch.int32, dev),
            seg_slots=_upload(seg_slots, torch.int32, dev),
            max_seg_len=max(seg_lens),
            is_decode=is_decode,
            decode_tokens=decode_tokens,
            decode_segments=decode_segments,
            targets=targets,
        )

