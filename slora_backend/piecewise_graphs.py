"""Steps that prefill, replayed from CUDA graphs in pieces, attention run eagerly between them.

A step that prefills (a prompt chunk, often beside decode tokens) launches the same ~500 kernels
as a decode step, but its attention's launch depends on the step's query and context lengths,
so it cannot be one graph (``DecodeGraphs``). Everything else depends only on the number of
tokens T and the batch's largest adapter rank. As in vLLM, the forward is cut at attention into
``num_layers + 1`` pieces, each a graph: piece 0 = embedding, RoPE tables and layer 0 up to its
KV write; piece i = layer i-1 after attention (output projection, norm, MLP) and layer i up to
its KV write; the last piece = the last layer after attention. Between pieces the step's own
attention runs eagerly over its n real tokens; the final norm and the LM head run eagerly on the
sampled rows.

Graphs are keyed by (token bucket T, rank bucket, ``graph_targets``). A step's n tokens are
padded to T; padding rows are harmless by construction: no adapter (slot -1), no KV write (slot
-1), and every op but attention is row by row, so their values never reach a real row.

Launch shapes inside a piece follow from the key alone: LoRA runs the mixed step's split
(``ops.triton_ops._mixed_split``) in a fixed form (``LoraBatch.row_slots``): the per-token
kernels over the first min(T, max_batch) rows with the decode rows' slots (-1 elsewhere), the
segment kernels over the prompts' segments padded with empty ones to min(T, MAX_PROMPTS), tiles
chosen for segments as long as T. (The segment kernels' grid grows with the table's length, and
every padded segment's programs still start and exit: a table padded to 256 segments cost 5.6 ms
of a 37 ms step on the H200, batch 256 beside one 128-token prompt. A step of more prompts runs
eagerly.)

Every tensor a piece reads or writes between pieces (inputs, the residual stream, queries,
attention output, RoPE tables) is a prefix of one buffer sized for the largest bucket, allocated
before any capture and shared by all keys (one step runs at a time), so none lies in the graphs'
memory pool, where a later capture could reuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .adapters.tables import SlotTables
from .batch import LORA_MODULES, AttentionBatch, LoraBatch
from .cuda_graphs import RANK_BUCKETS, GraphCache, _bucket, _EagerReplay, graph_targets
from .models.llama import ForwardContext, LlamaModel
from .ops import Ops

# The most prompts (sequences with more than one new token) a piecewise step takes.
MAX_PROMPTS = 32

# Token counts of steps that prefill. Up to 1024 tokens, a bucket every ``spacing`` tokens
# (EngineConfig.piecewise_bucket_tokens): a step of 256 decode rows and one prompt of the S1
# trace (8-511 tokens) has 264-767 tokens, and the weight GEMMs of such a step are compute-bound,
# so every padded token costs about what a real one does. With spacing 64 the padding is at most
# 63 tokens (~6% of such a step on average), where a grid of 384, 512, 768, 1024 would pad
# ~18%. Above 1024, a coarser tail (at most ~1/8 of a step), few enough to capture at start-up.
DEFAULT_BUCKET_SPACING = 64
_FINE_UP_TO = 1024
_COARSE_BUCKETS = (1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096)


def bucket_grid(spacing: int = DEFAULT_BUCKET_SPACING) -> tuple[int, ...]:
    """Every token bucket a piecewise step can be padded to: the powers of two from 16 below
    ``spacing``, every ``spacing`` tokens up to 1024 (and 1024 itself), then the coarse tail."""
    small = [b for b in (16, 32, 64, 128, 256, 512) if b < spacing]
    fine = sorted(set(range(spacing, _FINE_UP_TO + 1, spacing)) | {_FINE_UP_TO})
    return (*small, *fine, *_COARSE_BUCKETS)


TOKEN_BUCKETS = bucket_grid()


def token_buckets(max_tokens: int, spacing: int = DEFAULT_BUCKET_SPACING) -> tuple[int, ...]:
    """The buckets captured for steps of up to ``max_tokens`` tokens: up to the first bucket
    that holds ``max_tokens`` (all of them when none does: larger steps run eagerly)."""
    grid = bucket_grid(spacing)
    top = _bucket(max_tokens, grid) or grid[-1]
    return tuple(b for b in grid if b <= top)


class _Buffers:
    """The tensors every key's pieces share, sized for the largest bucket (see module doc)."""

    def __init__(self, model: LlamaModel, tokens: int, rows: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        s, i32, i64 = model.spec, torch.int32, torch.int64
        self.ids = torch.zeros(tokens, dtype=i64, device=device)
        self.positions = torch.zeros(tokens, dtype=i64, device=device)
        self.kv_slots = torch.full((tokens,), -1, dtype=i64, device=device)
        self.token_slots = torch.full((tokens,), -1, dtype=i32, device=device)
        self.row_slots = torch.full((rows,), -1, dtype=i32, device=device)
        segs = min(rows, MAX_PROMPTS)  # (a step's prompts: see PiecewiseGraphs.fits)
        self.seg_starts = torch.zeros(segs, dtype=i32, device=device)
        self.seg_lens = torch.zeros(segs, dtype=i32, device=device)
        self.seg_slots = torch.full((segs,), -1, dtype=i32, device=device)
        self.x = torch.zeros(tokens, s.hidden_size, dtype=dtype, device=device)
        self.cos = torch.zeros(tokens, s.head_dim, dtype=dtype, device=device)
        self.sin = torch.zeros(tokens, s.head_dim, dtype=dtype, device=device)
        self.q = torch.zeros(tokens, s.num_heads, s.head_dim, dtype=dtype, device=device)
        self.attn_out = torch.zeros(tokens, s.num_heads, s.head_dim, dtype=dtype, device=device)


@dataclass
class _Pieces:
    """One key's graphs and the views of the shared buffers they were captured with. The
    static ``lora`` holds the LoRA launches (``LoraBatch.scratch``) and their z buffers, which
    the graphs read and write: it lives as long as they do."""

    pieces: list[torch.cuda.CUDAGraph | _EagerReplay]
    tokens: int
    attn: AttentionBatch
    lora: LoraBatch | None


class PiecewiseGraphs(GraphCache):
    def __init__(
        self, model: LlamaModel, ops: Ops, pool: torch.Tensor,
        kv_shape: tuple[int, int, int, int], max_batch: int, max_tokens: int,
        bucket_spacing: int = DEFAULT_BUCKET_SPACING, capture: bool = True,
        slot_tables: SlotTables | None = None,
    ) -> None:
        """Steps of up to ``max_batch`` sequences and ``max_tokens`` tokens (those beyond the
        largest bucket run eagerly), padded to the buckets of ``bucket_grid(bucket_spacing)``.
        ``capture=False`` replays the pieces eagerly from the same padded static inputs (for
        tests). ``slot_tables``: the runner's device LoRA tables when its ops take global slots."""
        buckets = token_buckets(max_tokens, bucket_spacing)
        super().__init__(buckets, pool.device, capture, slot_tables)
        self.model = model
        self.ops = ops
        self.pool = pool
        self.kv_shape = kv_shape
        self.buckets = buckets
        self.max_tokens = min(max_tokens, buckets[-1])
        self.max_batch = max_batch
        self._buffers = _Buffers(model, buckets[-1], min(buckets[-1], max_batch),
                                 pool.dtype, self.device)

    @property
    def num_graphs(self) -> int:
        return sum(len(p.pieces) for p in self._graphs.values())

    def fits(self, num_tokens: int, num_seqs: int, num_prompts: int, max_rank: int) -> bool:
        return (num_tokens <= self.max_tokens and num_seqs <= self.max_batch
                and num_prompts <= MAX_PROMPTS and _bucket(max_rank, RANK_BUCKETS) is not None)

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, attn: AttentionBatch, lora: LoraBatch | None,
            sample_rows: torch.Tensor) -> torch.Tensor:
        """The step's fp32 logits ``[len(sample_rows), vocab]``, as ``LlamaModel.forward``
        gives them. ``ids``, ``attn`` and ``lora`` are the step's own device tensors (decode
        rows first, ``LoraBatch.decode_tokens``); ``fits`` must hold."""
        n = ids.shape[0]
        rank = lora.max_rank if lora is not None else 0
        targets = graph_targets(lora.targets) if lora is not None else None
        self._drop_stale_graphs()
        g = self._get((_bucket(n, self.buckets), _bucket(rank, RANK_BUCKETS), targets))
        self._fill(g, ids, attn, lora)
        if g.lora is not None and not self.ops.graph_capturable:
            g.lora.scratch.clear()  # (such ops memoise this step's tables there)
        b, ctx = self._buffers, ForwardContext(self.ops, attn, lora, self.pool, self.kv_shape)
        q, attn_out = b.q[:n], b.attn_out[:n]
        for i, layer in enumerate(self.model.layers):
            g.pieces[i].replay()
            attn_out.copy_(self.ops.attention(q, ctx.kv_pages(i), attn, layer.scale))
        g.pieces[-1].replay()
        self.replays += 1
        return self.model.compute_logits(b.x[:n], sample_rows, ctx)

    # ---- static inputs ------------------------------------------------------------------------

    def _fill(self, g: _Pieces, ids: torch.Tensor, attn: AttentionBatch,
              lora: LoraBatch | None) -> None:
        t, b = g.tokens, self._buffers
        _pad_copy(b.ids[:t], ids, 0)
        _pad_copy(b.positions[:t], attn.positions, 0)
        _pad_copy(b.kv_slots[:t], attn.kv_slots, -1)
        lo = g.lora
        if lo is None:
            return
        d, k = lora.decode_tokens, lora.decode_segments
        _pad_copy(b.token_slots[:t], lora.token_slots, -1)
        _pad_copy(lo.row_slots, lora.token_slots[:d], -1)
        _pad_copy(lo.seg_starts, lora.seg_starts[k:], 0)
        _pad_copy(lo.seg_lens, lora.seg_lens[k:], 0)  # (padding: empty segments)
        _pad_copy(lo.seg_slots, lora.seg_slots[k:], -1)
        if self.slot_tables is not None:  # the graphs read the device tables themselves
            return
        s, r = lora.a_offsets.shape[0], lora.a_offsets.shape[2]
        _pad_copy(lo.ranks, lora.ranks, 0)
        _pad_copy(lo.scalings, lora.scalings, 0)
        lo.a_offsets.zero_()
        lo.b_offsets.zero_()
        lo.a_offsets[:s, :, :r].copy_(lora.a_offsets, non_blocking=True)
        lo.b_offsets[:s, :, :r].copy_(lora.b_offsets, non_blocking=True)

    def _static_lora(self, tokens: int, rows: int, rank: int,
                     targets: frozenset[int] | None) -> LoraBatch:
        """``rows``: of the per-token kernels (the decode rows); the segment tables hold up to
        min(tokens, max_batch, MAX_PROMPTS) prompts."""
        dev, i32, i64, b = self.device, torch.int32, torch.int64, self._buffers
        segs = min(tokens, self.max_batch, MAX_PROMPTS)
        if self.slot_tables is not None:
            self.slot_tables.ensure_width(rank)
            self._drop_stale_graphs()
            ranks, scalings = self.slot_tables.ranks, self.slot_tables.scalings
            a_offsets, b_offsets = self.slot_tables.offsets(rank)
        else:  # dense slots: at most one per sequence
            ranks = torch.zeros(rows, len(LORA_MODULES), dtype=i32, device=dev)
            scalings = torch.zeros(rows, dtype=torch.float32, device=dev)
            a_offsets = torch.zeros(rows, len(LORA_MODULES), rank, dtype=i64, device=dev)
            b_offsets = torch.zeros_like(a_offsets)
        return LoraBatch(
            token_slots=b.token_slots[:tokens], ranks=ranks, scalings=scalings,
            a_offsets=a_offsets, b_offsets=b_offsets, max_rank=rank,
            seg_starts=b.seg_starts[:segs], seg_lens=b.seg_lens[:segs],
            seg_slots=b.seg_slots[:segs],
            # (sizes the segment kernels' tiles: segments up to the whole step)
            max_seg_len=tokens, is_decode=False, row_slots=b.row_slots[:rows], targets=targets,
        )

    def _capture(self, tokens: int, rank: int, targets: frozenset[int] | None) -> _Pieces:
        dev, b = self.device, self._buffers
        rows = min(tokens, self.max_batch)
        # Only positions (RoPE) and kv_slots (KV writes) are read inside the pieces; the
        # step's own AttentionBatch serves its attention between them.
        attn = AttentionBatch(
            positions=b.positions[:tokens],
            query_starts=torch.tensor([0, tokens], dtype=torch.int32, device=dev),
            context_lens=torch.tensor([tokens], dtype=torch.int32, device=dev),
            block_tables=torch.zeros(1, 1, dtype=torch.int32, device=dev),
            kv_slots=b.kv_slots[:tokens], max_query_len=tokens, max_context_len=tokens,
            is_decode=False, query_starts_host=[0, tokens], context_lens_host=[tokens],
        )
        lora = self._static_lora(tokens, rows, rank, targets) if rank > 0 else None
        ctx = ForwardContext(self.ops, attn, lora, self.pool, self.kv_shape)
        run = [self._piece(i, tokens, ctx) for i in range(len(self.model.layers) + 1)]
        if not self.capture:  # (the same warm-up as a capture, so CPU tests run it too)
            self._warm_up(run)
            return _Pieces([_EagerReplay(f) for f in run], tokens, attn, lora)
        current = torch.cuda.current_stream(dev)
        side = self._side_stream
        side.wait_stream(current)
        pieces = []
        with torch.cuda.stream(side):
            self._warm_up(run)
            torch.cuda.synchronize(dev)
            for f in run:
                graph = torch.cuda.CUDAGraph()
                # (torch.cuda.graph would also sync and collect garbage before each of the
                # num_layers + 1 captures.) thread_local: the engine's adapter-read threads pin
                # host memory while a capture runs, which the global mode counts as illegal.
                graph.capture_begin(pool=self._mempool, capture_error_mode="thread_local")
                try:
                    f()
                finally:
                    graph.capture_end()
                pieces.append(graph)
        current.wait_stream(side)
        return _Pieces(pieces, tokens, attn, lora)

    def _warm_up(self, run: list[Callable[[], None]]) -> None:
        """Run the pieces twice: compiles kernels, settles the allocator and builds the LoRA
        launches (``LoraBatch.scratch``, with their z buffers) outside the graphs' pool. They
        run for real on the shared buffers, which still hold the last step's inputs, whose KV
        slots would have the warm-up overwrite that step's keys and values in the pool: the
        inputs are set to padding first, which writes nothing."""
        self._clear_inputs()
        for _ in range(2):
            for f in run:
                f()

    def _clear_inputs(self) -> None:
        """Every shared input as padding: no KV write, no adapter, no segment."""
        b = self._buffers
        b.ids.zero_()
        b.positions.zero_()
        b.kv_slots.fill_(-1)
        b.token_slots.fill_(-1)
        b.row_slots.fill_(-1)
        b.seg_lens.zero_()
        b.seg_slots.fill_(-1)

    def _piece(self, i: int, tokens: int, ctx: ForwardContext) -> Callable[[], None]:
        """Piece ``i`` over the first ``tokens`` rows of the shared buffers."""
        b, layers = self._buffers, self.model.layers
        x, q, attn_out = b.x[:tokens], b.q[:tokens], b.attn_out[:tokens]
        cos, sin = b.cos[:tokens], b.sin[:tokens]

        def run() -> None:
            pending = None  # (the MLP output of layer i - 1: added by layer i's norm kernel)
            if i == 0:
                for dst, src in zip((x, cos, sin), self.model.embed_tokens(b.ids[:tokens], ctx)):
                    dst.copy_(src)
            else:
                pending = layers[i - 1].post_attention(attn_out, x, ctx)
            if i < len(layers):
                q.copy_(layers[i].pre_attention(x, pending, cos, sin, ctx))
            else:
                layers[i - 1].finish(x, pending)

        return run


def _pad_copy(dst: torch.Tensor, src: torch.Tensor, fill: int) -> None:
    """dst[:len(src)] = src; the rest of dst = ``fill``."""
    n = src.shape[0]
    dst[:n].copy_(src, non_blocking=True)
    dst[n:].fill_(fill)
