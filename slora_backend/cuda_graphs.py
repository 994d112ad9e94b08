"""Decode steps replayed from CUDA graphs.

A decode step of a 7B model launches about 500 kernels; launched from Python that costs more
host time than the GPU needs to run them. A decode step (one token per sequence) has a shape
that depends only on the batch size and the batch's largest adapter rank, so one graph is
captured per bucket of those two and later steps copy their metadata into the graph's static
input tensors and replay it. Attention is captured for the longest context the engine allows
(its programs stop at each sequence's own length), so the context does not multiply the graphs.
``capture_all`` captures every batch bucket up front (as vLLM does at start-up): a capture
compiles kernels and runs the model three times, far too slow to happen inside a serving step.

Graphs are keyed by (batch bucket, rank bucket, ``graph_targets``). Padding rows (up to the
batch bucket) are harmless by construction: they use no adapter (slot -1), write no KV (slot -1)
and attend to one token of page 0; their logits are dropped. With ``SlotTables`` (the Triton
kernels) the graphs read the engine's device LoRA tables themselves, so a step copies in only
its token slots; when the tables are widened (an adapter of a larger rank than any before),
the graphs with adapters are dropped and captured again on use.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .adapters.tables import SlotTables
from .batch import LORA_MODULES, MODULE_INDEX, AttentionBatch, LoraBatch
from .models.llama import ForwardContext, LlamaModel
from .ops import Ops

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
RANK_BUCKETS = (0, 8, 16, 32, 64, 128, 256)
# Adapters that touch only the attention projections (the S-LoRA workloads) get graphs without
# the MLP's LoRA launches, which would find rank 0 everywhere and still cost ~3 us each.
ATTENTION_MODULES = frozenset(MODULE_INDEX[m] for m in ("q_proj", "k_proj", "v_proj", "o_proj"))


def graph_targets(targets: frozenset[int] | None) -> frozenset[int] | None:
    """The module set a batch with adapters on ``targets`` replays a graph for: the attention
    projections, or None (every module)."""
    return ATTENTION_MODULES if targets is not None and targets <= ATTENTION_MODULES else None


def _bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    i = bisect.bisect_left(buckets, value)
    return buckets[i] if i < len(buckets) else None


class _EagerReplay:
    """Stands in for a CUDA graph where none can be captured (CPU tests of the padding logic):
    ``replay()`` runs the model on the static inputs, as the graph would."""

    def __init__(self, run) -> None:
        self.replay = run


@dataclass
class _Graph:
    """A captured step and every tensor its kernels read or write. A captured kernel keeps raw
    device pointers, so each of these must live as long as the graph: a tensor freed after the
    capture hands its memory to the next allocation and the replay reads whatever lands there."""

    graph: torch.cuda.CUDAGraph | _EagerReplay
    ids: torch.Tensor
    attn: AttentionBatch
    lora: LoraBatch | None
    sample_rows: torch.Tensor
    logits: torch.Tensor


class GraphCache:
    """What the decode and the piecewise graphs share: graphs keyed by (size bucket, rank bucket,
    ``graph_targets``), captured on first use or up front (``capture_all``), counted, and dropped
    when the device LoRA tables they read are widened. Subclasses capture (``_capture``) and
    replay; each value they keep has a ``lora`` (None: a graph without adapters)."""

    def __init__(self, sizes: tuple[int, ...], device: torch.device, capture: bool,
                 slot_tables: SlotTables | None) -> None:
        self.sizes = sizes  # the size buckets (batch or tokens) captured by capture_all
        self.device = device
        self.capture = capture
        self.slot_tables = slot_tables
        self._tables_version = slot_tables.version if slot_tables is not None else 0
        self._graphs: dict[tuple[int, int, frozenset[int] | None], Any] = {}
        self.replays = 0
        self.capture_seconds = 0.0  # host time spent capturing (warm-up runs included)
        self._mempool = torch.cuda.graph_pool_handle() if capture else None
        # Every warm-up and capture runs on this one stream: torch gives each stream that runs a
        # matmul a cuBLAS workspace of its own (32 MiB) for the life of the process, and the
        # captured matmuls keep using the workspace of the stream they were captured on.
        self._side_stream = torch.cuda.Stream(device) if capture else None

    def capture_all(self, adapters: Iterable[tuple[int, frozenset[int] | None]]) -> None:
        """Capture every size bucket for the adapter kinds of ``adapters``, each given as
        (rank, target modules); rank 0 = no adapter."""
        kinds = {(_bucket(r, RANK_BUCKETS), graph_targets(t) if r else None) for r, t in adapters}
        kinds = {k for k in kinds if k[0] is not None}
        if self.slot_tables is not None and kinds:  # widen first: no graph is dropped later
            self.slot_tables.ensure_width(max(rank for rank, _ in kinds))
        for rank, targets in sorted(kinds, key=lambda k: (k[0], k[1] is not None)):
            for size in self.sizes:
                self._get((size, rank, targets))

    def _get(self, key: tuple[int, int, frozenset[int] | None]) -> Any:
        g = self._graphs.get(key)
        if g is None:
            t = time.perf_counter()
            g = self._graphs[key] = self._capture(*key)
            self.capture_seconds += time.perf_counter() - t
        return g

    def _capture(self, size: int, rank: int, targets: frozenset[int] | None) -> Any:
        raise NotImplementedError

    def _drop_stale_graphs(self) -> None:
        """Graphs with adapters read the device tables captured with them: once the tables are
        widened into new tensors, those graphs go (and are captured again on use)."""
        if self.slot_tables is not None and self.slot_tables.version != self._tables_version:
            if self.capture:  # (rare: let a replay still in flight end before its graph goes)
                torch.cuda.synchronize(self.device)
            self._graphs = {k: g for k, g in self._graphs.items() if g.lora is None}
            self._tables_version = self.slot_tables.version


class DecodeGraphs(GraphCache):
    def __init__(
        self, model: LlamaModel, ops: Ops, pool: torch.Tensor,
        kv_shape: tuple[int, int, int, int], max_batch: int, max_model_len: int,
        capture: bool = True, slot_tables: SlotTables | None = None,
    ) -> None:
        """``capture=False`` replays eagerly from the same padded static inputs (for tests).
        ``slot_tables``: the runner's device LoRA tables when its ops take global slots."""
        self.max_batch = min(max_batch, BATCH_BUCKETS[-1])
        super().__init__(tuple(b for b in BATCH_BUCKETS if b <= self.max_batch), pool.device,
                         capture, slot_tables)
        self.model = model
        self.ops = ops
        self.pool = pool
        self.kv_shape = kv_shape
        self.block_tokens = kv_shape[1]
        self.max_model_len = max_model_len

    def fits(self, batch: int, max_rank: int) -> bool:
        return batch <= self.max_batch and _bucket(max_rank, RANK_BUCKETS) is not None

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, attn: AttentionBatch, lora: LoraBatch | None,
            patch_ids: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Replay the step for host-side inputs; returns logits ``[batch, vocab]`` (row order of
        ``ids``). ``patch_ids`` finishes the graph's token ids on the device (tokens the host has
        not read yet)."""
        n = ids.shape[0]
        rank = lora.max_rank if lora is not None else 0
        targets = graph_targets(lora.targets) if lora is not None else None
        self._drop_stale_graphs()
        g = self._get((_bucket(n, BATCH_BUCKETS), _bucket(rank, RANK_BUCKETS), targets))
        self._fill(g, ids, attn, lora)
        if patch_ids is not None:
            patch_ids(g.ids[:n])
        g.graph.replay()
        self.replays += 1
        return g.logits[:n]

    def _fill(self, g: _Graph, ids: torch.Tensor, attn: AttentionBatch, lora: LoraBatch | None) -> None:
        n = ids.shape[0]
        g.ids[:n].copy_(ids, non_blocking=True)
        a = g.attn
        a.positions[:n].copy_(attn.positions, non_blocking=True)
        a.positions[n:].zero_()
        a.context_lens[:n].copy_(attn.context_lens, non_blocking=True)
        a.context_lens[n:].fill_(1)
        a.kv_slots[:n].copy_(attn.kv_slots, non_blocking=True)
        a.kv_slots[n:].fill_(-1)
        width = attn.block_tables.shape[1]
        a.block_tables[:n, :width].copy_(attn.block_tables, non_blocking=True)
        a.block_tables[:n, width:].zero_()
        a.block_tables[n:].zero_()
        if g.lora is None:
            return
        lo = g.lora
        lo.token_slots[:n].copy_(lora.token_slots, non_blocking=True)
        lo.token_slots[n:].fill_(-1)
        if self.slot_tables is not None:  # the graph reads the device tables themselves
            return
        s, r = lora.a_offsets.shape[0], lora.a_offsets.shape[2]
        lo.ranks.zero_()
        lo.ranks[:s].copy_(lora.ranks, non_blocking=True)
        lo.scalings[:s].copy_(lora.scalings, non_blocking=True)
        lo.a_offsets.zero_()
        lo.b_offsets.zero_()
        lo.a_offsets[:s, :, :r].copy_(lora.a_offsets, non_blocking=True)
        lo.b_offsets[:s, :, :r].copy_(lora.b_offsets, non_blocking=True)

    def _capture(self, batch: int, rank: int, targets: frozenset[int] | None) -> _Graph:
        dev, i32, i64 = self.device, torch.int32, torch.int64
        context = -(-self.max_model_len // self.block_tokens) * self.block_tokens
        ids = torch.zeros(batch, dtype=i64, device=dev)
        attn = AttentionBatch(
            positions=torch.zeros(batch, dtype=i64, device=dev),
            query_starts=torch.arange(batch + 1, dtype=i32, device=dev),
            context_lens=torch.ones(batch, dtype=i32, device=dev),
            block_tables=torch.zeros(batch, context // self.block_tokens, dtype=i32, device=dev),
            kv_slots=torch.full((batch,), -1, dtype=i64, device=dev),
            max_query_len=1, max_context_len=context, is_decode=True,
            query_starts_host=list(range(batch + 1)), context_lens_host=[1] * batch,
        )
        lora = None
        if rank > 0:
            # One segment per token makes the ops pick the per-token (BGMV) decode kernels, whose
            # launch shape does not depend on how the batch's tokens share adapters.
            if self.slot_tables is not None:
                self.slot_tables.ensure_width(rank)
                self._drop_stale_graphs()
                ranks, scalings = self.slot_tables.ranks, self.slot_tables.scalings
                a_offsets, b_offsets = self.slot_tables.offsets(rank)
            else:
                ranks = torch.zeros(batch, len(LORA_MODULES), dtype=i32, device=dev)
                scalings = torch.zeros(batch, dtype=torch.float32, device=dev)
                a_offsets = torch.zeros(batch, len(LORA_MODULES), rank, dtype=i64, device=dev)
                b_offsets = torch.zeros_like(a_offsets)
            lora = LoraBatch(
                token_slots=torch.full((batch,), -1, dtype=i32, device=dev),
                ranks=ranks, scalings=scalings, a_offsets=a_offsets, b_offsets=b_offsets,
                max_rank=rank,
                seg_starts=torch.arange(batch, dtype=i32, device=dev),
                seg_lens=torch.ones(batch, dtype=i32, device=dev),
                seg_slots=torch.zeros(batch, dtype=i32, device=dev),
                max_seg_len=1, is_decode=True, targets=targets,
            )
        ctx = ForwardContext(self.ops, attn, lora, self.pool, self.kv_shape)
        rows = torch.arange(batch, dtype=i64, device=dev)
        if not self.capture:
            logits = torch.empty(batch, self.model.spec.vocab_size, device=dev)
            replay = _EagerReplay(lambda: logits.copy_(self.model(ids, ctx, rows)))
            return _Graph(replay, ids, attn, lora, rows, logits)
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: compiles kernels and settles the allocator
            for _ in range(2):
                self.model(ids, ctx, rows)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's adapter-read threads pin host memory while a capture runs,
        # which the default (global) mode counts as an illegal call and aborts the capture.
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            logits = self.model(ids, ctx, rows)
        return _Graph(graph, ids, attn, lora, rows, logits)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)
