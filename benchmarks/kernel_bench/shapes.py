"""What the kernel benchmark runs on: Llama-2-7B's dimensions in fp16 on CUDA, the target
configurations, and LoRA adapters packed into one layer's page pool as the engine packs them."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from slora_kernels.lora_args import LoraArgs

from slora_backend.batch import LORA_MODULES
from slora_backend.layout import PoolLayout

DT = torch.float16
DEV = "cuda"
SPEC = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                       head_dim=128)
H, I = SPEC.hidden_size, SPEC.intermediate_size
QKV = ((0, 1, 2), (0, H, 2 * H), (H, H, H))  # modules, out_starts, out_dims (MHA: kv_dim = H)
MIXED = (8, 16, 32, 64)  # S-LoRA's S2 rank set, round robin
TARGET_B, CTX, LONG_CTX, PREFILL_LEN = 64, 1024, 4096, 512  # the target configurations
HEADS, HEAD_DIM = SPEC.num_heads, SPEC.head_dim




class Adapters:
    """``n`` adapters (ranks round robin from ``ranks``) packed by PoolLayout onto shuffled pages
    of one layer's pool buffer, which otherwise holds random "KV" data."""

    def __init__(self, n: int, ranks: tuple[int, ...], gen: torch.Generator) -> None:
        layout = PoolLayout(SPEC, block_tokens=16)  # type: ignore[arg-type]
        self.ranks_host = [ranks[s % len(ranks)] for s in range(n)]
        plans = {r: layout.plan_adapter({m: r for m in LORA_MODULES}) for r in set(ranks)}
        total = sum(plans[r].num_pages for r in self.ranks_host)
        page_of = torch.randperm(total, generator=gen)
        max_rank = max(self.ranks_host)
        a_off = torch.zeros(n, 7, max_rank, dtype=torch.int64)
        b_off = torch.zeros_like(a_off)
        cursor = 0
        for s, r in enumerate(self.ranks_host):
            plan = plans[r]
            pages = page_of[cursor:cursor + plan.num_pages]
            cursor += plan.num_pages
            for row in plan.rows:
                table = a_off if row.kind == "a" else b_off
                table[s, LORA_MODULES.index(row.module), row.index] = (
                    int(pages[row.page]) * layout.page_size + row.offset)
        self.pool = (torch.randn(total * layout.page_size, device=DEV, dtype=DT) * 0.02)
        self.ranks = torch.tensor([[r] * 7 for r in self.ranks_host], dtype=torch.int32,
                                  device=DEV)
        self.a_off, self.b_off = a_off.to(DEV), b_off.to(DEV)
        self.scalings = torch.full((n,), 2.0, device=DEV)
        self.dims = [layout.module_dims[m] for m in LORA_MODULES]

    def args(self, token_slots: torch.Tensor | None = None,
             segments: tuple[torch.Tensor, ...] | None = None, max_seg_len: int = 0) -> LoraArgs:
        """These adapters' tables, with per-token slots and/or (starts, lens, slots) segments."""
        seg_starts, seg_lens, seg_slots = segments or (None, None, None)
        return LoraArgs(self.ranks, self.a_off, self.b_off, self.scalings,
                        token_slots=token_slots, seg_starts=seg_starts, seg_lens=seg_lens,
                        seg_slots=seg_slots, max_seg_len=max_seg_len)

    def weight_bytes(self, slots: list[int], modules: tuple[int, ...]) -> float:
        """Bytes of the A and B^T rows of ``modules`` for each distinct slot."""
        return sum(self.ranks_host[s] * sum(self.dims[m]) * 2 for s in set(slots) for m in modules)
