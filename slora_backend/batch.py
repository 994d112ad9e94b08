"""Per-step batch metadata handed from the model runner to the layers and kernels.

Everything here is a tensor on the engine's device, built once per forward step. The model and
the ops (torch references and Triton kernels alike) read it; nothing in here owns policy.

The batch is flat: T tokens of B sequences laid end to end, sequence b owning tokens
``query_starts[b] : query_starts[b+1]``. A decode sequence contributes one token, a prefill (or
prefill chunk) several; both kinds mix freely in one batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from typing import Any

import numpy as np
import torch
from slora_kernels.lora_args import LoraArgs

# Fixed order of the LoRA target modules. A module's index in this tuple is its index in the
# ``ranks`` / ``a_offsets`` / ``b_offsets`` tables below.
LORA_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
MODULE_INDEX: dict[str, int] = {name: i for i, name in enumerate(LORA_MODULES)}


@dataclass
class LoraBatch:
    """Which token uses which adapter, and where that adapter's rows lie in the page pool.

    Adapters are addressed by *slot*, a row of the tables below: for the torch ops a dense
    renumbering of the step's adapters (0 .. num_slots-1); for the Triton kernels the row of
    the adapter's first pool page in the engine's device tables (``adapters.tables.SlotTables``),
    which also hold rows no token of this step uses. Row j of module m's A (length ``in_dim``)
    starts at element ``a_offsets[s, m, j]`` of one layer's flattened pool buffer; row j of B^T
    (length ``out_dim``) at ``b_offsets[s, m, j]``. The offsets are the same in every layer
    because an adapter owns the same page indices in every layer's buffer.

    Invariants, for every slot s a token uses: ``0 <= ranks[s, m] <= max_rank``; entries of
    the offset tables at ``j >= ranks[s, m]`` are 0 and never read; ``ranks[s, m] == 0`` means
    module m is not a target of slot s's adapter (the module gets no LoRA term for those tokens).
    """

    token_slots: torch.Tensor  # int32 [T]; -1 = base model (no LoRA)
    ranks: torch.Tensor  # int32 [num_slots, len(LORA_MODULES)]
    scalings: torch.Tensor  # float32 [num_slots]; lora_alpha / r, or lora_alpha / sqrt(r) (rsLoRA)
    # int64 [num_slots, len(LORA_MODULES), max_rank]; the last dimension is contiguous, the
    # others may be strided (cut from wider tables)
    a_offsets: torch.Tensor
    b_offsets: torch.Tensor
    max_rank: int  # largest rank in this batch (>= 1 when any token uses LoRA)
    # Runs of consecutive tokens that share one adapter slot (slot >= 0 only), for prefill
    # kernels that tile over a segment (SGMV). Decode tokens form segments of length 1.
    seg_starts: torch.Tensor  # int32 [num_segments]
    seg_lens: torch.Tensor  # int32 [num_segments]
    seg_slots: torch.Tensor  # int32 [num_segments]
    max_seg_len: int
    is_decode: bool  # every sequence contributes exactly one token this step
    # A mixed step puts its one-token (decode) sequences first: tokens 0 .. decode_tokens - 1,
    # whose segments are the first decode_segments entries of the segment tables (no segment
    # crosses that boundary). The ops may run those rows with the per-token kernels and only
    # the prompts' segments with the segment kernels (see ``slot_segments``).
    decode_tokens: int = 0
    decode_segments: int = 0
    # A step of fixed launch shapes (piecewise CUDA graphs): when set, int32 [R], the slots of
    # the first R rows for the per-token kernels (a decode row's slot, -1 for every other row),
    # and the segment tables then hold only the prompts' segments, padded with empty ones
    # (length 0). Every launch's shape then follows from the tensors' sizes alone.
    row_slots: torch.Tensor | None = None
    # Module indices some slot targets (host-side); None = not known, launch for every module.
    # Lets a layer skip the launches of a projection no adapter in the batch touches.
    targets: frozenset[int] | None = None
    # Scratch space for ops that derive per-step values once and reuse them in every layer
    # (the offsets are the same in all layers). Cleared with the batch.
    scratch: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_slots(self) -> int:
        return int(self.scalings.shape[0])

    @cached_property
    def kernel_args(self) -> LoraArgs:
        """The tables as the LoRA ops take them, checked once (on first use) for the step."""
        return LoraArgs(self.ranks, self.a_offsets, self.b_offsets, self.scalings,
                        token_slots=self.token_slots, seg_starts=self.seg_starts,
                        seg_lens=self.seg_lens, seg_slots=self.seg_slots,
                        max_seg_len=self.max_seg_len)

    @property
    def has_lora(self) -> bool:
        return self.num_slots > 0 and int(self.seg_lens.numel()) > 0

    def targets_any(self, modules: tuple[int, ...]) -> bool:
        return self.targets is None or not self.targets.isdisjoint(modules)


def slot_segments(
    runs: Iterable[tuple[int, int, int]], decode_tokens: int = 0
) -> tuple[list[int], list[int], list[int], int]:
    """(starts, lengths, slots, decode segments) of the maximal runs of one slot >= 0, from
    ``runs`` of (first token, token count, slot) in token order (one per sequence: O(batch), not
    O(tokens)). No segment crosses ``decode_tokens`` (the end of a mixed step's decode rows);
    the first ``decode segments`` segments lie before it. Base tokens (slot -1) are in no
    segment."""
    starts: list[int] = []
    lens: list[int] = []
    slots: list[int] = []
    decode_segments = 0
    for first, count, slot in runs:
        if slot < 0 or count == 0:
            continue
        if slots and slots[-1] == slot and starts[-1] + lens[-1] == first and first != decode_tokens:
            lens[-1] += count
        else:
            starts.append(first)
            lens.append(count)
            slots.append(slot)
            decode_segments += first < decode_tokens
    return starts, lens, slots, decode_segments


def padded_block_tables(tables: list[list[int]]) -> torch.Tensor:
    """int32 ``[len(tables), longest]``: each table's pages, then zeros.

    One flat conversion and a masked write; padding each Python list and converting the nested
    list cost ~1 ms per step at batch 250 on the CI machine (1.5-2 ms on the H200's host, where
    it was the engine thread's hottest line in a serving profile)."""
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    flat = np.fromiter(chain.from_iterable(tables), np.int32, int(lens.sum()))
    out = np.zeros((len(tables), int(lens.max(initial=0))), np.int32)
    out[np.arange(out.shape[1]) < lens[:, None]] = flat
    return torch.from_numpy(out)


@dataclass
class AttentionBatch:
    """Where each sequence's keys and values live, and where this step writes new ones.

    Pool layout (see ``PoolLayout``): one layer's buffer viewed as
    ``[num_pages, 2, block_tokens, num_kv_heads, head_dim]`` (index 0 = K, 1 = V). Token t of a
    sequence lives in page ``block_tables[b, t // block_tokens]`` at offset
    ``t % block_tokens``.

    The query token at flat index i of sequence b has absolute position
    ``positions[i] = context_lens[b] - q_len[b] + (i - query_starts[b])`` and attends causally to
    keys ``0 .. positions[i]`` of its own sequence.
    """

    positions: torch.Tensor  # int64 [T]
    query_starts: torch.Tensor  # int32 [B + 1]
    context_lens: torch.Tensor  # int32 [B]; tokens cached after this step's writes
    block_tables: torch.Tensor  # int32 [B, max_blocks]; unused entries are 0
    kv_slots: torch.Tensor  # int64 [T]; page * block_tokens + offset where token i's K/V go
    max_query_len: int
    max_context_len: int
    is_decode: bool  # every query length is 1
    # Host copies for the torch reference path (avoids device syncs in Python loops).
    query_starts_host: list[int]
    context_lens_host: list[int]
    # A mixed step's one-token (decode) sequences come first: sequences and tokens
    # 0 .. decode_seqs - 1 (kernels may run them apart from the prompts; 0 = not said).
    decode_seqs: int = 0
