"""``TritonOps``: every op of ``Ops`` run by a Triton-lang kernel of ``slora_kernels``.

On CUDA these are the engine's fast path. On a machine without CUDA they run in Triton's
interpreter (``slora_kernels`` switches it on when imported there), which is exact but slow:
for tests only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from slora_kernels.lora_args import LoraArgs
from slora_kernels.lora_decode import (
    BgmvExpand,
    BgmvShrink,
    lora_expand_decode,
    lora_shrink_decode,
)
from slora_kernels.lora_prefill import SgmvExpand, SgmvShrink
from slora_kernels.norm_rope import add_rms_norm, rms_norm, rotary, silu_and_mul
from slora_kernels.paged_attention import paged_attention, write_kv
from slora_kernels.split_k import SplitKWorkspace

from ..batch import AttentionBatch, LoraBatch
from .base import Ops

# A decode batch takes the segment (SGMV) kernels once its tokens share adapters this much on
# average: each adapter's weights are then read once per segment instead of once per token.
# The H200's times of the two kernel kinds (qkv, one shared rank-64 adapter, docs/benchmarks.md)
# cross near 48 tokens per segment.
_SEGMENT_KERNEL_MIN_AVG_LEN = 48


def _use_segments(lora: LoraBatch, num_tokens: int) -> bool:
    if not lora.is_decode:
        return True
    num_segs = int(lora.seg_lens.shape[0])
    return num_segs > 0 and num_tokens >= _SEGMENT_KERNEL_MIN_AVG_LEN * num_segs


def _mixed_split(lora: LoraBatch) -> LoraArgs | None:
    """How to run a mixed step's LoRA, or None to run all of it with the segment kernels.

    The split is the step's tables with two parts: ``token_slots`` of its decode rows (tokens
    0 .. D - 1), run by the per-token kernels, and its prompts' segments, run by the segment
    kernels. Built once per step, used by every layer.

    The segment kernels give a one-token segment a whole tile of BLOCK_M rows, and a mixed
    step of the S1 workload has ~250 of them beside a few prompts. Their decode rows go to the
    decode kernels instead (two more launches per call) - unless they share adapters as much
    as a decode batch that takes the segment kernels would. On the H200 (250 rows + 1434
    prompt tokens, rank 8, ``bench_kernels --only lora_mixed_step``) this takes 2.5x less GPU
    time than running the rows in the segment launch."""
    if lora.row_slots is not None:  # (a fixed-shape step: always split, as its tables say)
        return _memo_split(lora, lora.row_slots, 0)
    if lora.is_decode or lora.decode_segments == 0:  # (no decode row uses an adapter)
        return None
    if lora.decode_tokens >= _SEGMENT_KERNEL_MIN_AVG_LEN * max(lora.decode_segments, 1):
        return None
    return _memo_split(lora, lora.token_slots[:lora.decode_tokens], lora.decode_segments)


def _memo_split(lora: LoraBatch, rows: torch.Tensor, first_prompt_segment: int) -> LoraArgs:
    """The split of ``_mixed_split``: per-token ``rows``, the segments from
    ``first_prompt_segment`` on; built once per step."""
    split = lora.scratch.get("mixed_split")
    if split is None:
        k, args = first_prompt_segment, lora.kernel_args
        split = lora.scratch["mixed_split"] = LoraArgs(
            args.ranks, args.a_offsets, args.b_offsets, args.scalings,
            token_slots=rows, seg_starts=lora.seg_starts[k:],
            seg_lens=lora.seg_lens[k:], seg_slots=lora.seg_slots[k:],
            max_seg_len=lora.max_seg_len)
    return split


class _MixedShrink:
    """A mixed step's shrink: the decode rows' by the decode kernel into the first rows of z,
    the prompts' by the segment kernel."""

    def __init__(self, x: torch.Tensor, pool: torch.Tensor, split: LoraArgs,
                 modules: Sequence[int], workspace: SplitKWorkspace) -> None:
        self.rows = int(split.token_slots.shape[0])
        self.prompts = SgmvShrink(x, pool, split, modules, workspace=workspace)
        self.decode = BgmvShrink(x[:self.rows], pool, split, modules,
                                 out=self.prompts.z[:self.rows])

    def __call__(self, x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        self.decode(x[:self.rows], pool)
        return self.prompts(x, pool)


class _MixedExpand:
    """A mixed step's expand, split as ``_MixedShrink``."""

    def __init__(self, y: torch.Tensor, z: torch.Tensor, pool: torch.Tensor, split: LoraArgs,
                 modules: Sequence[int], out_starts: Sequence[int],
                 out_dims: Sequence[int]) -> None:
        self.rows = d = int(split.token_slots.shape[0])
        self.decode = BgmvExpand(y[:d], z[:d], pool, split, modules, out_starts, out_dims)
        self.prompts = SgmvExpand(y, z, pool, split, modules, out_starts, out_dims)

    def __call__(self, y: torch.Tensor, z: torch.Tensor, pool: torch.Tensor) -> None:
        self.decode(y[:self.rows], z[:self.rows], pool)
        self.prompts(y, z, pool)


class TritonOps(Ops):
    """The Triton kernels behind ``Ops``; every op is a kernel (no torch fallback). Host-side
    metadata (``max_rank``, ``max_seg_len``, ``max_query_len``, ``max_context_len``) sizes the
    grids, so no op syncs with the device and decode steps can be captured in CUDA graphs."""

    name = "triton"
    # The kernels index the adapter tables by slot: the runner's device tables (one row per
    # pool page) serve every step as they are.
    global_slots = True
    graph_capturable = True

    def __init__(self, device: torch.device | None = None, split_k: bool = True,
                 overlap_shrink: bool = False) -> None:
        # Where this engine's split segment shrinks park partial tiles (its steps run one at a
        # time, and its shrinks one after another on one stream): 16 MB on a CUDA device,
        # allocated now if it is known. Without split_k, a workspace with no room: no launch
        # splits.
        self.split_k = SplitKWorkspace() if split_k else SplitKWorkspace(elements=0, counters=0)
        cuda = device is not None and device.type == "cuda"
        if split_k and cuda:
            self.split_k.buffers(device)
        # The stream the LoRA shrinks run on beside their base matmul (``linear_with_lora``).
        self.shrink_stream = torch.cuda.Stream(device) if overlap_shrink and cuda else None

    def linear_with_lora(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        pool: torch.Tensor,
        lora: LoraBatch,
        modules: Sequence[int],
        out_starts: Sequence[int],
        out_dims: Sequence[int],
    ) -> torch.Tensor:
        """The base matmul and the LoRA shrink both only read x, so with a shrink stream the
        shrink runs beside the matmul: at batch 256 a decode step's matmul is compute-bound
        and its 256 x 128 tiles (the kernel cuBLAS picks on the H200) give q/k/v 96 tiles for
        132 SMs, while the shrink reads adapter bytes. Measured, it took under 1% off a decode
        step: beside the matmul the shrinks ran 3x slower than in line (docs/benchmarks.md),
        hence off by default. The expand adds into the matmul's
        output, so it waits for both. Fork and join are stream waits, which CUDA graph capture
        records as a branch. The shrink's buffers are safe to reuse: the next shrink on the
        side stream is queued behind this expand (each call forks after everything queued on
        the main stream)."""
        side = self.shrink_stream
        if side is None:
            return super().linear_with_lora(x, weight, bias, pool, lora, modules, out_starts,
                                            out_dims)
        main = torch.cuda.current_stream(x.device)
        side.wait_stream(main)
        y = F.linear(x, weight, bias)
        with torch.cuda.stream(side):
            z = self.lora_shrink(x, pool, lora, modules)
        main.wait_stream(side)
        self.lora_expand(y, z, pool, lora, modules, out_starts, out_dims)
        return y

    def lora_shrink(
        self, x: torch.Tensor, pool: torch.Tensor, lora: LoraBatch, modules: Sequence[int]
    ) -> torch.Tensor:
        """[T, in] -> [T, len(modules), max_rank]; rows of base-model tokens are zero. The
        result is valid until the next lora_shrink of the same modules in this step."""
        if lora.is_decode and not _use_segments(lora, x.shape[0]):
            # (not prepared: a decode step replays a CUDA graph; eager ones are the rare steps
            # no graph fits)
            return lora_shrink_decode(x, pool, lora.kernel_args, modules)
        # A step's segment launches are prepared by its first layer, reused by the others.
        key = ("shrink", tuple(modules), x.shape)
        launch = lora.scratch.get(key)
        if launch is None:
            split = _mixed_split(lora)
            if split is not None:
                launch = _MixedShrink(x, pool, split, modules, self.split_k)
            else:
                launch = SgmvShrink(x, pool, lora.kernel_args, modules, workspace=self.split_k)
            lora.scratch[key] = launch
        return launch(x, pool)

    def lora_expand(
        self,
        y: torch.Tensor,
        z: torch.Tensor,
        pool: torch.Tensor,
        lora: LoraBatch,
        modules: Sequence[int],
        out_starts: Sequence[int],
        out_dims: Sequence[int],
    ) -> None:
        """y[:, module columns] += scaling * z @ B^T, in place."""
        if lora.is_decode and not _use_segments(lora, y.shape[0]):
            lora_expand_decode(y, z, pool, lora.kernel_args, modules, out_starts, out_dims)
            return
        key = ("expand", tuple(modules), tuple(out_starts), tuple(out_dims), y.shape)
        launch = lora.scratch.get(key)
        if launch is None:
            split = _mixed_split(lora)
            if split is not None:
                launch = _MixedExpand(y, z, pool, split, modules, out_starts, out_dims)
            else:
                launch = SgmvExpand(y, z, pool, lora.kernel_args, modules, out_starts, out_dims)
            lora.scratch[key] = launch
        launch(y, z, pool)

    def write_kv(
        self, kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionBatch
    ) -> None:
        write_kv(kv_pages, k, v, attn.kv_slots)

    def attention(
        self, q: torch.Tensor, kv_pages: torch.Tensor, attn: AttentionBatch, scale: float
    ) -> torch.Tensor:
        return paged_attention(
            q, kv_pages, attn.block_tables, attn.query_starts, attn.context_lens, scale,
            attn.max_query_len, attn.max_context_len, decode_seqs=attn.decode_seqs,
        )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """residual <- x + residual (in place); returns rms_norm(residual). One kernel."""
        return add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, h, d], k: [T, kvh, d], cos/sin: [T, d] in q's dtype (HF layout)."""
        return rotary(q, k, cos, sin)
